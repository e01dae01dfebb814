"""Opacus adapter: σ from the ledger into an Opacus training, which runs only what was charged.

Opacus' `DPOptimizer` adds noise of std ``optimizer.noise_multiplier *
max_grad_norm`` and its accountant records ``optimizer.noise_multiplier`` at
every step, so setting that attribute from each ledger `Epoch` makes Opacus'
own bookkeeping follow the ledger. The adapter also puts in place what
Opacus' ``secure_mode`` would, because ``secure_mode`` cannot be turned on
here: it imports ``torchcsprng``, which has no wheel for current torch
(none on the index for torch 2.13). So, whether or not ``secure_mode`` is on:

* the optimizer's noise is `trainer_client.torch.gaussian_noise` (os.urandom,
  four Box–Muller normals summed in float64 per coordinate, as ``secure_mode``
  sums four draws), never a torch generator;
* the ``DPDataLoader``'s sampler is replaced by our `PoissonSampler`
  (os.urandom, inclusion probability ⌊q·2⁶³⌋/2⁶³ ≤ q; Opacus' own compares a
  float32 ``torch.rand`` with q, which rounds the rate up);

and it refuses, instead of silently running, what the ledger did not charge:
a step before the first `begin_epoch` (σ must come from the ledger), a step
beyond the epoch's charged steps, a step whose batch the Poisson sampler did
not draw, a loader that is not Poisson-sampled (or samples at another q) for
a ``sampling="poisson"`` epoch, a Poisson loader for a ``"shuffle"`` epoch,
and a loader whose length is not the charged number of steps::

    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)  # σ replaced below
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with client.start_run("mnist", sample_rate=loader.sample_rate,
                          steps_per_epoch=len(loader), epochs=10,
                          target_epsilon=3.0, max_grad_norm=1.0) as run:
        for epoch in run:
            adapter.begin_epoch(epoch)
            for x, y in loader: ...
            print(adapter.report(epoch))  # Opacus' ε beside the ledger's dataset ε
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainer_client.models import Epoch

try:
    import torch
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
except ImportError as exc:  # pragma: no cover - exercised only without opacus
    raise ImportError(
        "trainer_client.opacus needs opacus (pip install 'privacy-ledger[opacus]')"
    ) from exc

from trainer_client.torch import PoissonSampler, gaussian_noise

__all__ = ["EpsilonReport", "OpacusLedgerAdapter", "UnchargedStep"]

# The loader's q and the charged q are the same float when the run was planned with
# sample_rate=loader.sample_rate; the tolerance only absorbs a decimal round trip.
RATE_REL_TOL = 1e-9


class UnchargedStep(RuntimeError):
    """An optimizer step the ledger did not charge; it was refused before any noise or update."""


@dataclass(frozen=True)
class EpsilonReport:
    """Opacus' ε for this run beside the ledger's ε for the whole dataset, at the dataset's δ.

    They answer different questions: `opacus_epsilon` is this run's own
    accounting (Opacus' accountant, whatever it is configured as);
    `ledger_epsilon_spent` is everything charged to the dataset, composed by
    the ledger's filter (so it is at least this run's share, usually more).
    """

    epoch: int
    delta: float
    opacus_epsilon: float
    ledger_epsilon_spent: float
    ledger_epsilon_cap: float

    def __str__(self) -> str:
        return (
            f"epoch {self.epoch}: Opacus ε={self.opacus_epsilon:.3f} (this run), "
            f"ledger ε={self.ledger_epsilon_spent:.3f} of {self.ledger_epsilon_cap:.3f} "
            f"(dataset), δ={self.delta:g}"
        )


class OpacusLedgerAdapter:
    """Drive an Opacus ``make_private`` training with the ledger's σ, and only as charged.

    `optimizer` is the ``DPOptimizer`` and `data_loader` the loader that
    ``make_private`` returned: a ``DPDataLoader`` (``poisson_sampling=True``,
    the default) for runs charged as ``sampling="poisson"``, a plain loader
    of ``steps_per_epoch`` fixed-size batches for ``"shuffle"`` runs. The
    adapter replaces the optimizer's noise and the ``DPDataLoader``'s sampler
    with os.urandom-based ones (see the module docstring); call
    :meth:`begin_epoch` with each ledger epoch before iterating the loader.
    """

    def __init__(self, privacy_engine: Any, optimizer: Any, *, data_loader: Any) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer must be the DPOptimizer returned by make_private()")
        if type(optimizer).add_noise is not DPOptimizer.add_noise:
            raise TypeError(
                f"{type(optimizer).__name__} adds its noise its own way (distributed, ghost or "
                "adaptive clipping); the adapter can only put its noise into DPOptimizer and "
                "DPPerLayerOptimizer"
            )
        if getattr(optimizer, "generator", None) is not None:
            raise ValueError(
                "make_private(noise_generator=...) seeds the noise; the adapter draws the noise "
                "from os.urandom and never uses it, so leave it out"
            )
        self.privacy_engine = privacy_engine
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.sampler: PoissonSampler | None = None
        if isinstance(data_loader, DPDataLoader):
            if data_loader.distributed:
                raise ValueError("a distributed DPDataLoader is not supported by the adapter")
            self.sampler = PoissonSampler(
                len(data_loader.dataset), float(data_loader.sample_rate), len(data_loader)
            )
            # DataLoader forbids reassigning batch_sampler once built, to protect iterators
            # already running; none is (begin_epoch must precede iteration), and the loader
            # then takes its batches from our sampler. A step whose batch our sampler did not
            # draw is refused, so if torch ever ignored this, training stops instead of
            # running on Opacus' float32 sampler.
            object.__setattr__(data_loader, "batch_sampler", self.sampler)
        self.epoch: Epoch | None = None
        self.steps_taken = 0
        # Opacus' pre_step calls self.add_noise() once per real (not skipped) step.
        optimizer.add_noise = self._add_noise

    def begin_epoch(self, epoch: Epoch) -> None:
        """Check `epoch` against this training, then set σ and the charged q and steps from it.

        Nothing changes when a check fails (the previous epoch's σ stays in force).
        """
        declared = epoch.max_grad_norm
        if declared is not None and not math.isclose(
            float(self.optimizer.max_grad_norm), declared, rel_tol=1e-12
        ):
            raise ValueError(
                f"the optimizer clips at {self.optimizer.max_grad_norm}, the run declared "
                f"max_grad_norm={declared}"
            )
        if not (epoch.noise_multiplier >= 0 and math.isfinite(epoch.noise_multiplier)):
            raise ValueError(
                f"the noise multiplier must be finite and >= 0, got {epoch.noise_multiplier}"
            )
        loader = self.data_loader
        if epoch.sampling == "poisson":
            self._check_poisson_loader(epoch)
        elif epoch.sampling == "shuffle":
            if self.sampler is not None:
                raise ValueError(
                    "the ledger charged this epoch as shuffled fixed-size batches "
                    "(sampling='shuffle'), but the data loader is Poisson-sampled: use "
                    "make_private(poisson_sampling=False), or plan the run as 'poisson'"
                )
        else:
            raise ValueError(f"unknown sampling {epoch.sampling!r}: the adapter cannot check it")
        if len(loader) != epoch.steps:
            raise ValueError(
                f"the data loader runs {len(loader)} steps per epoch, the ledger charged "
                f"{epoch.steps}"
            )
        if self.sampler is not None:
            self.sampler.sample_rate = epoch.sample_rate
            self.sampler.batches_drawn = 0
        self.epoch = epoch
        self.steps_taken = 0
        self.optimizer.noise_multiplier = epoch.noise_multiplier

    def _check_poisson_loader(self, epoch: Epoch) -> None:
        """Refuse a loader that is not our Poisson sampler at the charged q."""
        loader = self.data_loader
        if self.sampler is None:
            raise ValueError(
                f"the ledger charged Poisson sampling at q={epoch.sample_rate}, but the data "
                "loader is not Poisson-sampled (make_private(poisson_sampling=False) gives "
                "shuffled fixed-size batches): use poisson_sampling=True"
            )
        if loader.batch_sampler is not self.sampler:
            raise ValueError("the data loader's batch sampler was replaced after the adapter's")
        rate = float(loader.sample_rate)
        if not math.isclose(rate, epoch.sample_rate, rel_tol=RATE_REL_TOL):
            raise ValueError(
                f"the data loader samples at q={rate}, the ledger charged q={epoch.sample_rate}"
            )

    def _add_noise(self) -> None:
        """The optimizer's add_noise: refuse an uncharged step, else add os.urandom noise."""
        optimizer, epoch = self.optimizer, self.epoch
        refusal = (
            "an optimizer step before begin_epoch: σ must come from the ledger's epoch first"
            if epoch is None
            else self._refusal(epoch)
        )
        if refusal is not None or epoch is None:
            # The refused step's clipped gradients are already summed into each parameter;
            # kept, they would join the next charged step's sum (a record's sensitivity 2C).
            for p in optimizer.params:
                p.grad_sample = None
                p.summed_grad = None
                p.grad = None
            raise UnchargedStep(refusal)
        # Opacus' own add_noise at σ = 0 draws nothing and does the bookkeeping (summed
        # gradient into .grad, its processed flags); our noise is added on top of it.
        optimizer.noise_multiplier = 0.0
        try:
            DPOptimizer.add_noise(optimizer)
        finally:
            optimizer.noise_multiplier = epoch.noise_multiplier
        params = [p for p in optimizer.params if p.grad is not None]
        std = epoch.noise_multiplier * float(optimizer.max_grad_norm)
        noise = gaussian_noise((sum(p.numel() for p in params),), std, dtype=torch.float64)
        offset = 0
        for p in params:
            part = noise[offset : offset + p.numel()].reshape(p.grad.shape)
            offset += p.numel()
            p.grad.add_(part.to(dtype=p.grad.dtype, device=p.grad.device))
        self.steps_taken += 1

    def _refusal(self, epoch: Epoch) -> str | None:
        """Why the step about to be taken in `epoch` was not charged, or None if it was."""
        optimizer = self.optimizer
        if self.steps_taken >= epoch.steps:
            return (
                f"step {self.steps_taken + 1} of epoch {epoch.index}: the ledger charged "
                f"{epoch.steps} steps; reserve the next epoch first"
            )
        if self.sampler is not None and self.sampler.batches_drawn <= self.steps_taken:
            return (
                "this step's batch was not drawn by the adapter's Poisson sampler: iterate the "
                "data loader given to the adapter, after begin_epoch"
            )
        if optimizer.noise_multiplier != epoch.noise_multiplier:
            return (
                f"the optimizer's noise multiplier is {optimizer.noise_multiplier}, the ledger's "
                f"epoch {epoch.index} gave {epoch.noise_multiplier}"
            )
        return None

    def report(self, epoch: Epoch) -> EpsilonReport:
        """Opacus' accountant ε and the ledger's dataset ε, both at the dataset's δ."""
        delta = epoch.dataset.delta
        return EpsilonReport(
            epoch=epoch.index,
            delta=delta,
            opacus_epsilon=float(self.privacy_engine.get_epsilon(delta)),
            ledger_epsilon_spent=epoch.epsilon_spent,
            ledger_epsilon_cap=epoch.epsilon_cap,
        )

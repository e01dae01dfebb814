"""Opacus adapter: an Opacus-wrapped optimizer that takes its σ from the ledger (needs opacus).

Opacus' `DPOptimizer` adds noise of std ``optimizer.noise_multiplier *
max_grad_norm`` and its accountant records ``optimizer.noise_multiplier`` at
every step, so setting that attribute from each ledger `Epoch` makes both the
noise and Opacus' own bookkeeping follow the ledger::

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
    import opacus  # noqa: F401  (fail here, with a clear message, if opacus is missing)
except ImportError as exc:  # pragma: no cover - exercised only without opacus
    raise ImportError(
        "trainer_client.opacus needs opacus (pip install 'privacy-ledger[opacus]')"
    ) from exc

__all__ = ["EpsilonReport", "OpacusLedgerAdapter"]


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
    """Drive an Opacus ``PrivacyEngine``-wrapped optimizer with the ledger's noise multiplier.

    `optimizer` is the ``DPOptimizer`` from ``make_private``; `data_loader`
    (optional, Opacus' ``DPDataLoader``) lets :meth:`begin_epoch` check that
    its sample rate and number of steps are what the ledger charged.
    """

    def __init__(
        self, privacy_engine: Any, optimizer: Any, *, data_loader: Any | None = None
    ) -> None:
        if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "max_grad_norm"):
            raise TypeError("optimizer must be the DPOptimizer returned by make_private()")
        self.privacy_engine = privacy_engine
        self.optimizer = optimizer
        self.data_loader = data_loader

    def begin_epoch(self, epoch: Epoch) -> None:
        """Set the optimizer's σ from `epoch`, after checking the epoch matches this training."""
        declared = epoch.max_grad_norm
        if declared is not None and not math.isclose(
            float(self.optimizer.max_grad_norm), declared, rel_tol=1e-12
        ):
            raise ValueError(
                f"the optimizer clips at {self.optimizer.max_grad_norm}, the run declared "
                f"max_grad_norm={declared}"
            )
        loader = self.data_loader
        if loader is not None:
            rate = getattr(loader, "sample_rate", None)
            if rate is not None and not math.isclose(float(rate), epoch.sample_rate, rel_tol=1e-6):
                raise ValueError(
                    f"the data loader samples at q={rate}, the ledger charged q={epoch.sample_rate}"
                )
            if len(loader) != epoch.steps:
                raise ValueError(
                    f"the data loader runs {len(loader)} steps per epoch, the ledger charged "
                    f"{epoch.steps}"
                )
        self.optimizer.noise_multiplier = epoch.noise_multiplier

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

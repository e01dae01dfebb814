"""PyTorch helpers for DP-SGD against the ledger (needs torch; the core client does not).

* `PoissonSampler` / `poisson_loader`: batches in which every record is
  included independently with probability q at every step. Batch sizes vary
  (and may be 0); this is the sampling the ledger's accounting assumes
  (Mironov, Talwar, Zhang 2019), not fixed-size shuffled batches.
* `dp_sgd_step` / `DPSGDStep`: one DP-SGD step (Abadi et al. 2016, Algorithm 1)
  for any ``nn.Module`` whose forward takes one input tensor: per-example
  gradients with ``torch.func`` (functional_call + vmap + grad_and_value),
  each clipped to L2 norm C over all parameters, summed, Gaussian noise
  N(0, (σC)²) added with σ taken only from the ledger's `Epoch`, divided by
  the expected batch size q·n, then the optimizer steps.

Per-example gradients under vmap rule out modules that mix examples or
update buffers in training (BatchNorm): use GroupNorm/LayerNorm instead, as
with Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from trainer_client.models import Epoch

__all__ = [
    "DPSGDStep",
    "PoissonSampler",
    "StepStats",
    "dp_sgd_step",
    "poisson_loader",
]

# Opacus' clip factor min(1, C / (‖g‖ + 1e-6)): the epsilon keeps a zero gradient finite.
CLIP_EPSILON = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PoissonSampler(Sampler[list[int]]):
    """A batch sampler of `steps` Poisson batches over ``range(num_samples)``.

    At every step each index is included independently with probability
    `sample_rate`, so a batch's size is Binomial(num_samples, sample_rate) and
    may be 0. Pass a seeded ``torch.Generator`` for reproducible batches (the
    same generator keeps advancing across epochs).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    @classmethod
    def for_epoch(
        cls, num_samples: int, epoch: Epoch, *, generator: torch.Generator | None = None
    ) -> PoissonSampler:
        """The sampler for one ledger epoch: its sample rate and its number of steps."""
        return cls(num_samples, epoch.sample_rate, epoch.steps, generator=generator)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample_mask().nonzero(as_tuple=True)[0].tolist()

    def sample_mask(self) -> torch.Tensor:
        """One step's inclusion mask: a bool tensor, True with probability q per index."""
        draws = torch.rand(self.num_samples, generator=self.generator)
        return draws < self.sample_rate


class _TensorBatches:
    """Poisson batches straight from tensors (no DataLoader, no per-item collation)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], sampler: PoissonSampler) -> None:
        self.tensors = tensors
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(self.sampler.steps):
            index = self.sampler.sample_mask().nonzero(as_tuple=True)[0]
            yield tuple(t.index_select(0, index.to(t.device)) for t in self.tensors)


def _empty_batch_collate(example: Any) -> Callable[[list[Any]], Any]:
    """default_collate, but an empty batch becomes zero-length tensors shaped like `example`."""
    fields = example if isinstance(example, tuple | list) else (example,)
    templates = [torch.as_tensor(field) for field in fields]

    def collate(batch: list[Any]) -> Any:
        if batch:
            return default_collate(batch)
        empty = [torch.zeros((0, *t.shape), dtype=t.dtype) for t in templates]
        return tuple(empty) if isinstance(example, tuple | list) else empty[0]

    return collate


def poisson_loader(
    data: Dataset[Any] | torch.Tensor | Sequence[torch.Tensor],
    sample_rate: float,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterable[Any]:
    """`steps` Poisson-sampled batches (probability `sample_rate` per record per step).

    `data` is a map-style ``Dataset`` (batches come from a ``DataLoader``
    with a `PoissonSampler`, empty batches as zero-length tensors) or a tensor
    / sequence of tensors sharing their first dimension (batches are tuples
    of tensors, selected without a DataLoader). Take `sample_rate` and
    `steps` from the ledger's `Epoch`.
    """
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, Sequence) and all(isinstance(t, torch.Tensor) for t in data):
        tensors = tuple(data)
        if not tensors:
            raise ValueError("poisson_loader needs at least one tensor")
        n = int(tensors[0].shape[0])
        if any(int(t.shape[0]) != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension (one row per record)")
        return _TensorBatches(tensors, PoissonSampler(n, sample_rate, steps, generator=generator))
    dataset: Dataset[Any] = data  # type: ignore[assignment]
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("poisson_loader needs a non-empty dataset")
    return DataLoader(
        dataset,
        batch_sampler=PoissonSampler(n, sample_rate, steps, generator=generator),
        collate_fn=_empty_batch_collate(dataset[0]),
        num_workers=num_workers,
    )


@dataclass(frozen=True)
class StepStats:
    """What one DP-SGD step saw: the batch size, its mean loss (None if empty), how many clipped."""

    batch_size: int
    mean_loss: float | None
    clipped: int


def _clip_norm(epoch: Epoch, max_grad_norm: float | None) -> float:
    """C: the run's declared clipping norm, or the caller's; both given must agree."""
    if epoch.max_grad_norm is not None:
        if max_grad_norm is not None and not math.isclose(
            max_grad_norm, epoch.max_grad_norm, rel_tol=1e-12
        ):
            raise ValueError(
                f"max_grad_norm={max_grad_norm} differs from the run's declared "
                f"max_grad_norm={epoch.max_grad_norm}"
            )
        return epoch.max_grad_norm
    if max_grad_norm is None:
        raise ValueError("the run declared no max_grad_norm: pass max_grad_norm=")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    return max_grad_norm


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient of its own loss, per trainable parameter, and the losses.

    Returns ``({name: tensor of shape (batch, *param.shape)}, losses of shape (batch,))``.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_of_one(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        output = functional_call(model, (p, b), (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    per_example = vmap(
        grad_and_value(loss_of_one), in_dims=(None, None, 0, 0), randomness="different"
    )
    grads, losses = per_example(params, buffers, inputs, targets)
    return grads, losses


def dp_sgd_step(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[torch.Tensor],
    *,
    epoch: Epoch,
    expected_batch_size: float,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> StepStats:
    """One DP-SGD step (Abadi et al. 2016, Alg. 1) with σ from `epoch`; sets ``.grad``, steps.

    `batch` is ``(inputs, targets)``; ``loss_fn(model(inputs), targets)``
    must return the scalar loss of a batch (it is called on batches of one).
    The noisy gradient is ``(Σ_i clip_C(g_i) + N(0, (σC)² I)) / expected_batch_size``
    with C = `max_grad_norm` (or the run's declared one) and σ =
    ``epoch.noise_multiplier``. For Poisson sampling pass the *expected*
    batch size q·n, never the sampled batch's size (that would leak it).
    An empty batch still gets its noise.
    """
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if len(batch) != 2:
        raise ValueError("batch must be (inputs, targets)")
    inputs, targets = batch[0], batch[1]
    sigma = epoch.noise_multiplier
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"the epoch's noise multiplier must be finite and >= 0, got {sigma}")
    clip = _clip_norm(epoch, max_grad_norm)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    size = int(inputs.shape[0])

    mean_loss: float | None = None
    clipped = 0
    if size > 0:
        grads, losses = per_example_gradients(model, loss_fn, inputs, targets)
        squared = torch.stack([g.reshape(size, -1).pow(2).sum(dim=1) for g in grads.values()])
        norms = squared.sum(dim=0).sqrt()
        factors = (clip / (norms + CLIP_EPSILON)).clamp(max=1.0)
        summed = {name: torch.einsum("i,i...->...", factors, g) for name, g in grads.items()}
        mean_loss = float(losses.mean().item())
        clipped = int((norms > clip).sum().item())
    else:
        summed = {name: torch.zeros_like(p) for name, p in params.items()}

    with torch.no_grad():
        for name, p in params.items():
            noise = torch.normal(
                0.0,
                sigma * clip,
                size=tuple(p.shape),
                generator=generator,
                dtype=p.dtype,
                device=p.device,
            )
            p.grad = (summed[name].to(p.dtype) + noise) / expected_batch_size
    optimizer.step()
    return StepStats(batch_size=size, mean_loss=mean_loss, clipped=clipped)


class DPSGDStep:
    """`dp_sgd_step` bound to a model, loss, optimizer and dataset size.

    ``step(batch, epoch)`` uses ``epoch.sample_rate * dataset_size`` as the
    expected batch size, so every value the privacy guarantee depends on (σ,
    q, steps) comes from the ledger.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        dataset_size: int,
        max_grad_norm: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.dataset_size = dataset_size
        self.max_grad_norm = max_grad_norm
        self.generator = generator

    def __call__(self, batch: Sequence[torch.Tensor], epoch: Epoch) -> StepStats:
        """Take one DP-SGD step on `batch` with the noise of `epoch`."""
        return dp_sgd_step(
            self.model,
            self.loss_fn,
            batch,
            epoch=epoch,
            expected_batch_size=epoch.sample_rate * self.dataset_size,
            optimizer=self.optimizer,
            max_grad_norm=self.max_grad_norm,
            generator=self.generator,
        )

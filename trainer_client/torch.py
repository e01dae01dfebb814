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

Randomness. Everything privacy-relevant here (which records a batch takes,
the gradient noise) is drawn from the operating system's CSPRNG
(``os.urandom``), never from torch's global or a caller's generator, so no
seed anywhere can regenerate it. A seeded ``torch.Generator`` is accepted for
tests only, with ``allow_insecure=True``, and warns with
`InsecureRandomnessWarning` (each noisy step; each sampler when it is made).

* The sampler includes record i iff u_i < T, u_i a uniform 63-bit integer and
  T = ⌊q·2⁶³⌋ computed exactly, so the inclusion probability T/2⁶³ is never
  above q (torch.rand's float32 grid rounds it up: 1.99·q at q = 3e-8).
* The noise is, per coordinate, the sum of four standard normals from
  Box–Muller on 53-bit uniforms, halved, computed in float64 and only then
  scaled and cast: the mitigation of Holohan & Braghin 2021 ("Secure random
  sampling in differential privacy", §5.1) that Opacus' ``secure_mode`` uses
  against reconstructing a float Gaussian sample from its bits (Jin et al.
  2022, "Are we there yet? Timing and floating-point attacks on differential
  privacy systems"). It is not a proof: a float Gaussian added to a float
  gradient is only approximately the Gaussian mechanism (Mironov 2012), and
  DP-SGD's gradients stay floats. Exact discrete noise is what the service
  uses for the releases it answers; see docs/trainer_client.md.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from trainer_client.models import Epoch

__all__ = [
    "DPSGDStep",
    "InsecureRandomnessWarning",
    "PoissonSampler",
    "StepStats",
    "dp_sgd_step",
    "gaussian_noise",
    "inclusion_threshold",
    "poisson_loader",
]

# Opacus' clip factor min(1, C / (‖g‖ + 1e-6)): the epsilon keeps a zero gradient finite.
CLIP_EPSILON = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# u_i is uniform on [0, 2**63): int64 words with the sign bit masked off.
_WORD_BITS = 63
_WORD_MASK = (1 << _WORD_BITS) - 1
# Box–Muller's uniforms: 53 bits, a float64's precision, so each is exact on the 2⁻⁵³ grid.
_UNIFORM_BITS = 53
# Four normals per noise coordinate, summed and halved (Holohan & Braghin 2021, §5.1, n = 2).
_NORMALS_PER_COORDINATE = 4
# Noise coordinates drawn per chunk: bounds the float64 temporaries to a few tens of MB.
_NOISE_CHUNK = 1 << 18


class InsecureRandomnessWarning(UserWarning):
    """A seeded generator drew privacy-relevant randomness: the result is not private.

    Raised as a warning only where the caller opted in with
    ``allow_insecure=True`` (tests that need reproducible batches or noise).
    """


def _checked_generator(
    generator: torch.Generator | None, allow_insecure: bool, what: str
) -> torch.Generator | None:
    """`generator` if the caller opted in to it (with a warning), None for the CSPRNG."""
    if generator is None:
        return None
    if not allow_insecure:
        raise ValueError(
            f"a torch.Generator for the {what} makes it reproducible by whoever knows its "
            "seed, so it is not private: leave it out (the default draws from os.urandom), "
            "or pass allow_insecure=True in tests"
        )
    warnings.warn(
        f"the {what} comes from a seeded torch.Generator (allow_insecure=True): "
        "this training is NOT differentially private",
        InsecureRandomnessWarning,
        stacklevel=3,
    )
    return generator


def _random_words(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` uniform 64-bit words as int64: from os.urandom, or from an opted-in generator."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    if generator is None:
        # One read for the whole request: os.urandom costs a system call per call, not per byte.
        return torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    raw = torch.randint(0, 256, (8 * count,), dtype=torch.uint8, generator=generator)
    return raw.view(torch.int64)


def _uniforms(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` float64 uniforms on (0, 1], multiples of 2⁻⁵³ (never 0, so log(u) is finite)."""
    words = _random_words(count, generator) & ((1 << _UNIFORM_BITS) - 1)
    return words.to(torch.float64).add_(1.0).mul_(2.0**-_UNIFORM_BITS)


def _summed_normal_block(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """`size` float64 values, each the sum of 4 normals from 4 different Box–Muller pairs, / 2.

    A pair (u, v) gives two independent normals r·cos θ and r·sin θ
    (r = √(-2 ln u), θ = 2πv). Adding both of one pair would be a single
    normal in disguise (a function of two uniforms only), so groups of four
    pairs feed two coordinates: Σ r_i cos θ_i to one, Σ r_i sin θ_i to the
    other, and every coordinate depends on eight uniforms.
    """
    groups = (size + 1) // 2
    pairs = _NORMALS_PER_COORDINATE * groups
    u = _uniforms(2 * pairs, generator)
    radius = u[:pairs].log_().mul_(-2.0).sqrt_()
    angle = u[pairs:].mul_(2.0 * math.pi)
    cosines = (radius * torch.cos(angle)).view(_NORMALS_PER_COORDINATE, groups).sum(dim=0)
    sines = radius.mul_(angle.sin_()).view(_NORMALS_PER_COORDINATE, groups).sum(dim=0)
    return torch.cat((cosines, sines))[:size].mul_(0.5)


def gaussian_noise(
    shape: Sequence[int],
    std: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    allow_insecure: bool = False,
) -> torch.Tensor:
    """N(0, std²) noise of `shape` from os.urandom: per coordinate (z₁+z₂+z₃+z₄)/2, then × std.

    Summing four Box–Muller normals in float64 before scaling and casting is
    Holohan & Braghin's (2021, §5.1) mitigation of the floating-point attack
    on a single Gaussian draw; it raises that attack's cost, it does not make
    float noise exact (see the module docstring). A `generator` is refused
    unless ``allow_insecure=True`` (then it warns): seeded noise is no noise.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    source = _checked_generator(generator, allow_insecure, "noise")
    flat = _summed_normals(math.prod(shape), source) * std
    return flat.to(dtype).reshape(tuple(shape)).to(device)


def _summed_normals(numel: int, generator: torch.Generator | None) -> torch.Tensor:
    """`numel` float64 N(0, 1) values, each (z₁+z₂+z₃+z₄)/2, drawn chunk by chunk."""
    out = torch.empty(numel, dtype=torch.float64)
    for start in range(0, numel, _NOISE_CHUNK):
        size = min(_NOISE_CHUNK, numel - start)
        out[start : start + size] = _summed_normal_block(size, generator)
    return out


def inclusion_threshold(sample_rate: float) -> int:
    """T = ⌊q·2⁶³⌋, exactly: a record is in a batch iff its 63-bit uniform u < T.

    P[u < T] = T/2⁶³ ≤ q by construction, and within 2⁻⁶³ of it. The float
    `sample_rate` is read as the exact rational it stores (no rounding up).
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return math.floor(Fraction(sample_rate) * (1 << _WORD_BITS))


class PoissonSampler(Sampler[list[int]]):
    """A batch sampler of `steps` Poisson batches over ``range(num_samples)``.

    At every step each index is included independently with probability
    T/2⁶³ ≤ `sample_rate` (`inclusion_threshold`), from os.urandom, so a
    batch's size is Binomial(num_samples, q) and may be 0. A seeded
    ``torch.Generator`` (reproducible batches, for tests) needs
    ``allow_insecure=True`` and warns: whoever knows its seed knows the batches,
    and the accounting's amplification by sampling assumes they do not.
    `batches_drawn` counts the batches handed out (the Opacus adapter checks it).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        allow_insecure: bool = False,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate  # validated (and T computed) by the property's setter
        self.steps = steps
        self.generator = _checked_generator(generator, allow_insecure, "batch sampling")
        self.batches_drawn = 0

    @property
    def sample_rate(self) -> float:
        """The charged q (the inclusion probability is `threshold`/2⁶³ ≤ q)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        self.threshold = inclusion_threshold(value)
        self._sample_rate = value

    @classmethod
    def for_epoch(
        cls,
        num_samples: int,
        epoch: Epoch,
        *,
        generator: torch.Generator | None = None,
        allow_insecure: bool = False,
    ) -> PoissonSampler:
        """The sampler for one ledger epoch: its sample rate and its number of steps."""
        return cls(
            num_samples,
            epoch.sample_rate,
            epoch.steps,
            generator=generator,
            allow_insecure=allow_insecure,
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample_mask().nonzero(as_tuple=True)[0].tolist()

    def sample_mask(self) -> torch.Tensor:
        """One step's inclusion mask: a bool tensor, True with probability T/2⁶³ ≤ q per index."""
        self.batches_drawn += 1
        if self.threshold > _WORD_MASK:  # q = 1: T = 2⁶³ does not fit an int64, and u < T always
            return torch.ones(self.num_samples, dtype=torch.bool)
        words = _random_words(self.num_samples, self.generator) & _WORD_MASK
        return words < self.threshold


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
    allow_insecure: bool = False,
    num_workers: int = 0,
) -> Iterable[Any]:
    """`steps` Poisson-sampled batches (probability ≤ `sample_rate` per record per step).

    `data` is a map-style ``Dataset`` (batches come from a ``DataLoader``
    with a `PoissonSampler`, empty batches as zero-length tensors) or a tensor
    / sequence of tensors sharing their first dimension (batches are tuples
    of tensors, selected without a DataLoader). Take `sample_rate` and
    `steps` from the ledger's `Epoch`. The batches come from os.urandom; a
    seeded `generator` needs ``allow_insecure=True`` (tests only; it warns).
    """

    def sampler(n: int) -> PoissonSampler:
        return PoissonSampler(
            n, sample_rate, steps, generator=generator, allow_insecure=allow_insecure
        )

    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, Sequence) and all(isinstance(t, torch.Tensor) for t in data):
        tensors = tuple(data)
        if not tensors:
            raise ValueError("poisson_loader needs at least one tensor")
        n = int(tensors[0].shape[0])
        if any(int(t.shape[0]) != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension (one row per record)")
        return _TensorBatches(tensors, sampler(n))
    dataset: Dataset[Any] = data  # type: ignore[assignment]
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("poisson_loader needs a non-empty dataset")
    return DataLoader(
        dataset,
        batch_sampler=sampler(n),
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
    noise_generator: torch.Generator | None = None,
    allow_insecure: bool = False,
) -> StepStats:
    """One DP-SGD step (Abadi et al. 2016, Alg. 1) with σ from `epoch`; sets ``.grad``, steps.

    `batch` is ``(inputs, targets)``; ``loss_fn(model(inputs), targets)``
    must return the scalar loss of a batch (it is called on batches of one).
    The noisy gradient is ``(Σ_i clip_C(g_i) + N(0, (σC)² I)) / expected_batch_size``
    with C = `max_grad_norm` (or the run's declared one) and σ =
    ``epoch.noise_multiplier``. For Poisson sampling pass the *expected*
    batch size q·n, never the sampled batch's size (that would leak it).
    An empty batch still gets its noise.

    The noise is `gaussian_noise`'s, from os.urandom. A seeded
    `noise_generator` is refused unless ``allow_insecure=True`` (tests only):
    then it warns with `InsecureRandomnessWarning`, since whoever knows the
    seed can subtract the noise.
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
    source = _checked_generator(noise_generator, allow_insecure, "noise")
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

    # One draw for every parameter together: one os.urandom read per chunk, not per tensor.
    noise = _summed_normals(sum(p.numel() for p in params.values()), source) * (sigma * clip)
    with torch.no_grad():
        offset = 0
        for name, p in params.items():
            part = noise[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
            noisy = summed[name].to(p.dtype) + part.to(dtype=p.dtype, device=p.device)
            p.grad = noisy / expected_batch_size
    optimizer.step()
    return StepStats(batch_size=size, mean_loss=mean_loss, clipped=clipped)


class DPSGDStep:
    """`dp_sgd_step` bound to a model, loss, optimizer and dataset size.

    ``step(batch, epoch)`` uses ``epoch.sample_rate * dataset_size`` as the
    expected batch size, so every value the privacy guarantee depends on (σ,
    q, steps) comes from the ledger. The noise comes from os.urandom; a seeded
    `noise_generator` needs ``allow_insecure=True`` (tests only; it warns).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        dataset_size: int,
        max_grad_norm: float | None = None,
        noise_generator: torch.Generator | None = None,
        allow_insecure: bool = False,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        if noise_generator is not None and not allow_insecure:
            _checked_generator(noise_generator, allow_insecure, "noise")  # raises: say so now
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.dataset_size = dataset_size
        self.max_grad_norm = max_grad_norm
        self.noise_generator = noise_generator
        self.allow_insecure = allow_insecure

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
            noise_generator=self.noise_generator,
            allow_insecure=self.allow_insecure,
        )

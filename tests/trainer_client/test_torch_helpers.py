"""The PyTorch helpers, numerically: Poisson batches, per-example clipping, the noise's scale.

The batches and the noise come from os.urandom, so the statistical tests see fresh draws on
every run; their bounds are set for false alarms of about one in a million.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from tests.trainer_client import fake_ledger  # noqa: E402
from trainer_client.models import Epoch  # noqa: E402
from trainer_client.torch import (  # noqa: E402
    CLIP_EPSILON,
    DPSGDStep,
    PoissonSampler,
    dp_sgd_step,
    per_example_gradients,
    poisson_loader,
)


def make_epoch(
    noise_multiplier: float,
    *,
    max_grad_norm: float | None = 1.0,
    sample_rate: float = 0.1,
    steps: int = 10,
) -> Epoch:
    return fake_ledger.make_epoch(
        noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate, steps=steps
    )


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def per_example_loop_reference(
    model: nn.Module, loss_fn: Any, x: Any, y: Any, clip: float
) -> dict[str, Any]:
    """Σ_i clip_C(∇ℓ_i) computed one example at a time with plain autograd."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {}
        for name, p in model.named_parameters():
            assert p.grad is not None
            grads[name] = p.grad.detach().clone()
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        factor = min(1.0, clip / (norm + CLIP_EPSILON))
        for name, g in grads.items():
            total[name] += factor * g
    model.zero_grad()
    return total


def test_per_example_gradients_match_a_loop() -> None:
    model = small_model()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    grads, losses = per_example_gradients(model, loss_fn, x, y)
    for i in range(7):
        model.zero_grad()
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        assert float(losses[i]) == pytest.approx(loss.item(), abs=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0], ids=["all-clipped", "some", "none"])
def test_clipped_sum_matches_an_explicit_per_example_loop(clip: float) -> None:
    model = small_model()
    x = torch.randn(16, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    expected = per_example_loop_reference(model, loss_fn, x, y, clip)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the parameters fixed
    stats = dp_sgd_step(
        model,
        loss_fn,
        (x, y),
        epoch=make_epoch(0.0, max_grad_norm=clip),  # σ = 0: the clipped sum alone
        expected_batch_size=4.0,
        optimizer=optimizer,
    )
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad * 4.0, expected[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(p.detach(), before[name])
    assert stats.batch_size == 16 and stats.mean_loss is not None
    if clip == 0.05:
        assert stats.clipped == 16
    if clip == 100.0:
        assert stats.clipped == 0


def test_the_optimizer_steps_on_the_noisy_gradient() -> None:
    model = small_model()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    dp_sgd_step(
        model,
        nn.CrossEntropyLoss(),
        (x, y),
        epoch=make_epoch(1.0),
        expected_batch_size=4.0,
        optimizer=optimizer,
    )
    for p, old in zip(model.parameters(), before, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.detach(), old - 0.5 * p.grad)


class ZeroGradient(nn.Module):
    """A model whose loss does not depend on its parameters: the update is pure noise."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=torch.float64))

    def forward(self, x: Any) -> Any:
        return x.sum(dim=1) + 0.0 * self.weight.sum()


@pytest.mark.parametrize(("sigma", "clip"), [(1.3, 0.7), (0.5, 4.0)])
def test_noise_standard_deviation_is_sigma_times_clip(sigma: float, clip: float) -> None:
    size = 50_000
    model = ZeroGradient(size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(3, 2, dtype=torch.float64)

    def mse(out: Any, target: Any) -> Any:
        return ((out - target) ** 2).mean()

    expected_batch = 2.5
    dp_sgd_step(
        model,
        mse,
        (x, torch.zeros(3, dtype=torch.float64)),
        epoch=make_epoch(sigma, max_grad_norm=clip),
        expected_batch_size=expected_batch,
        optimizer=optimizer,
    )
    assert model.weight.grad is not None
    noise = model.weight.grad * expected_batch  # undo the division by q·n
    std = sigma * clip
    # (N-1)s²/σ² ~ χ²(N-1): the sample variance's relative sd is √(2/(N-1)) ≈ 0.63 %;
    # allow 5 of those. The mean's sd is std/√N.
    variance = float(noise.var())
    assert abs(variance / std**2 - 1.0) < 5 * math.sqrt(2 / (size - 1))
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(size)
    # And Gaussian, not just the right scale: about 68.27 % within one sd.
    within = float((noise.abs() < std).double().mean())
    assert within == pytest.approx(0.6827, abs=5 * math.sqrt(0.6827 * 0.3173 / size))


def test_an_empty_batch_gets_noise_only() -> None:
    model = ZeroGradient(20_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    empty = (torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    stats = dp_sgd_step(
        model,
        lambda out, target: ((out - target) ** 2).mean(),
        empty,
        epoch=make_epoch(2.0, max_grad_norm=0.5),
        expected_batch_size=1.0,
        optimizer=optimizer,
    )
    assert stats.batch_size == 0 and stats.mean_loss is None and stats.clipped == 0
    assert model.weight.grad is not None
    assert float(model.weight.grad.std()) == pytest.approx(1.0, rel=0.05)


def test_noise_comes_from_the_epoch_and_clip_norm_must_agree() -> None:
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = (torch.randn(2, 5, dtype=torch.float64), torch.randint(0, 3, (2,)))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="differs from the run's declared"):
        dp_sgd_step(
            model,
            loss_fn,
            batch,
            epoch=make_epoch(1.0, max_grad_norm=1.0),
            max_grad_norm=2.0,
            expected_batch_size=2.0,
            optimizer=optimizer,
        )
    with pytest.raises(ValueError, match="pass max_grad_norm"):
        dp_sgd_step(
            model,
            loss_fn,
            batch,
            epoch=make_epoch(1.0, max_grad_norm=None),
            expected_batch_size=2.0,
            optimizer=optimizer,
        )
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp_sgd_step(
            model, loss_fn, batch, epoch=make_epoch(1.0), expected_batch_size=0, optimizer=optimizer
        )


def test_dpsgd_step_uses_the_expected_batch_size_from_the_epoch() -> None:
    model = ZeroGradient(40_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = DPSGDStep(
        model,
        lambda out, target: ((out - target) ** 2).mean(),
        optimizer,
        dataset_size=1000,
    )
    batch = (torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    step(batch, make_epoch(1.0, max_grad_norm=1.0, sample_rate=0.02))
    assert model.weight.grad is not None
    # std = σC / (q·n) = 1 / 20
    assert float(model.weight.grad.std()) == pytest.approx(1 / 20, rel=0.05)


# Poisson sampling ---------------------------------------------------------------------------


def test_poisson_batch_sizes_are_binomial() -> None:
    n, q, steps = 1000, 0.05, 4000
    sampler = PoissonSampler(n, q, steps)
    batches = list(sampler)
    assert len(batches) == steps == len(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    # Mean: sd of the sample mean is √(var/steps). Variance: relative sd ≈ √(2/steps)
    # (the binomial is near-normal here, excess kurtosis ≈ 0.02).
    assert abs(float(sizes.mean()) - mean) < 5 * math.sqrt(var / steps)
    assert abs(float(sizes.var()) / var - 1) < 5 * math.sqrt(2 / steps)
    # Each record is included independently at rate q: per-record counts ~ Binomial(steps, q).
    counts = torch.zeros(n)
    for batch in batches:
        assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
        counts[batch] += 1
    per_record_sd = math.sqrt(steps * q * (1 - q))
    assert abs(float(counts.mean()) - steps * q) < 5 * per_record_sd / math.sqrt(n)
    assert float(counts.std()) == pytest.approx(per_record_sd, rel=0.15)


def test_poisson_batch_sizes_pass_a_chi_square_test() -> None:
    n, q, steps = 20, 0.1, 5000
    sampler = PoissonSampler(n, q, steps)
    observed = [0] * (n + 1)
    for batch in sampler:
        observed[len(batch)] += 1
    pmf = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]
    # Pool the tail into one bin so every expected count is at least 5.
    cut = next(k for k in range(n + 1) if steps * sum(pmf[k:]) < 5 or steps * pmf[k] < 5)
    expected = [steps * p for p in pmf[:cut]] + [steps * sum(pmf[cut:])]
    seen = [*observed[:cut], sum(observed[cut:])]
    statistic = sum((o - e) ** 2 / e for o, e in zip(seen, expected, strict=True))
    dof = len(expected) - 1
    # 99.9999th percentile of χ²(dof), Wilson–Hilferty approximation: the batches come from
    # os.urandom, so this test sees fresh draws every run and may fail once in a million.
    z = 4.753
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert statistic < critical, (statistic, critical, seen, expected)
    assert observed[0] > 0  # empty batches happen (P = 0.9^20 ≈ 12 %) and are kept


def test_poisson_loader_over_tensors_gives_variable_and_empty_batches() -> None:
    x = torch.arange(30, dtype=torch.float32).reshape(15, 2)
    y = torch.arange(15)
    loader = poisson_loader((x, y), 0.1, 200)
    batches = list(loader)
    assert len(batches) == 200 == len(loader)  # type: ignore[arg-type]
    sizes = {int(b[0].shape[0]) for b in batches}
    assert 0 in sizes and len(sizes) > 3
    for bx, by in batches:
        assert bx.shape == (by.shape[0], 2)
        torch.testing.assert_close(bx[:, 0], (by * 2).float())  # rows stay paired


def test_poisson_loader_over_a_dataset_collates_empty_batches() -> None:
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = poisson_loader(data, 0.05, 100)
    shapes = [(tuple(bx.shape), tuple(by.shape), by.dtype) for bx, by in loader]
    assert ((0, 3), (0,), torch.int64) in shapes
    assert any(s[0][0] > 0 for s in shapes)


def test_poisson_sampler_for_an_epoch_and_its_arguments() -> None:
    sampler = PoissonSampler.for_epoch(100, make_epoch(1.0, sample_rate=0.2, steps=7))
    assert (sampler.sample_rate, len(sampler)) == (0.2, 7)
    with pytest.raises(ValueError):
        PoissonSampler(10, 0.0, 5)
    with pytest.raises(ValueError):
        PoissonSampler(10, 1.5, 5)
    with pytest.raises(ValueError, match="same first dimension"):
        poisson_loader((torch.zeros(3), torch.zeros(4)), 0.5, 1)

"""DP-SGD's randomness is secure by default: noise and batches from os.urandom, q never rounded up.

A seeded generator makes noise that whoever knows the seed can subtract, and batches the
accounting's amplification assumes are secret; these tests check that no seed (torch's global,
a caller's generator, the example's --seed) reaches either unless a test opts in, loudly.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
from collections.abc import Iterator
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import trainer_client.torch as helpers  # noqa: E402
from tests.trainer_client import fake_ledger  # noqa: E402
from trainer_client.models import Epoch  # noqa: E402
from trainer_client.torch import (  # noqa: E402
    DPSGDStep,
    InsecureRandomnessWarning,
    PoissonSampler,
    dp_sgd_step,
    gaussian_noise,
    inclusion_threshold,
    poisson_loader,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_dp_sgd.py"


def make_epoch(
    sigma: float = 1.0, *, sample_rate: float = 0.1, steps: int = 10, index: int = 1
) -> Epoch:
    return fake_ledger.make_epoch(sigma, sample_rate=sample_rate, steps=steps, index=index)


class ZeroGradient(nn.Module):
    """A model whose loss does not depend on its parameters: its gradient is the noise alone."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=torch.float64))

    def forward(self, x: Any) -> Any:
        return x.sum(dim=1) + 0.0 * self.weight.sum()


def mse(out: Any, target: Any) -> Any:
    return ((out - target) ** 2).mean()


def noise_of_one_step(seed: int, **options: Any) -> Any:
    """The noise of one dp_sgd_step after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    model = ZeroGradient(2_000)
    batch = (torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    dp_sgd_step(
        model,
        mse,
        batch,
        epoch=make_epoch(1.0),
        expected_batch_size=1.0,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        **options,
    )
    assert model.weight.grad is not None
    return model.weight.grad.clone()


# The noise -----------------------------------------------------------------------------------


def test_two_runs_with_the_same_seed_get_different_noise() -> None:
    first, second = noise_of_one_step(0), noise_of_one_step(0)
    assert float(first.std()) == pytest.approx(1.0, rel=0.1)  # it is noise, at σC = 1
    # Independent N(0, 1) draws: equal coordinates would take a collision of 53-bit floats.
    assert int((first == second).sum()) == 0


def test_the_noise_leaves_torch_global_generator_alone_and_reads_os_urandom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requested: list[int] = []
    real_urandom = os.urandom

    def counting_urandom(size: int) -> bytes:
        requested.append(size)
        return real_urandom(size)

    monkeypatch.setattr(os, "urandom", counting_urandom)  # what trainer_client.torch reads
    state = torch.get_rng_state()
    noise_of_one_step(0)
    # 4 normals per coordinate from 2 Box–Muller pairs, 8 bytes per uniform: 32 bytes each.
    assert sum(requested) == 32 * 2_000
    torch.testing.assert_close(torch.get_rng_state(), state)  # torch's generator never drawn


def test_a_seeded_noise_generator_is_refused_without_the_opt_in() -> None:
    generator = torch.Generator().manual_seed(0)
    model = ZeroGradient(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="allow_insecure=True"):
        noise_of_one_step(0, noise_generator=generator)
    with pytest.raises(ValueError, match="not private"):
        DPSGDStep(model, mse, optimizer, dataset_size=10, noise_generator=generator)
    with pytest.raises(ValueError, match="allow_insecure=True"):
        gaussian_noise((5,), 1.0, generator=generator)


def test_an_opted_in_seeded_noise_generator_warns_and_is_what_draws_the_noise() -> None:
    with pytest.warns(InsecureRandomnessWarning, match="NOT differentially private"):
        first = noise_of_one_step(1, noise_generator=torch.Generator().manual_seed(7), **OPT_IN)
    with pytest.warns(InsecureRandomnessWarning):
        second = noise_of_one_step(2, noise_generator=torch.Generator().manual_seed(7), **OPT_IN)
    torch.testing.assert_close(first, second)  # the seed alone fixes it: that is the danger
    model = ZeroGradient(10)
    with pytest.warns(InsecureRandomnessWarning):
        step = DPSGDStep(
            model,
            mse,
            torch.optim.SGD(model.parameters(), lr=0.0),
            dataset_size=10,
            noise_generator=torch.Generator().manual_seed(7),
            allow_insecure=True,
        )
        step((torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)), EPOCH)


OPT_IN: dict[str, Any] = {"allow_insecure": True}
EPOCH = make_epoch(1.0)


def chi_square_critical(dof: int, z: float = 4.753) -> float:
    """The (1 - 1e-6) quantile of χ²(dof), by Wilson–Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_the_noise_is_standard_normal_in_distribution() -> None:
    size = 200_000
    noise = gaussian_noise((size,), 3.0, dtype=torch.float64) / 3.0
    boundaries = [k / 4 for k in range(-12, 13)]  # 26 bins of N(0, 1), the outer two open
    cdf = [0.0, *(0.5 * (1 + math.erf(x / math.sqrt(2))) for x in boundaries), 1.0]
    expected = [size * (hi - lo) for lo, hi in pairwise(cdf)]
    bins = torch.bucketize(noise, torch.tensor(boundaries, dtype=torch.float64), right=True)
    observed = torch.bincount(bins, minlength=len(expected)).tolist()
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    assert statistic < chi_square_critical(len(expected) - 1), statistic


def test_the_two_coordinates_sharing_box_muller_pairs_are_uncorrelated() -> None:
    # A block of 2g coordinates: coordinate k takes Σ r cos θ and k + g takes Σ r sin θ of
    # the same four pairs, which are independent normals; their correlation is ~N(0, 1/g).
    g = helpers._NOISE_CHUNK // 2
    noise = gaussian_noise((2 * g,), 1.0, dtype=torch.float64)
    correlation = float(torch.corrcoef(torch.stack((noise[:g], noise[g:])))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(g)


# The sampler ---------------------------------------------------------------------------------


# 3e-8: where torch.rand's float32 grid included records at ⌈q·2²⁴⌉/2²⁴ = 1.99·q.
@pytest.mark.parametrize("q", [3e-8, 0.1, 1 / 3, 0.999999, 2**-70])
def test_the_inclusion_threshold_is_never_above_q(q: float) -> None:
    threshold = inclusion_threshold(q)
    assert PoissonSampler(10, q, 1).threshold == threshold
    rate = Fraction(threshold, 2**63)
    assert rate <= Fraction(q)  # the float q read exactly, no rounding up anywhere
    assert Fraction(q) - rate < Fraction(1, 2**63)


def test_a_record_is_included_iff_its_word_is_below_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampler = PoissonSampler(4, 0.25, 1)
    threshold = sampler.threshold
    assert threshold == 2**61
    # The sign bit is masked off: -2**63 + w reads as w.
    words = torch.tensor([threshold - 1, threshold, threshold + 1, -(2**63) + threshold - 1])
    monkeypatch.setattr(helpers, "_random_words", lambda count, generator: words[:count])
    assert sampler.sample_mask().tolist() == [True, False, False, True]


def test_q_1_includes_every_record_at_every_step() -> None:
    sampler = PoissonSampler(1_000, 1.0, 5)
    assert [len(batch) for batch in sampler] == [1_000] * 5
    assert sampler.batches_drawn == 5


def test_a_seeded_sampler_is_refused_without_opt_in_and_warns_with_it() -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch sampling"):
        PoissonSampler(10, 0.5, 3, generator=generator)
    with pytest.raises(ValueError, match="allow_insecure=True"):
        poisson_loader(torch.zeros(10, 2), 0.5, 3, generator=generator)
    with pytest.warns(InsecureRandomnessWarning, match="batch sampling"):
        first = list(
            PoissonSampler(50, 0.5, 3, generator=torch.Generator().manual_seed(4), **OPT_IN)
        )
    with pytest.warns(InsecureRandomnessWarning):
        again = list(
            PoissonSampler(50, 0.5, 3, generator=torch.Generator().manual_seed(4), **OPT_IN)
        )
    assert first == again
    # Unseeded: two samplers after the same global seed still draw different batches.
    torch.manual_seed(0)
    a = list(PoissonSampler(200, 0.5, 2))
    torch.manual_seed(0)
    b = list(PoissonSampler(200, 0.5, 2))
    assert a != b


# The example ---------------------------------------------------------------------------------


class OneEpochRun:
    """Stands in for a ledger Run: `epochs` epochs at q = 1, so every batch is the whole data."""

    epochs = 2

    def iterate(self, epochs: int | None = None) -> Iterator[Epoch]:
        for index in range(1, self.epochs + 1):
            yield make_epoch(1.0, sample_rate=1.0, steps=3, index=index)


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_dp_sgd", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_seed_fixes_the_data_and_initial_weights_but_reaches_no_noise() -> None:
    example = load_example()
    args = argparse.Namespace(seed=0, records=64, lr=0.5, max_grad_norm=1.0, beyond_plan=False)
    untrained = example.initial_model(0)
    torch.testing.assert_close(untrained.state_dict(), example.initial_model(0).state_dict())
    # q = 1: the same data, the same batches, the same initial weights; only the noise differs.
    first = example.train(OneEpochRun(), args, io.StringIO())
    second = example.train(OneEpochRun(), args, io.StringIO())
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert not torch.equal(a, b), name
        assert not torch.equal(a, untrained.state_dict()[name]), name


def test_the_example_help_says_what_the_seed_reaches(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed" in text and "never the noise" in text

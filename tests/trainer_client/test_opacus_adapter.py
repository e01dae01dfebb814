"""The Opacus adapter: the ledger's σ drives Opacus' noise and accountant; only charged steps run.

The adapter puts os.urandom noise and our Poisson sampler into Opacus' optimizer and loader
(Opacus' secure_mode needs torchcsprng, which has no wheel for torch 2.13), and refuses a
loader or a step that the ledger did not charge.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tests.trainer_client import fake_ledger  # noqa: E402
from tests.trainer_client.fake_ledger import dataset_body  # noqa: E402
from trainer_client.models import Epoch  # noqa: E402
from trainer_client.opacus import OpacusLedgerAdapter, UnchargedStep  # noqa: E402
from trainer_client.torch import PoissonSampler  # noqa: E402

N, BATCH = 64, 8  # Opacus' Poisson loader: q = 1/len(loader) = 8/64, 8 steps per epoch


def epoch_for(
    sigma: float,
    *,
    index: int = 1,
    sample_rate: float = 0.125,
    steps: int = 8,
    clip: float = 1.0,
    sampling: str = "poisson",
) -> Epoch:
    dataset = dataset_body(epsilon_spent=1.5, epsilon_cap=8.0, delta=1e-5)
    return fake_ledger.make_epoch(
        sigma,
        index=index,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=clip,
        sampling=sampling,
        dataset=dataset,
    )


def make_private(
    *,
    poisson_sampling: bool = True,
    batch: int = BATCH,
    features: int = 4,
    **options: Any,
) -> tuple[Any, Any, Any, Any]:
    """Opacus' make_private over N random records; returns (engine, model, optimizer, loader)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(N, features), torch.randint(0, 2, (N,)))
    loader = DataLoader(data, batch, shuffle=not poisson_sampling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": the adapter replaces it
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.3,  # replaced by the ledger's σ each epoch
            max_grad_norm=1.0,
            poisson_sampling=poisson_sampling,
            **options,
        )
    return engine, model, optimizer, loader


@pytest.fixture
def private() -> tuple[Any, Any, Any, Any]:
    return make_private()


def one_step(model: Any, optimizer: Any, x: Any, y: Any) -> None:
    """Forward, backward and optimizer.step() on one batch."""
    criterion: Any = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' backward-hook notice
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def parameters(model: Any) -> list[Any]:
    return [p.detach().clone() for p in model.parameters()]


def train_one_epoch(model: Any, optimizer: Any, loader: Any) -> None:
    criterion: Any = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' backward-hook notice
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()


def test_each_epoch_takes_its_noise_multiplier_from_the_ledger(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, model, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    for index, sigma in [(1, 1.7), (2, 2.2)]:
        epoch = epoch_for(sigma, index=index)
        adapter.begin_epoch(epoch)
        assert optimizer.noise_multiplier == sigma
        train_one_epoch(model, optimizer, loader)
    # Opacus' own accountant recorded the ledger's σ for every step.
    assert engine.accountant.history == [(1.7, 0.125, 8), (2.2, 0.125, 8)]

    report = adapter.report(epoch_for(2.2, index=2))
    reference = RDPAccountant()
    reference.history = [(1.7, 0.125, 8), (2.2, 0.125, 8)]
    assert report.opacus_epsilon == pytest.approx(reference.get_epsilon(1e-5))
    assert (report.ledger_epsilon_spent, report.ledger_epsilon_cap) == (1.5, 8.0)
    assert report.delta == 1e-5 and report.epoch == 2
    assert "Opacus ε=" in str(report) and "ledger ε=1.500 of 8.000" in str(report)


def test_mismatches_with_what_the_ledger_charged_are_refused(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, _, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with pytest.raises(ValueError, match="clips at"):
        adapter.begin_epoch(epoch_for(1.0, clip=2.0))
    with pytest.raises(ValueError, match="samples at"):
        adapter.begin_epoch(epoch_for(1.0, sample_rate=0.01))
    with pytest.raises(ValueError, match="runs 8 steps"):
        adapter.begin_epoch(epoch_for(1.0, steps=5))
    assert optimizer.noise_multiplier == 0.3  # untouched by a refused epoch
    with pytest.raises(TypeError):
        OpacusLedgerAdapter(
            engine, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), data_loader=loader
        )


def test_the_adapter_puts_our_poisson_sampler_in_opacus_loader(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, _, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    assert isinstance(loader.batch_sampler, PoissonSampler) and len(loader) == 8
    adapter.begin_epoch(epoch_for(1.0))
    assert loader.batch_sampler.threshold == 2**60  # q = 1/8 exactly: ⌊q·2⁶³⌋
    sizes = [int(x.shape[0]) for x, _ in loader]
    assert len(sizes) == 8 and sum(sizes) > 0 and loader.batch_sampler.batches_drawn == 8


def test_a_shuffled_loader_is_refused_for_a_poisson_charged_epoch() -> None:
    engine, _, optimizer, loader = make_private(poisson_sampling=False)
    assert not hasattr(loader, "sample_rate")  # no rate to compare: it must still be refused
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with pytest.raises(ValueError, match="not Poisson-sampled"):
        adapter.begin_epoch(epoch_for(1.0, sample_rate=0.1, steps=len(loader)))
    assert optimizer.noise_multiplier == 0.3


def test_a_rate_mismatch_is_refused_for_a_poisson_charged_epoch(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, _, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with pytest.raises(ValueError, match=r"samples at q=0\.125, the ledger charged q=0\.1"):
        adapter.begin_epoch(epoch_for(1.0, sample_rate=0.1))
    with pytest.raises(ValueError, match="samples at"):
        adapter.begin_epoch(epoch_for(1.0, sample_rate=0.125 * (1 + 1e-6)))
    assert optimizer.noise_multiplier == 0.3 and adapter.epoch is None


def test_a_shuffle_epoch_needs_a_shuffled_loader_of_the_charged_steps() -> None:
    engine, model, optimizer, loader = make_private(poisson_sampling=False)
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with pytest.raises(ValueError, match="runs 8 steps"):
        adapter.begin_epoch(epoch_for(1.0, sampling="shuffle", steps=9))
    adapter.begin_epoch(epoch_for(1.5, sampling="shuffle", steps=8))
    train_one_epoch(model, optimizer, loader)
    assert adapter.steps_taken == 8 and optimizer.noise_multiplier == 1.5

    engine, _, optimizer, loader = make_private()
    poisson = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    with pytest.raises(ValueError, match="Poisson-sampled"):
        poisson.begin_epoch(epoch_for(1.0, sampling="shuffle", steps=8))
    with pytest.raises(ValueError, match="unknown sampling"):
        poisson.begin_epoch(epoch_for(1.0, sampling="stratified"))


def test_a_step_before_the_first_begin_epoch_is_refused(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, model, optimizer, loader = private
    OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    x, y = next(iter(loader))
    before = parameters(model)
    with pytest.raises(UnchargedStep, match="before begin_epoch"):
        one_step(model, optimizer, x, y)
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), old)  # σ = 0.3 from make_private never ran
    assert engine.accountant.history == []


def test_a_step_beyond_the_charged_steps_is_refused_not_taken(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, model, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    adapter.begin_epoch(epoch_for(1.7))
    train_one_epoch(model, optimizer, loader)
    assert adapter.steps_taken == 8
    x, y = next(iter(loader))  # a 9th batch, drawn by our sampler
    before = parameters(model)
    with pytest.raises(UnchargedStep, match="step 9 of epoch 1: the ledger charged 8"):
        one_step(model, optimizer, x, y)
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), old)
        # Its clipped sum is dropped, not carried into the next charged step's sum.
        assert p.summed_grad is None and p.grad_sample is None and p.grad is None
    assert engine.accountant.history == [(1.7, 0.125, 8)]  # Opacus counted 8 steps, not 9
    adapter.begin_epoch(epoch_for(1.7, index=2))  # the next charged epoch goes on
    train_one_epoch(model, optimizer, loader)
    assert engine.accountant.history == [(1.7, 0.125, 16)]


def test_a_batch_the_poisson_sampler_did_not_draw_is_refused(
    private: tuple[Any, Any, Any, Any],
) -> None:
    engine, model, optimizer, loader = private
    adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
    adapter.begin_epoch(epoch_for(1.0))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))  # a fixed batch of 8, not sampled
    with pytest.raises(UnchargedStep, match="not drawn by the adapter's Poisson sampler"):
        one_step(model, optimizer, x, y)


def test_a_seeded_noise_generator_given_to_opacus_is_refused() -> None:
    engine, _, optimizer, loader = make_private(noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise_generator"):
        OpacusLedgerAdapter(engine, optimizer, data_loader=loader)


def test_the_noise_is_ours_at_sigma_c_and_the_same_seed_gets_different_noise() -> None:
    # Batch = N: q = 1, every record in every batch, so the two trainings differ by noise only.
    updates = []
    for _ in range(2):
        engine, model, optimizer, loader = make_private(batch=N, features=2_000)
        adapter = OpacusLedgerAdapter(engine, optimizer, data_loader=loader)
        adapter.begin_epoch(epoch_for(50.0, sample_rate=1.0, steps=1))
        before = parameters(model)
        train_one_epoch(model, optimizer, loader)
        updates.append(
            torch.cat(
                [
                    (old - p.detach()).flatten()
                    for p, old in zip(model.parameters(), before, strict=True)
                ]
            )
        )
    first, second = updates
    assert int((first == second).sum()) == 0
    # update = lr·(Σ clipped + noise)/(q·N); the clipped sum is at most C = 1 per record,
    # far below σC = 50: the update's sd is about lr·σC/N. Opacus' noise on top of ours
    # would make it √2 times that.
    noise_sd = float(first.std()) * N / 0.1
    assert noise_sd == pytest.approx(50.0, rel=0.05)

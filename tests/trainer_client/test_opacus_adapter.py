"""The Opacus adapter: the ledger's σ drives Opacus' noise and Opacus' own accountant."""

from __future__ import annotations

import warnings
from datetime import datetime
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tests.trainer_client.fake_ledger import TIME, dataset_body  # noqa: E402
from trainer_client.models import Dataset, Epoch  # noqa: E402
from trainer_client.opacus import OpacusLedgerAdapter  # noqa: E402

N, BATCH = 64, 8  # Opacus' Poisson loader: q = 1/len(loader) = 8/64, 8 steps per epoch


def epoch_for(
    sigma: float, *, index: int = 1, sample_rate: float = 0.125, steps: int = 8, clip: float = 1.0
) -> Epoch:
    return Epoch(
        run_id="run_1",
        index=index,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=clip,
        sampling="poisson",
        beyond_plan=False,
        ledger_seq=3,
        expires_at=datetime.fromisoformat(TIME),
        dataset=Dataset.from_json(dataset_body(epsilon_spent=1.5, epsilon_cap=8.0, delta=1e-5)),
    )


@pytest.fixture
def private() -> tuple[Any, Any, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,))), BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": fine for a test
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.3,  # replaced by the ledger's σ each epoch
            max_grad_norm=1.0,
        )
    return engine, model, optimizer, loader


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
        OpacusLedgerAdapter(engine, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))

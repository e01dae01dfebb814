"""examples/private_prediction.py runs end to end at a small size against a live ledger, and
`PrivateLabeler` labels through it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import pytest

from tests.trainer_client.conftest import ROOT, LedgerServer, NewDataset
from trainer_client import BudgetExhausted, PrivateLabeler

EXAMPLE = ROOT / "examples" / "private_prediction.py"


def test_the_example_runs_at_a_small_size(ledger_server: LedgerServer) -> None:
    pytest.importorskip("sklearn", reason="the example needs scikit-learn (the dev extra)")
    prefix = "pate-" + uuid.uuid4().hex[:8]
    env = {**os.environ, "LEDGER_API_KEY": ledger_server.admin_key}
    command = [sys.executable, str(EXAMPLE), "--url", ledger_server.url, "--dataset", prefix]
    done = subprocess.run(
        [
            *command,
            "--teachers",
            "8",
            "--queries",
            "60",
            "--noise-scales",
            "1,4",
            "--batch-size",
            "25",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    by_sigma = {row[0]: (float(row[1]), float(row[2])) for row in rows if len(row) == 3}
    assert set(by_sigma) == {"1", "4"}, done.stdout
    # More noise per count, less ε for the same 60 queries; accuracies are fractions.
    assert by_sigma["1"][0] > by_sigma["4"][0] > 0
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in by_sigma.values())
    assert "labelled 60/60" in done.stderr  # the progress bar, with the dataset's ε
    with ledger_server.client() as client:
        for sigma in ("1", "4"):
            dataset_id = f"{prefix}-sigma-{sigma}"
            charges = [e for e in client.ledger(dataset_id) if e.kind == "charge"]
            # 60 queries in batches of 25: three entries, 25 + 25 + 10 queries.
            assert [e.details["count"] for e in charges] == [25, 25, 10]
            assert {e.details["release"] for e in charges} == {"noisy_argmax"}
            assert (
                client.dataset(dataset_id).epsilon_spent == by_sigma[sigma][0]
                or abs(client.dataset(dataset_id).epsilon_spent - by_sigma[sigma][0])
                <= 1e-3 * by_sigma[sigma][0]
            )
            assert client.verify(dataset_id).ok


def test_the_labeler_batches_votes_and_stops_whole_at_the_cap(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    """Unanimous teachers, a margin of 200 votes against noise of σ = 20: every label is
    theirs. A batch past the cap is refused whole: the batches before it stay labelled,
    nothing of it is answered."""
    dataset_id = new_dataset(epsilon_cap=5.0)
    teachers = [lambda inputs: [x % 3 for x in inputs]] * 200
    progress = io.StringIO()
    with ledger_server.client() as client:
        labeler = PrivateLabeler(
            client, dataset_id, teachers, classes=3, noise_scale=20.0, batch_size=4,
            progress=progress,
        )  # fmt: skip
        assert labeler.label(list(range(10))) == [x % 3 for x in range(10)]
        assert "labelled 10/10" in progress.getvalue() and "ε spent" in progress.getvalue()
        entries = [e for e in client.ledger(dataset_id) if e.kind == "charge"]
        assert [e.details["count"] for e in entries] == [4, 4, 2]
        spent = client.dataset(dataset_id).epsilon_spent
        with pytest.raises(BudgetExhausted):
            labeler.label(list(range(10_000)))
        assert len(labeler.labelled) % 4 == 0  # whole batches only
        after = client.dataset(dataset_id)
        assert after.epsilon_spent <= after.epsilon_cap and after.epsilon_spent >= spent

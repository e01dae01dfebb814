"""A client generated from the live /openapi.json by a tool nobody here wrote just works.

openapi-python-client (a dev dependency) reads the running server's document; it must do so
without a single warning (a warning means some operation or answer was left untyped), and the
package it writes must complete the trainer flow against the same server: typed models with
enums and datetimes, the bearer scheme, a typed 409 `budget_exhausted` and the CSV export.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import io
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.trainer_client.conftest import LedgerServer

PACKAGE = "ledger_generated"
# No post-hooks: the generator would run ruff over the package, which proves nothing here.
CONFIG = f"package_name_override: {PACKAGE}\npost_hooks: []\n"


def _generate(server: LedgerServer, directory: Path) -> str:
    """Generate the package from the live document into `directory`; the generator's output."""
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert generator is not None, "openapi-python-client missing: install the `dev` extra"
    document = httpx.get(f"{server.url}/openapi.json", timeout=10.0, trust_env=False)
    assert document.status_code == 200, document.text
    (directory / "openapi.json").write_bytes(document.content)
    (directory / "config.yaml").write_text(CONFIG)
    done = subprocess.run(
        [
            generator,
            "generate",
            "--path",
            str(directory / "openapi.json"),
            "--config",
            str(directory / "config.yaml"),
            "--output-path",
            str(directory / PACKAGE),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def generated(
    ledger_server: LedgerServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModuleType, str]:
    """The generated package, imported from where it was written, and the generator's output."""
    directory = tmp_path_factory.mktemp("generated-client")
    output = _generate(ledger_server, directory)
    sys.path.insert(0, str(directory))
    try:
        package = importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(directory))
    return package, output


def _module(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


def test_the_generator_reads_the_document_without_a_warning(
    generated: tuple[ModuleType, str],
) -> None:
    package, output = generated
    assert "warning" not in output.lower(), output
    assert "error" not in output.lower(), output
    models = _module(package, "models")
    # One model per problem, not one per operation and status (the inlined schema made 103).
    assert not [name for name in dir(models) if name.endswith("Problem") and "_" in name]
    assert {"Problem", "BudgetExhaustedProblem", "ValidationProblem"} <= set(dir(models))


def test_the_generated_client_completes_the_trainer_flow(
    generated: tuple[ModuleType, str], ledger_server: LedgerServer
) -> None:
    package, _ = generated
    models = _module(package, "models")
    create_dataset = _module(package, "api.datasets.create_dataset")
    get_dataset = _module(package, "api.datasets.get_dataset")
    create_key = _module(package, "api.keys.create_key")
    create_run = _module(package, "api.runs.create_run")
    reserve_epoch = _module(package, "api.runs.reserve_epoch")
    complete_run = _module(package, "api.runs.complete_run")
    export_csv = _module(package, "api.ledger.export_ledger_csv")

    def client(token: str) -> Any:
        # Every answer a route can give is documented: anything else is an error here.
        return package.AuthenticatedClient(
            base_url=ledger_server.url, token=token, raise_on_unexpected_status=True
        )

    dataset_id = "gen-" + uuid.uuid4().hex[:12]
    with client(ledger_server.admin_key) as admin:
        dataset = create_dataset.sync(
            client=admin,
            body=models.DatasetCreate(id=dataset_id, epsilon_cap=1.0, delta=1e-5),
            idempotency_key=str(uuid.uuid4()),
        )
        assert isinstance(dataset, models.DatasetPublic), dataset
        assert isinstance(dataset.created_at, datetime.datetime)
        issued = create_key.sync(
            client=admin,
            body=models.KeyCreate(
                role=models.KeyCreateRole.TRAINER, datasets=[dataset_id], name="generated"
            ),
        )
        assert isinstance(issued, models.KeyCreated), issued
        assert issued.role == models.KeyCreatedRole.TRAINER

    with client(issued.key) as trainer:
        plan = models.RunCreate(
            sample_rate=0.01, steps_per_epoch=10, epochs=2, noise_multiplier=2.0
        )
        run = create_run.sync(dataset_id, client=trainer, body=plan)
        assert isinstance(run, models.RunWithDataset), run
        assert run.status == models.RunWithDatasetStatus.ACTIVE
        assert run.sampling == models.RunWithDatasetSampling.POISSON
        assert isinstance(run.expires_at, datetime.datetime)
        for number in (1, 2):
            epoch = reserve_epoch.sync(run.id, client=trainer)
            assert isinstance(epoch, models.EpochPublic), epoch
            assert (epoch.epoch, epoch.noise_multiplier) == (number, 2.0)
        spent = epoch.dataset.epsilon_spent
        assert 0.0 < spent <= 1.0
        done = complete_run.sync(run.id, client=trainer)
        assert isinstance(done, models.RunWithDataset), done
        assert done.status == models.RunWithDatasetStatus.COMPLETED

        greedy = models.RunCreate(
            sample_rate=0.5, steps_per_epoch=100, epochs=50, noise_multiplier=0.5
        )
        refused = create_run.sync_detailed(dataset_id, client=trainer, body=greedy)
        assert refused.status_code == 409
        problem = refused.parsed
        assert isinstance(problem, models.BudgetExhaustedProblem), problem
        assert problem.epsilon_cap == 1.0
        assert problem.epsilon_after > problem.epsilon_cap
        assert problem.epsilon_spent == pytest.approx(spent)
        unchanged = get_dataset.sync(dataset_id, client=trainer)
        assert isinstance(unchanged, models.DatasetPublic)
        assert unchanged.epsilon_spent == pytest.approx(spent)

    with client(ledger_server.admin_key) as admin:
        csv_text = export_csv.sync(dataset_id, client=admin)
    assert isinstance(csv_text, str), csv_text
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [int(row["seq"]) for row in rows] == [1, 2, 3, 4, 5]
    kinds = [row["kind"] for row in rows]
    assert kinds == ["dataset_created", "hold", "charge", "charge", "release_hold"]

"""privacy-ledger-client, the trainer's distribution: built from trainer_client/ alone, it
installs into a fresh virtual environment with httpx and nothing of the server, and runs."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.trainer_client.conftest import LedgerServer, NewDataset

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "trainer_client"

#: What the server side needs and a trainer must not get (nor our server packages).
SERVER_ONLY = ("fastapi", "sqlalchemy", "numpy", "scipy", "uvicorn", "service", "accountant")

TRAINER_SCRIPT = textwrap.dedent(
    """
    import sys

    import trainer_client
    from trainer_client import LedgerClient

    url, dataset_id = sys.argv[1], sys.argv[2]
    print("client from", trainer_client.__file__)
    with LedgerClient(url) as ledger:  # the key comes from LEDGER_API_KEY
        run = ledger.start_run(
            dataset_id, sample_rate=0.01, steps_per_epoch=100, epochs=3, target_epsilon=1.0
        )
        with run:
            sigmas = [epoch.noise_multiplier for epoch in run]
        print("status", run.refresh().status, "epochs", len(sigmas), "sigma", sigmas[0])
    """
)


def _pyproject(path: Path) -> dict[str, object]:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def _build_wheel(into: Path) -> Path:
    """Build the client's wheel from a copy of trainer_client/ (so no build output lands in
    the work tree, and so nothing outside that folder can be needed)."""
    source = into / "src" / "trainer_client"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    # No build isolation: the build needs only setuptools, which this environment has.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*command, "--quiet", "--wheel-dir", str(into / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (into / "dist").glob("privacy_ledger_client-*.whl")
    return wheel


def test_extras_pins_agree_with_the_server_distribution() -> None:
    client = _pyproject(CLIENT / "pyproject.toml")["project"]
    server = _pyproject(ROOT / "pyproject.toml")["project"]
    assert isinstance(client, dict) and isinstance(server, dict)
    assert client["name"] == "privacy-ledger-client"
    assert client["dependencies"] == ["httpx>=0.27"]
    for extra in ("torch", "opacus"):
        assert client["optional-dependencies"][extra] == server["optional-dependencies"][extra]
    assert "torch==2.13.0" in client["optional-dependencies"]["torch"]
    # The server's admin CLI is built on the client, at the version this tree has.
    import trainer_client

    assert f"privacy-ledger-client=={trainer_client.__version__}" in server["dependencies"]
    assert "client" not in server["optional-dependencies"]


def test_wheel_holds_the_client_alone(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names}
    dist_info = [p for p in packages if p.endswith(".dist-info")]
    assert packages - set(dist_info) == {"trainer_client"}
    assert "trainer_client/py.typed" in names and "trainer_client/client.py" in names
    assert not [n for n in names if n.startswith("trainer_client/") and "/" in n[15:]]
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{dist_info[0]}/METADATA"))
    import trainer_client

    assert metadata["Name"] == "privacy-ledger-client"
    assert metadata["Version"] == trainer_client.__version__
    required = metadata.get_all("Requires-Dist") or []
    assert [r for r in required if "extra ==" not in r] == ["httpx>=0.27"]
    assert any(r.startswith("torch==2.13.0") and "extra == " in r for r in required)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_completes_a_run(
    tmp_path: Path, ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    # httpx comes from the package index (pip's cache makes it quick after the first time).
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    installed = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # Nothing of the server came along, and the folder it was built from is not on the path.
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = "import importlib.util as u, sys; print([n for n in sys.argv[1:] if u.find_spec(n)])"
    found = subprocess.run(
        [str(python), "-c", probe, *SERVER_ONLY, "httpx", "trainer_client"],
        cwd=tmp_path,
        env=clean_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "['httpx', 'trainer_client']", found.stdout

    dataset_id = new_dataset(epsilon_cap=10.0)
    with ledger_server.client() as admin:
        trainer_key = admin.create_key("trainer", datasets=[dataset_id], name="fresh-venv").key
    assert trainer_key is not None
    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT)
    ran = subprocess.run(
        [str(python), str(script), ledger_server.url, dataset_id],
        cwd=tmp_path,
        env={**clean_env, "LEDGER_API_KEY": trainer_key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"client from {venv}" in ran.stdout  # the installed wheel, not the work tree
    assert "status completed epochs 3" in ran.stdout
    with ledger_server.client() as admin:
        assert admin.dataset(dataset_id).epsilon_spent > 0
        kinds = [entry.kind for entry in admin.ledger(dataset_id)]
    assert kinds.count("charge") == 3, kinds

"""README.md's "Using it" runs as printed: its admin commands, then its Python snippet."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.trainer_client.conftest import LedgerServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_commands() -> list[list[str]]:
    """The `.venv/bin/privacy-ledger …` lines of "Using it", as argument lists."""
    lines = _section(README.read_text(), "Using it").splitlines()
    prefix = "    .venv/bin/privacy-ledger "
    return [shlex.split(line.removeprefix(prefix)) for line in lines if line.startswith(prefix)]


def readme_snippet() -> str:
    """The one fenced Python block of "Using it"."""
    blocks = re.findall(r"```python\n(.*?)```", _section(README.read_text(), "Using it"), re.S)
    assert len(blocks) == 1, blocks
    return str(blocks[0])


def _privacy_ledger(server: LedgerServer, args: list[str]) -> str:
    """One README command, run as `.venv/bin/privacy-ledger` would, with the admin key."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--url", server.url],
        cwd=ROOT,
        env={**os.environ, "LEDGER_API_KEY": server.admin_key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def test_readme_commands_and_snippet_run_as_printed(
    ledger_server: LedgerServer, tmp_path: Path
) -> None:
    commands = readme_commands()
    assert [c[:2] for c in commands] == [
        ["datasets", "create"],
        ["keys", "create"],
        ["ledger", "verify"],
    ]
    outputs = [_privacy_ledger(ledger_server, args) for args in commands]
    # `keys create` prints the trainer key once; the snippet reads it from LEDGER_API_KEY.
    key = re.search(r"key \(shown once, store it now\): (pl_\S+)", outputs[1])
    assert key, outputs[1]

    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet())
    env = {**os.environ, "LEDGER_API_KEY": key[1], "LEDGER_URL": ledger_server.url}
    ran = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    epochs = re.findall(r"one epoch with noise multiplier (\d+\.\d+)", ran.stdout)
    assert len(epochs) == 10 and float(epochs[0]) > 0, ran.stdout
    with ledger_server.client() as admin:
        mnist = admin.dataset("mnist")
        runs = list(admin.runs("mnist"))
    assert [r.status for r in runs] == ["completed"] and runs[0].epochs_charged == 10
    assert f"spent ε = {mnist.epsilon_spent:.3f}" in ran.stdout
    assert 0 < runs[0].epsilon <= 3.0  # the plan alone is calibrated to its target ε
    assert runs[0].epsilon <= mnist.epsilon_spent <= mnist.epsilon_cap == 8.0
    assert mnist.epsilon_reserved == mnist.epsilon_spent  # completing released the hold

"""CI fails, instead of skipping, when PostgreSQL is missing; a developer without it gets one
summary line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Two tests on the `database_url` fixture: one SQLite case, one PostgreSQL case each.
TARGET = "tests/service/test_cap_lowering.py"


def _pytest(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"CI", "LEDGER_TEST_POSTGRES_URL"}}
    return subprocess.run(
        [sys.executable, "-m", "pytest", TARGET, "-q", "-ra", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_in_ci_a_missing_postgres_url_fails_the_postgres_tests() -> None:
    run = _pytest(CI="true")
    assert run.returncode == 1, run.stdout
    assert "2 passed" in run.stdout and "2 errors" in run.stdout, run.stdout
    assert "CI=true but LEDGER_TEST_POSTGRES_URL is not set" in run.stdout
    assert "skipped" not in run.stdout.lower()


def test_outside_ci_postgres_tests_are_left_out_in_one_line() -> None:
    run = _pytest()
    assert run.returncode == 0, run.stdout
    assert "SKIPPED" not in run.stdout
    lines = [line for line in run.stdout.splitlines() if "LEDGER_TEST_POSTGRES_URL" in line]
    assert lines == [lines[0]] and lines[0].startswith("PostgreSQL: 2 tests not run."), lines
    assert "2 passed, 2 deselected" in run.stdout


def test_ci_run_stops_when_postgres_cannot_be_reached(tmp_path: Path) -> None:
    # A PATH with no PostgreSQL tools at all: the script must stop before running anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dirname = shutil.which("dirname")
    assert dirname is not None
    (bin_dir / "dirname").symlink_to(dirname)
    bash = shutil.which("bash")
    assert bash is not None
    run = subprocess.run(
        [bash, str(ROOT / ".ci" / "run")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PostgreSQL could not be started or reached" in run.stderr
    assert "dev.py" not in run.stdout

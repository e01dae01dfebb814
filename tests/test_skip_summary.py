"""`dev.py test`'s skip summary: identical reasons fold into one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import dev

ROOT = Path(__file__).resolve().parents[1]

SUITE = textwrap.dedent(
    """
    import pytest

    @pytest.mark.parametrize("n", range(7))
    def test_needs_postgres(n):
        pytest.skip("PostgreSQL tests need LEDGER_TEST_POSTGRES_URL")

    def test_needs_chromium():
        pytest.skip("no chromium")

    def test_runs():
        assert True
    """
)


def test_identical_skip_reasons_print_once(tmp_path: Path) -> None:
    (tmp_path / "test_some.py").write_text(SUITE)
    # The options dev.py passes, on a suite of our own.
    options = [*dev.PYTEST_REPORT, "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "SKIPPED 7 tests: PostgreSQL tests need LEDGER_TEST_POSTGRES_URL" in lines
    assert "SKIPPED 1 test: no chromium" in lines
    assert sum("LEDGER_TEST_POSTGRES_URL" in line for line in lines) == 1, done.stdout
    assert "1 passed, 8 skipped" in done.stdout

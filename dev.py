#!/usr/bin/env python3
"""The project's two set-up commands, for a fresh machine with only Python.

    python3 dev.py serve [serve options]   start the service on the embedded SQLite store
    python3 dev.py test  [pytest options]  lint, type-check and run the whole test suite

Each creates `.venv` beside this file on first use and installs what it needs
into it (again only when pyproject.toml changes).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

# What each command installs: the service needs only the runtime dependencies;
# the suite also needs the development tools and the (pinned, CPU) torch extras.
EXTRAS = {"serve": "", "test": "[dev,torch,opacus]"}
CHECKED_PACKAGES = ("accountant", "trainer_client", "service", "tests", "bench", "examples")


def _run(*cmd: str | Path) -> None:
    completed = subprocess.run([str(c) for c in cmd], cwd=ROOT, check=False)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def ensure_environment(extras: str) -> None:
    """Create .venv and install the project with `extras`, unless already done."""
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV.relative_to(ROOT)}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed{extras or '[runtime]'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"dev.py: installing privacy-ledger{extras} into .venv", flush=True)
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PYTHON, "-m", "pip", "install", "--quiet", "-e", f".{extras}")
    stamp.write_text(digest)


def serve(args: list[str]) -> None:
    ensure_environment(EXTRAS["serve"])
    os.execv(BIN / "privacy-ledger", [str(BIN / "privacy-ledger"), "serve", *args])


def test(args: list[str]) -> None:
    ensure_environment(EXTRAS["test"])
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "ruff", "format", "--check", ".")
    _run(PYTHON, "-m", "mypy", *CHECKED_PACKAGES)
    if os.environ.get("LEDGER_TEST_POSTGRES_URL"):
        print("dev.py: storage tests run on SQLite and on PostgreSQL", flush=True)
    elif os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        print("dev.py: CI is set but LEDGER_TEST_POSTGRES_URL is not: PostgreSQL tests will fail")
    else:
        print("dev.py: LEDGER_TEST_POSTGRES_URL is not set: PostgreSQL tests are left out")
    _run(PYTHON, "-m", "pytest", *args)


def main() -> None:
    commands = {"serve": serve, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The project's two set-up commands, for a fresh machine with only Python.

    python3 dev.py serve [serve options]   start the service on the embedded SQLite store
    python3 dev.py test  [pytest options]  lint, type-check, check the import layers and run
                                           the whole test suite

and one usage command:

    python3 dev.py example [example options]
        install the pinned CPU torch into .venv (if missing), start a throw-away server
        (temporary SQLite file, generated admin key), create a dataset and a trainer key
        with the admin CLI, run examples/train_dp_sgd.py against it, stop the server

Each creates `.venv` beside this file on first use and installs what it needs
into it (again only when a pyproject.toml changes): the client distribution
(`./trainer_client`) and the server (`.`), editable, in one pip command.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

# What each command installs: the service needs only the runtime dependencies;
# the suite also needs the development tools and the (pinned, CPU) torch extras; the
# example needs torch (pinned to 2.13.0 in pyproject.toml, which pip takes as the CPU build).
EXTRAS = {"serve": "", "test": "[dev,torch,opacus]", "example": "[torch]"}
PYPROJECTS = (ROOT / "pyproject.toml", ROOT / "trainer_client" / "pyproject.toml")
# The test suite's PostgreSQL tests skip with one reason each; the skip summary plugin folds
# identical reasons into one line (pytest's own -rs prints one line per test location).
PYTEST_REPORT = ("-p", "tests.skip_summary", "-rfExX")
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
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in PYPROJECTS) + extras.encode())
    stamp = VENV / f".installed{extras or '[runtime]'}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    print(f"dev.py: installing privacy-ledger-client and privacy-ledger{extras} into .venv")
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # One command, the local client named first: the server's requirement
    # `privacy-ledger-client==0.1.0` is then met by ./trainer_client (pip uses a requirement
    # given as a path for that name, never an index), while PyPI serves everything else.
    _run(PYTHON, "-m", "pip", "install", "--quiet", "-e", "./trainer_client", "-e", f".{extras}")
    stamp.write_text(digest.hexdigest())


def serve(args: list[str]) -> None:
    ensure_environment(EXTRAS["serve"])
    os.execv(BIN / "privacy-ledger", [str(BIN / "privacy-ledger"), "serve", *args])


def test(args: list[str]) -> None:
    ensure_environment(EXTRAS["test"])
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "ruff", "format", "--check", ".")
    _run(PYTHON, "-m", "mypy", *CHECKED_PACKAGES)
    # The layer rules of DESIGN.md §2 ([tool.importlinter] in pyproject.toml).
    _run(BIN / "lint-imports", "--no-logo")
    if os.environ.get("LEDGER_TEST_POSTGRES_URL"):
        print("dev.py: storage tests run on SQLite and on PostgreSQL", flush=True)
    elif os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        print("dev.py: CI is set but LEDGER_TEST_POSTGRES_URL is not: PostgreSQL tests will fail")
    else:
        print("dev.py: LEDGER_TEST_POSTGRES_URL is not set: PostgreSQL tests are left out")
    _run(PYTHON, "-m", "pytest", *PYTEST_REPORT, *args)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, server: subprocess.Popen[bytes], deadline_s: float = 60.0) -> None:
    """Poll /readyz until it answers 200; fail if the server exits or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"dev.py: the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # the poll interval, not a wait for something to happen
    sys.exit(f"dev.py: the server at {url} was not ready within {deadline_s:.0f} s")


def _admin(url: str, admin_key: str, *args: str) -> str:
    """Run one admin command of the installed `privacy-ledger` CLI; its standard output."""
    env = {**os.environ, "LEDGER_API_KEY": admin_key}
    done = subprocess.run(
        [str(BIN / "privacy-ledger"), *args, "--url", url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"dev.py: privacy-ledger {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def example(args: list[str]) -> None:
    """Run examples/train_dp_sgd.py against a throw-away server started here."""
    ensure_environment(EXTRAS["example"])
    dataset = "synthetic-blobs"
    with tempfile.TemporaryDirectory(prefix="privacy-ledger-example-") as workdir:
        url = f"http://127.0.0.1:{_free_port()}"
        admin_key = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        env["LEDGER_DATABASE_URL"] = f"sqlite:///{Path(workdir) / 'example.db'}"
        env["LEDGER_ADMIN_KEY"] = admin_key
        log_path = Path(workdir) / "server.log"
        print(f"dev.py: starting a throw-away ledger at {url} (log: {log_path})", flush=True)
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [str(BIN / "privacy-ledger"), "serve", "--port", url.rsplit(":", 1)[1]],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_ready(url, server)
                create = f"datasets create {dataset} --epsilon-cap 8 --delta 1e-5"
                _admin(url, admin_key, *create.split())
                issue = f"keys create --role trainer --dataset {dataset} --name example --json"
                issued = _admin(url, admin_key, *issue.split())
                trainer_env = {**os.environ, "LEDGER_API_KEY": json.loads(issued)["key"]}
                print(f"dev.py: dataset {dataset!r} (ε cap 8) and a trainer key ready", flush=True)
                script = ["examples/train_dp_sgd.py", "--url", url, "--dataset", dataset]
                trained = subprocess.run(
                    [str(PYTHON), *script, *args],
                    cwd=ROOT,
                    env=trainer_env,
                    check=False,
                )
            finally:
                server.terminate()
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    sys.exit(trained.returncode)


def main() -> None:
    commands = {"serve": serve, "test": test, "example": example}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

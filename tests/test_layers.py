"""The layer rules of DESIGN.md §2 are checked: the contracts are the five rules, the tree keeps
them, and each contract breaks when one bad import is added to a copy of the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("accountant", "trainer_client", "service", "migrations")
# `lint-imports` is a console script; run its entry point with this interpreter instead, so the
# test does not depend on where the script was installed.
LINT_IMPORTS = (
    "import sys; from importlinter.cli import lint_imports_command;"
    " sys.exit(lint_imports_command())"
)


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _lint_imports(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    # Without PYTHONPATH, and from `tree`: the packages analysed are the ones in `tree`.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    selected = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", *selected],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contracts_are_the_five_layer_rules() -> None:
    contracts = _contracts()
    shape: dict[str, tuple[object, ...]] = {
        cid: (
            c["type"],
            tuple(c.get("source_modules", c.get("layers", ()))),  # type: ignore[arg-type]
            tuple(c.get("forbidden_modules", ())),  # type: ignore[arg-type]
            bool(c.get("allow_indirect_imports", False)),
        )
        for cid, c in contracts.items()
    }
    assert shape == {
        "accountant-pure": (
            "forbidden",
            ("accountant",),
            ("service", "trainer_client", "migrations"),
            False,
        ),
        "client-http-only": (
            "forbidden",
            ("trainer_client",),
            ("service", "accountant", "migrations"),
            False,
        ),
        # Direct imports only: a route calls the domain, and the domain reads storage.
        "routes-no-sql": (
            "forbidden",
            ("service.api.routes", "service.ui.routes"),
            ("service.storage", "sqlalchemy"),
            True,
        ),
        "domain-no-http": (
            "forbidden",
            ("service.domain",),
            ("fastapi", "starlette", "service.api", "service.app"),
            False,
        ),
        "metrics-below-domain": ("layers", ("service.domain", "service.metrics"), (), False),
    }


def test_the_tree_keeps_every_contract() -> None:
    checked = _lint_imports(ROOT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Contracts: 5 kept, 0 broken." in checked.stdout


# One bad import per contract, appended to a module of the layer the contract guards.
BAD_IMPORTS = {
    "accountant-pure": ("accountant/rdp.py", "from service.settings import Settings"),
    "client-http-only": ("trainer_client/models.py", "import accountant"),
    "routes-no-sql": ("service/api/routes/keys.py", "from sqlalchemy import select"),
    # Indirect counts here: the domain reaching FastAPI through the HTTP layer's renderer.
    "domain-no-http": ("service/domain/holds.py", "from service.api import render"),
    "metrics-below-domain": ("service/metrics.py", "from service.domain import budget"),
}


@pytest.mark.parametrize("contract", sorted(BAD_IMPORTS))
def test_a_bad_import_breaks_its_contract(tmp_path: Path, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__", "static"),
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module, statement = BAD_IMPORTS[contract]
    assert _lint_imports(tmp_path, contract).returncode == 0  # the copy keeps it, untouched
    with open(tmp_path / module, "a") as source:
        source.write(f"\n{statement}  # the bad import under test\n")
    checked = _lint_imports(tmp_path, contract)
    assert checked.returncode != 0
    assert f"{_contracts()[contract]['name']} BROKEN" in checked.stdout
    bad_module = module.removesuffix(".py").replace("/", ".")
    assert bad_module in checked.stdout

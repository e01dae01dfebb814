"""trainer_client works with httpx alone: no service, accountant, FastAPI, SQLAlchemy, numpy
or torch is imported, even indirectly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = ("service", "accountant", "fastapi", "sqlalchemy", "numpy", "torch", "opacus", "scipy")

PROGRAM = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Blocker:
        # A meta-path finder that refuses the blocked packages and all their submodules.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"import of {{name}} is blocked in this test")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())

    import asyncio
    import httpx
    import trainer_client
    from trainer_client import AsyncLedgerClient, LedgerClient, NotFound

    DATASET = {{
        "id": "d", "description": "", "epsilon_cap": 1.0, "delta": 1e-5,
        "epsilon_spent": 0.0, "epsilon_reserved": 0.0, "epsilon_remaining": 1.0,
        "frozen": False, "ledger_seq": 1, "active_runs": 0,
        "created_at": "2026-11-23T09:30:00Z", "updated_at": "2026-11-23T09:30:00Z",
        "shares": {{"profile": "uniform", "orders": [2.0], "weights": ["1"], "pure_sum": True}},
        "epsilon_decided_by": None, "outside_guarantee": None,
    }}

    def answer(request):
        if request.url.path == "/v1/datasets/d":
            return httpx.Response(200, json=DATASET)
        return httpx.Response(404, json={{"code": "not_found", "status": 404}})

    transport = httpx.MockTransport(answer)
    with LedgerClient("http://ledger.test", "key", transport=transport) as client:
        assert client.dataset("d").epsilon_cap == 1.0
        try:
            client.dataset("other")
        except NotFound:
            pass
        else:
            raise AssertionError("expected NotFound")

    async def main():
        async with AsyncLedgerClient("http://ledger.test", "key", transport=transport) as c:
            return (await c.dataset("d")).id

    assert asyncio.run(main()) == "d"

    loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not loaded, loaded

    # The optional helpers say clearly what they need.
    for helper in ("trainer_client.torch", "trainer_client.opacus"):
        try:
            __import__(helper)
        except ImportError as exc:
            assert "blocked" in str(exc) or "needs" in str(exc), exc
        else:
            raise AssertionError(helper + " imported without its dependency")
    print("isolated ok")
    """
).format(blocked=BLOCKED)


def test_trainer_client_imports_and_works_with_httpx_only() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "isolated ok" in completed.stdout


def test_the_core_modules_import_nothing_of_ours_but_themselves() -> None:
    # A static check too, so a lazy import inside a function cannot slip through.
    core = ["__init__.py", "_base.py", "_calls.py", "_http.py", "client.py", "async_client.py"]
    core += ["errors.py", "models.py"]
    for name in core:
        source = (ROOT / "trainer_client" / name).read_text()
        for blocked in BLOCKED:
            assert f"import {blocked}" not in source, (name, blocked)
            assert f"from {blocked}" not in source, (name, blocked)

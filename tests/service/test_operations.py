"""Operations: metrics across workers, JSON logs, the admin CLI, start-up, containers."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import MetaData, select

from service import cli
from service.storage import migrate
from service.storage.database import Database
from tests.service.conftest import ADMIN_KEY, ROOT, Api, LiveServer, free_port

BIN = Path(sys.executable).parent


def _samples(text: str, name: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus exposition, keyed by their label text."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{.*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def test_metrics_add_up_across_workers(live_server: LiveServer) -> None:
    base = live_server(workers=2)
    with httpx.Client(base_url=base, timeout=30) as http:
        admin = Api(http, ADMIN_KEY)
        admin.create_dataset("m", 1.0)
        outcomes = []
        for index in range(12):  # new connections: requests spread over both workers
            with httpx.Client(base_url=base, timeout=30) as fresh:
                response = Api(fresh, ADMIN_KEY).post(
                    "/v1/datasets/m/releases", {"mechanism": "laplace", "epsilon": 0.3}
                )
            outcomes.append(response.status_code)
            assert response.status_code in (201, 409), (index, response.text)
        replay = {"headers": {"Idempotency-Key": "once"}}
        tiny = {"mechanism": "pure_dp", "epsilon": 0.001}
        assert admin.post("/v1/datasets/m/releases", tiny, **replay).status_code == 201
        assert admin.post("/v1/datasets/m/releases", tiny, **replay).status_code == 201
        text = http.get("/metrics").text
        dataset = admin.get("/v1/datasets/m").json()
    admitted, refused = outcomes.count(201), outcomes.count(409)
    assert admitted >= 1 and refused >= 1
    admissions = _samples(text, "ledger_admissions_total")
    assert admissions['{operation="release",outcome="admitted"}'] == admitted + 1
    assert admissions['{operation="release",outcome="budget_exhausted"}'] == refused
    assert _samples(text, "ledger_budget_refusals_total") == {'{operation="release"}': refused}
    assert _samples(text, "ledger_idempotent_replays_total") == {"": 1.0}
    requests = _samples(text, "ledger_http_requests_total")
    route = 'method="POST",route="/v1/datasets/{dataset_id}/releases"'
    assert requests[f'{{{route},status="201"}}'] == admitted + 2
    assert requests[f'{{{route},status="409"}}'] == refused
    assert _samples(text, "ledger_lock_wait_seconds_count")[""] >= len(outcomes)
    assert _samples(text, "ledger_dataset_epsilon_spent") == {
        '{dataset="m"}': pytest.approx(dataset["epsilon_spent"])
    }
    assert _samples(text, "ledger_dataset_epsilon_cap") == {'{dataset="m"}': 1.0}


def test_json_logs_carry_request_ids_and_never_keys(
    live_server: LiveServer, tmp_path: Path, database: Database
) -> None:
    base = live_server(log_level="info")
    with httpx.Client(base_url=base, timeout=30) as http:
        admin = Api(http, ADMIN_KEY)
        trainer_key = admin.new_key("trainer")
        admin.create_dataset("d", 1.0)
        trainer = admin.as_key(trainer_key)
        echoed = trainer.post(
            "/v1/datasets/d/releases",
            {"mechanism": "laplace", "epsilon": 0.1},
            headers={"X-Request-ID": "trace-42"},
        )
        assert echoed.headers["x-request-id"] == "trace-42"
        generated = trainer.get("/v1/datasets/d", headers={"X-Request-ID": "bad id\twith tabs"})
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
        denied = Api(http, trainer_key + "x").get("/v1/datasets/d")
        assert denied.status_code == 401 and trainer_key not in denied.text
        revoked_id = trainer_key.split("_")[1]
        assert admin.delete(f"/v1/keys/{revoked_id}").status_code == 200
        assert trainer.get("/v1/datasets/d").status_code == 401
    log_text = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    traced = [line for line in lines if line.get("request_id") == "trace-42"]
    assert len(traced) == 1
    assert traced[0]["route"] == "/v1/datasets/{dataset_id}/releases"
    assert traced[0]["status"] == 201 and traced[0]["dataset"] == "d"
    assert traced[0]["key_id"] == revoked_id
    secret = trainer_key.split("_", 2)[2]
    for text in (log_text, json.dumps(lines)):
        assert ADMIN_KEY not in text and secret not in text
    # The database holds no secret in clear either.
    metadata = MetaData()
    metadata.reflect(database.read_engine)
    with database.read() as session:
        for table in metadata.sorted_tables:
            dump = json.dumps([list(map(str, row)) for row in session.execute(select(table))])
            assert secret not in dump and ADMIN_KEY not in dump, table.name


@dataclass
class Completed:
    """What one CLI invocation printed and returned."""

    returncode: int
    stdout: str
    stderr: str


def _cli(base: str, *args: str, key: str | None = ADMIN_KEY) -> Completed:
    """Run `privacy-ledger …` in process (the admin commands only speak HTTP)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.environ.pop("LEDGER_API_KEY", None)
    if key is not None:
        os.environ["LEDGER_API_KEY"] = key
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([*args, "--url", base])
            except SystemExit as exc:  # argparse's usage errors, as the real command exits
                code = int(exc.code or 0)
    finally:
        os.environ.pop("LEDGER_API_KEY", None)
        if previous is not None:
            os.environ["LEDGER_API_KEY"] = previous
    return Completed(code, out.getvalue(), err.getvalue())


def test_admin_cli(live_server: LiveServer, tmp_path: Path) -> None:
    base = live_server()
    created = _cli(base, "datasets", "create", "cli", "--epsilon-cap", "2", "--delta", "1e-6")
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[0].split()[:3] == ["ID", "EPSILON_CAP", "DELTA"]
    shown = json.loads(_cli(base, "datasets", "show", "cli", "--json").stdout)
    assert shown["epsilon_cap"] == 2.0 and shown["delta"] == 1e-6
    assert _cli(base, "datasets", "set-cap", "cli", "3", "--reason", "DPO ok").returncode == 0
    assert _cli(base, "datasets", "freeze", "cli").returncode == 0
    assert json.loads(_cli(base, "datasets", "list", "--json").stdout)[0]["frozen"] is True
    assert _cli(base, "datasets", "unfreeze", "cli").returncode == 0

    issued = json.loads(
        _cli(base, "keys", "create", "--role", "auditor", "--dataset", "cli", "--json").stdout
    )
    assert issued["role"] == "auditor" and issued["datasets"] == ["cli"]
    listed = json.loads(_cli(base, "keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [issued["id"]]
    verified = _cli(base, "ledger", "verify", "cli", key=issued["key"])
    assert verified.returncode == 0 and "OK (4 entries" in verified.stdout
    out = tmp_path / "ledger.csv"
    assert _cli(base, "ledger", "export", "cli", "-o", str(out), key=issued["key"]).returncode == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("seq,created_at,kind")
    exported = json.loads(_cli(base, "ledger", "export", "cli", "--format", "json").stdout)
    kinds = [e["kind"] for e in exported["data"]]
    assert kinds == ["dataset_created", "cap_change", "freeze", "unfreeze"]
    assert exported["data"][1]["details"] == {"old": 2.0, "new": 3.0, "reason": "DPO ok"}
    assert _cli(base, "keys", "revoke", issued["id"]).returncode == 0
    refused = _cli(base, "ledger", "verify", "cli", key=issued["key"])
    assert refused.returncode == 1 and "unauthorized" in refused.stderr
    missing = _cli(base, "datasets", "show", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr
    assert _cli(base, "datasets", "list", key=None).returncode == 2
    unreachable = _cli(f"http://127.0.0.1:{free_port()}", "datasets", "list")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    bad = _cli(base, "datasets", "create", "x", "--epsilon-cap", "-1", "--delta", "1e-5")
    assert bad.returncode == 1 and "validation_error" in bad.stderr


def test_cli_key_scope_is_explicit_and_checked(live_server: LiveServer) -> None:
    base = live_server()
    made = _cli(base, "datasets", "create", "real", "--epsilon-cap", "1", "--delta", "1e-6")
    assert made.returncode == 0, made.stderr
    # Forgetting the scope is a usage error, not a key that reaches every dataset.
    unscoped = _cli(base, "keys", "create", "--role", "trainer", "--name", "t")
    assert unscoped.returncode == 2 and "--all-datasets" in unscoped.stderr
    # A typo in the scope is refused by the API, with its message.
    typo = _cli(base, "keys", "create", "--role", "trainer", "--dataset", "nope")
    assert typo.returncode == 1, typo
    assert "validation_error" in typo.stderr and "'nope'" in typo.stderr
    both = _cli(base, "keys", "create", "--role", "auditor", "--dataset", "real", "--all-datasets")
    assert both.returncode == 2
    assert json.loads(_cli(base, "keys", "list", "--json").stdout) == []  # nothing was issued
    every = _cli(base, "keys", "create", "--role", "auditor", "--all-datasets", "--json")
    assert every.returncode == 0 and json.loads(every.stdout)["datasets"] is None
    scoped = _cli(base, "keys", "create", "--role", "trainer", "--dataset", "real", "--json")
    assert scoped.returncode == 0 and json.loads(scoped.stdout)["datasets"] == ["real"]
    admin_scoped = _cli(base, "keys", "create", "--role", "admin", "--dataset", "real")
    assert admin_scoped.returncode == 2
    assert _cli(base, "keys", "create", "--role", "admin", "--json").returncode == 0


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str | None]]:
    """(where, help) for every option, positional and subcommand under `parser`."""
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in act._choices_actions}
            for name, sub in act.choices.items():
                yield f"{path} {name}", helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(act, argparse._HelpAction):
            yield f"{path} {'/'.join(act.option_strings) or act.dest}", act.help


def test_every_cli_command_and_option_has_help() -> None:
    found = list(_walk(cli.build_parser(), "privacy-ledger"))
    assert len(found) > 60  # the walk reached the admin commands' options
    missing = [where for where, text in found if not text or text == argparse.SUPPRESS]
    assert missing == []
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        cli.main(["keys", "create", "--help"])
    shown = " ".join(text.getvalue().split())  # argparse wraps lines to the terminal's width
    assert "--all-datasets" in shown and "including ones created later" in shown


def _wait_ready(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} never answered")


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    out, _ = process.communicate(timeout=20)
    return out


def test_serve_bootstraps_first_admin_key_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = ""
    for attempt in range(2):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert _wait_ready(f"http://127.0.0.1:{port}/readyz", process).status_code == 200
        if attempt == 0:
            out = _stop(process)
            token = re.search(r"(pl_\S+)", out)
            assert token, out
            first = token[1]
        else:
            keys = httpx.get(
                f"http://127.0.0.1:{port}/v1/keys", headers={"Authorization": f"Bearer {first}"}
            )
            out = _stop(process)
            assert keys.status_code == 200 and len(keys.json()["data"]) == 1
            assert "created the first admin key" not in out


def test_readyz_wants_migrations_and_db_upgrade_provides_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'empty.db'}"
    env["LEDGER_ADMIN_KEY"] = ADMIN_KEY
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--no-migrate", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        not_ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        assert not_ready.status_code == 503
        assert "privacy-ledger db upgrade" in not_ready.json()["detail"]
        assert httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200
        upgrade = subprocess.run(
            [sys.executable, "-m", "service.cli", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert upgrade.returncode == 0 and f"revision {migrate.head_revision()}" in upgrade.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        _stop(process)


def test_container_entrypoint_runs_on_the_host(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["LEDGER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'container.db'}"
    env["LEDGER_ADMIN_KEY"] = ADMIN_KEY
    entrypoint = str(ROOT / "docker" / "entrypoint.sh")
    migrated = subprocess.run(
        ["sh", entrypoint, "migrate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    env.update(LEDGER_HOST="127.0.0.1", LEDGER_PORT=str(port), LEDGER_WORKERS="1")
    process = subprocess.Popen(
        ["sh", entrypoint, "serve"],
        cwd=tmp_path,  # where the server creates its key file
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait_ready(f"http://127.0.0.1:{port}/readyz", process).status_code == 200
    finally:
        _stop(process)


def test_compose_and_dockerfile() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "ledger"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    ledger = services["ledger"]
    assert ledger["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert ledger["environment"]["LEDGER_ADMIN_KEY"].startswith("${LEDGER_ADMIN_KEY:?")
    assert ledger["environment"]["LEDGER_DATABASE_URL"].startswith("postgresql+psycopg://")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") + dockerfile.startswith("FROM ") >= 2  # multi-stage
    assert re.search(r"^USER ledger$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/livez" in dockerfile
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        env = {**os.environ, "LEDGER_ADMIN_KEY": "x"}
        config = subprocess.run(
            [docker, "compose", "config", "--quiet"], cwd=ROOT, env=env, capture_output=True
        )
        assert config.returncode == 0, config.stderr

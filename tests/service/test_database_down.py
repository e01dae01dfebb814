"""The database goes away and comes back; the service answers 503, writes nothing by halves, and
recovers without a restart.

PostgreSQL: the service reaches the database through a small TCP proxy of our own (loopback
only), so the test can cut the link: close the listening socket and every connection, either at
once or exactly around an admission's COMMIT (the COMMIT dropped, or the COMMIT delivered and its
answer lost). Meanwhile /livez answers 200, /readyz and every admission a 503 problem; afterwards
the first request succeeds, a retry with the same Idempotency-Key is admitted afresh (the COMMIT
never arrived) or replayed (it did), and the ledger holds exactly the admissions that got a 2xx.

SQLite has no link to cut and, opened, no file to lose (a chmod does not affect open
descriptors, and root ignores it); its outage is another process holding the write lock: writes
then wait out the busy timeout (shortened here) and get a 503, reads go on, and the next write
after the lock is released succeeds.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import struct
import threading
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from service.app import create_app
from service.domain import ledger
from service.settings import Settings
from service.storage import database as database_module
from service.storage.database import Database
from service.storage.models import Dataset, Run
from tests.service.conftest import ADMIN_KEY, Api

DATASET = "outage"
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 20,
    "epochs": 5,
    "noise_multiplier": 1.0,
}
RELEASE: dict[str, Any] = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1}
COMMIT = b"Q" + struct.pack("!I", 4 + len(b"COMMIT\x00")) + b"COMMIT\x00"
WAIT = 30.0


class PgProxy:
    """A TCP relay to PostgreSQL on a fixed loopback port that the test can cut and restore.

    `trap_commit` arms a cut at the next simple-query COMMIT from the service: dropped before
    PostgreSQL sees it, or delivered (and PostgreSQL let finish it) with its answer lost.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._trap: str | None = None
        self._delivered: socket.socket | None = None
        self.trapped = threading.Event()

    def __enter__(self) -> PgProxy:
        self.restore()
        return self

    def __exit__(self, *_: object) -> None:
        self.cut()

    def restore(self) -> None:
        """Listen (again, on the same port) and relay every new connection."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and drop every connection, as a dead database host would."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); closes the port
            listener.close()
        for sock in sockets:
            _drop(sock)

    def trap_commit(self, *, deliver: bool) -> None:
        """Cut everything at the next COMMIT, delivering it to PostgreSQL first if `deliver`."""
        self.trapped.clear()
        with self._lock:
            self._trap = "deliver" if deliver else "drop"

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=WAIT)
            except OSError:
                _drop(client)
                continue
            server.settimeout(None)
            for sock in (client, server):  # relay small protocol messages without delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _drop(client)
                    _drop(server)
                    continue
                self._sockets |= {client, server}
            threading.Thread(target=self._to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client), daemon=True).start()

    def _to_client(self, server: socket.socket, client: socket.socket) -> None:
        """Relay PostgreSQL's answers until PostgreSQL ends (after a cut they are lost)."""
        forwarding = True
        try:
            while chunk := server.recv(65536):
                if forwarding:
                    try:
                        client.sendall(chunk)
                    except OSError:
                        forwarding = False
        except OSError:
            pass
        _drop(client)
        _drop(server)
        if server is self._delivered:
            self.trapped.set()  # PostgreSQL ended the connection, so it has done the COMMIT

    def _to_server(self, client: socket.socket, server: socket.socket) -> None:
        """Relay whole protocol messages (the first, the startup message, has no type byte)."""
        pending, started = b"", False
        try:
            while chunk := client.recv(65536):
                pending += chunk
                complete = b""
                while True:
                    header = 5 if started else 4
                    if len(pending) < header:
                        break
                    length = struct.unpack("!I", pending[header - 4 : header])[0] + header - 4
                    if len(pending) < length:
                        break
                    message, pending = pending[:length], pending[length:]
                    started = True
                    if message == COMMIT and self._armed():
                        server.sendall(complete)
                        self._spring(server)
                        return
                    complete += message
                server.sendall(complete)
        except OSError:
            pass
        _drop(client)
        _drop(server)

    def _armed(self) -> bool:
        with self._lock:
            return self._trap is not None

    def _spring(self, server: socket.socket) -> None:
        """At a COMMIT, armed: cut everything (delivering the COMMIT first if so armed)."""
        with self._lock:
            trap, self._trap = self._trap, None
            self._sockets.discard(server)
        self.cut()  # the service's side of every connection, and the listener
        if trap == "drop":
            _drop(server)
            self.trapped.set()
            return
        # PostgreSQL reads the COMMIT before the end of the stream, so it commits; `_to_client`
        # then sees PostgreSQL end the connection.
        self._delivered = server
        server.sendall(COMMIT)
        server.shutdown(socket.SHUT_WR)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "service_unavailable" and body["status"] == 503, body
    assert body["type"] == "urn:privacy-ledger:problem:service_unavailable"


def _ledger(database: Database) -> tuple[list[tuple[int, str, str | None]], dict[str, int]]:
    """The dataset's entries (seq, kind, idempotency key) and run state, read behind the API's
    back; the chain and the replay must verify."""
    with database.read() as session:
        dataset = session.get(Dataset, DATASET)
        assert dataset is not None
        verification = ledger.verify(session, dataset)
        assert verification.ok, verification.problems
        rows = ledger.entries(session, DATASET)
        runs = {run.id: run.epochs_charged for run in session.query(Run).all()}
    return [(e.seq, e.kind, e.idempotency_key) for e in rows], runs


class Admissions:
    """A trainer's admissions, each with its own Idempotency-Key; remembers every 2xx."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.acknowledged: dict[str, Any] = {}

    def post(self, path: str, body: dict[str, Any] | None, key: str) -> httpx.Response:
        response = self.api.post(path, body, headers={"Idempotency-Key": key})
        if response.is_success:
            self.acknowledged[key] = response.json()
        return response


def _check_final(admin: Api, admissions: Admissions) -> None:
    """Over the API: the ledger verifies and holds exactly the admissions that got a 2xx."""
    verified = admin.get(f"/v1/datasets/{DATASET}/ledger/verify")
    assert verified.status_code == 200, verified.text
    assert verified.json()["ok"] and verified.json()["replay_ok"], verified.json()
    page = admin.get(f"/v1/datasets/{DATASET}/ledger", params={"limit": 1000}).json()["data"]
    assert page[0]["kind"] == "dataset_created"
    keys = [entry["idempotency_key"] for entry in page[1:]]
    assert sorted(keys) == sorted(admissions.acknowledged)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_unreachable_then_back(migrated_url: str, database: Database) -> None:
    upstream = make_url(migrated_url)
    with PgProxy((upstream.host or "127.0.0.1", upstream.port or 5432)) as proxy:
        proxied = upstream.set(host="127.0.0.1", port=proxy.port).update_query_dict(
            {"sslmode": "disable", "gssencmode": "disable"}  # plain protocol, for the trap
        )
        settings = Settings(
            database_url=proxied.render_as_string(hide_password=False), admin_key=ADMIN_KEY
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            admin = Api(client, ADMIN_KEY)
            admin.create_dataset(DATASET, 50.0)
            trainer = Admissions(admin.as_key(admin.new_key("trainer", [DATASET])))
            planned = trainer.post(f"/v1/datasets/{DATASET}/runs", PLAN, "plan-1")
            assert planned.status_code == 201, planned.text
            epochs = f"/v1/runs/{planned.json()['id']}/epochs"
            releases = f"/v1/datasets/{DATASET}/releases"
            assert trainer.post(epochs, None, "epoch-1").status_code == 201
            assert trainer.post(releases, RELEASE, "release-1").status_code == 201
            before = _ledger(database)

            # Cut: liveness stays, readiness and every admission answer a 503 problem.
            proxy.cut()
            live = client.get("/livez")
            assert (live.status_code, live.json()) == (200, {"status": "ok"})
            _assert_unavailable(client.get("/readyz"))
            _assert_unavailable(trainer.post(epochs, None, "epoch-2"))
            _assert_unavailable(trainer.post(releases, RELEASE, "release-2"))
            _assert_unavailable(trainer.post(f"/v1/datasets/{DATASET}/runs", PLAN, "plan-2"))
            _assert_unavailable(trainer.api.get(f"/v1/datasets/{DATASET}"))
            assert _ledger(database) == before

            # Back: the very first request succeeds (stale pooled connections are replaced),
            # and a retry of a refused admission is decided afresh.
            proxy.restore()
            retried = trainer.post(epochs, None, "epoch-2")
            assert retried.status_code == 201, retried.text
            assert "Idempotent-Replayed" not in retried.headers
            assert retried.json()["epoch"] == 2
            assert client.get("/readyz").status_code == 200
            assert trainer.post(releases, RELEASE, "release-2").status_code == 201

            # Cut at an admission's COMMIT, before PostgreSQL gets it: nothing is written.
            before = _ledger(database)
            proxy.trap_commit(deliver=False)
            _assert_unavailable(trainer.post(epochs, None, "epoch-3"))
            assert proxy.trapped.wait(WAIT)
            assert _ledger(database) == before
            proxy.restore()
            retried = trainer.post(epochs, None, "epoch-3")
            assert retried.status_code == 201, retried.text
            assert "Idempotent-Replayed" not in retried.headers
            assert retried.json()["epoch"] == 3

            # Cut after PostgreSQL got the COMMIT: the release is written once, its answer lost;
            # the retry replays it instead of charging it again.
            proxy.trap_commit(deliver=True)
            _assert_unavailable(trainer.post(releases, RELEASE, "release-3"))
            assert proxy.trapped.wait(WAIT)
            entries, _ = _ledger(database)
            (committed,) = [seq for seq, _, key in entries if key == "release-3"]
            proxy.restore()
            replayed = trainer.post(releases, RELEASE, "release-3")
            assert replayed.status_code == 201, replayed.text
            assert replayed.headers["Idempotent-Replayed"] == "true"
            assert replayed.json()["ledger_seq"] == committed

            _check_final(admin, trainer)
            _, runs = _ledger(database)
            assert runs == {planned.json()["id"]: 3}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_write_lock_held_elsewhere(
    migrated_url: str, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SQLITE_BUSY_TIMEOUT_MS", 300)
    settings = Settings(database_url=migrated_url, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = Api(client, ADMIN_KEY)
        admin.create_dataset(DATASET, 50.0)
        trainer = Admissions(admin.as_key(admin.new_key("trainer", [DATASET])))
        planned = trainer.post(f"/v1/datasets/{DATASET}/runs", PLAN, "plan-1")
        assert planned.status_code == 201, planned.text
        epochs = f"/v1/runs/{planned.json()['id']}/epochs"
        releases = f"/v1/datasets/{DATASET}/releases"
        assert trainer.post(epochs, None, "epoch-1").status_code == 201
        before = _ledger(database)

        path = make_url(migrated_url).database
        assert path is not None
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            _assert_unavailable(trainer.post(epochs, None, "epoch-2"))
            _assert_unavailable(trainer.post(releases, RELEASE, "release-1"))
            # WAL: readers are not blocked by the writer, so reads and readiness carry on.
            assert trainer.api.get(f"/v1/datasets/{DATASET}").status_code == 200
            assert client.get("/readyz").status_code == 200
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert _ledger(database) == before

        retried = trainer.post(epochs, None, "epoch-2")
        assert retried.status_code == 201, retried.text
        assert "Idempotent-Replayed" not in retried.headers
        assert retried.json()["epoch"] == 2
        assert trainer.post(releases, RELEASE, "release-1").status_code == 201
        _check_final(admin, trainer)

"""API keys: issuing, authenticating (constant time), scoping, revoking.

A key reads `pl_<id>_<secret>`. Only SHA-256(secret) is stored: the secret is
256 random bits, so a fast hash is enough (no dictionary to attack), and the
id makes lookup a primary-key read.

Each process keeps the keys it verified in a `KeyCache` for at most
`LEDGER_KEY_CACHE_SECONDS` (default 1 s), so a caller's requests after the
first in that window cost no database round trip; that is the bound within
which a revocation reaches every worker and process (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain import ledger
from service.domain.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from service.domain.pipeline import Admission, Idempotency, Pipeline, Replayed
from service.storage.database import Database
from service.storage.models import ApiKey, Dataset, utcnow

BOOTSTRAP_ID = "bootstrap"
# The bootstrap key has no row: its entries name the setting it comes from (docs/api.md).
BOOTSTRAP_NAME = "LEDGER_ADMIN_KEY"
_PREFIX = "pl"
_SCAN_BATCH = 500
# Only verified keys enter the cache, so its size is bounded by the keys in use; the cap is a
# guard, not a tuning knob.
KEY_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id, its role, (for scoped keys) its datasets and its name."""

    id: str
    role: str
    datasets: frozenset[str] | None = None
    name: str | None = None

    @property
    def actor(self) -> ledger.Actor:
        """This key as the actor of the entries it writes (name and role as read at sign-in)."""
        return ledger.Actor(self.id, self.name, self.role)

    def require(self, *roles: str) -> None:
        """Forbidden unless this key has one of `roles` (admin always passes)."""
        if self.role != "admin" and self.role not in roles:
            raise Forbidden(f"a {self.role} key may not do this (needs {' or '.join(roles)})")

    def sees(self, dataset_id: str) -> bool:
        """Whether this key may see the dataset at all."""
        return self.datasets is None or dataset_id in self.datasets

    def require_dataset(self, dataset_id: str) -> None:
        """NotFound (not Forbidden: existence is not leaked) for datasets out of scope."""
        if not self.sees(dataset_id):
            raise NotFound(f"dataset {dataset_id!r} not found")


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Verified:
    secret_hash: str
    principal: Principal
    read_from: float  # the clock when the lookup that found the key active began


class KeyCache:
    """The keys this process verified within the last `ttl_s` seconds, by key id.

    The bound: a key whose revocation committed at time R is refused by every process from
    R + `ttl_s` on. An entry is stamped with the clock *before* its row is read, and trusted
    until that stamp plus `ttl_s`; the read saw the key active, so it began before R, and the
    entry runs out before R + `ttl_s`. Revoking through this process forgets the key here at
    once. Only keys found active with their secret enter; an unknown id, a wrong secret or a
    revoked key is looked up every time, as without the cache, so it gives a prober no faster
    answer and leaves nothing behind. `ttl_s` = 0 turns the cache off.

    Refresh ahead: once an entry is half its bound old, one request (`claim_refresh`) looks the
    key up again while the others go on trusting the entry, which is still within the bound.
    Without it, every request in flight would miss the cache at the same moment, once per
    bound, and look the key up at once: a burst of lookups (each a thread and a pooled
    connection) every second under load, where two reads per bound suffice.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        max_entries: int = KEY_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or max_entries < 1:
            raise ValueError("a key cache needs ttl_s >= 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, _Verified] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key_id: str, secret_hash: str) -> Principal | None:
        """The principal of a key verified less than `ttl_s` ago with this secret, else None."""
        entry = self._entries.get(key_id)
        if entry is None or self.clock() - entry.read_from >= self.ttl_s:
            return None
        if not hmac.compare_digest(entry.secret_hash, secret_hash):
            return None
        return entry.principal

    def claim_refresh(self, key_id: str) -> bool:
        """True for one caller once the key's entry is half its bound old: that caller looks the
        key up again (`authenticate(..., refresh=True)`), and the claim ends with the lookup."""
        entry = self._entries.get(key_id)
        if entry is None or self.clock() - entry.read_from < self.ttl_s / 2:
            return False
        with self._lock:
            if key_id in self._refreshing:
                return False
            self._refreshing.add(key_id)
            return True

    def refreshed(self, key_id: str) -> None:
        """The claimed lookup of a key ended (its result, if the key is active, was put)."""
        with self._lock:
            self._refreshing.discard(key_id)

    def put(self, key_id: str, secret_hash: str, principal: Principal, read_from: float) -> None:
        """Remember a key found active by a lookup that began at `read_from` (this clock)."""
        if self.ttl_s == 0:
            return
        with self._lock:
            self._entries.pop(key_id, None)
            if len(self._entries) >= self.max_entries:
                self._evict()
            self._entries[key_id] = _Verified(secret_hash, principal, read_from)

    def forget(self, key_id: str) -> None:
        """Drop a key (this process revoked it)."""
        with self._lock:
            self._entries.pop(key_id, None)

    def _evict(self) -> None:
        now = self.clock()
        for key_id in [k for k, e in self._entries.items() if now - e.read_from >= self.ttl_s]:
            del self._entries[key_id]
        while len(self._entries) >= self.max_entries:  # all fresh: drop the oldest
            del self._entries[next(iter(self._entries))]


def authenticate(
    db: Database,
    token: str | None,
    bootstrap_key: str | None,
    cache: KeyCache | None = None,
    *,
    refresh: bool = False,
) -> Principal:
    """The principal behind a bearer token, or Unauthorized; from `cache` when it has the key.

    `refresh`: the caller claimed the key's refresh (`KeyCache.claim_refresh`): it is looked up
    whatever the cache holds, and a key found revoked or changed leaves the cache at once.
    """
    if refresh:
        assert token is not None and cache is not None
        key_id = _parts(token)[0]
        try:
            return _look_up(db, token, cache)
        except Unauthorized:
            cache.forget(key_id)
            raise
        finally:
            cache.refreshed(key_id)
    known = recognise(token, bootstrap_key, cache)
    if known is not None:
        return known
    assert token is not None  # recognise refused a missing one
    return _look_up(db, token, cache)


def _look_up(db: Database, token: str, cache: KeyCache | None) -> Principal:
    key_id, secret_hash = _parts(token)
    read_from = cache.clock() if cache is not None else 0.0
    with db.lookup() as session:
        key = session.get(ApiKey, key_id)
        # Compare even when the key is unknown, so timing does not tell ids apart.
        stored = key.secret_hash if key is not None else "0" * 64
        matches = hmac.compare_digest(stored, secret_hash)
        if key is None or not matches:
            raise Unauthorized("invalid API key")
        if key.revoked_at is not None:
            raise Unauthorized("this API key has been revoked")
        scope = frozenset(json.loads(key.datasets)) if key.datasets is not None else None
        # The row is read here anyway: its name travels to every entry at no extra query.
        principal = Principal(key.id, key.role, scope, key.name)
    if cache is not None:
        cache.put(key_id, secret_hash, principal, read_from)
    return principal


def recognise(
    token: str | None, bootstrap_key: str | None, cache: KeyCache | None
) -> Principal | None:
    """What `authenticate` can tell without the database: the bootstrap key, a key the cache
    holds, or Unauthorized for a missing or malformed token; None when a lookup must decide."""
    if not token:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    if bootstrap_key and hmac.compare_digest(token.encode(), bootstrap_key.encode()):
        return Principal(BOOTSTRAP_ID, "admin", name=BOOTSTRAP_NAME)
    key_id, secret_hash = _parts(token)
    return cache.get(key_id, secret_hash) if cache is not None else None


def _parts(token: str) -> tuple[str, str]:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise Unauthorized("invalid API key")
    return parts[1], _secret_hash(parts[2])


def issue(
    session: Session, *, role: str, datasets: list[str] | None, name: str | None
) -> tuple[ApiKey, str]:
    """A new key row and its secret bearer token (shown once)."""
    key_id = "key" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id,
        name=name,
        role=role,
        datasets=json.dumps(sorted(set(datasets))) if datasets is not None else None,
        secret_hash=_secret_hash(secret),
        created_at=utcnow(),
    )
    session.add(row)
    return row, f"{_PREFIX}_{key_id}_{secret}"


def revoke(session: Session, key_id: str) -> ApiKey:
    """Mark a key revoked (idempotent)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"key {key_id!r} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def listing(session: Session, *, after: str | None, limit: int) -> list[ApiKey]:
    """Keys in id order after a cursor."""
    statement = select(ApiKey).order_by(ApiKey.id).limit(limit)
    if after:
        statement = statement.where(ApiKey.id > after)
    return list(session.execute(statement).scalars())


def require_datasets_exist(session: Session, datasets: list[str]) -> None:
    """InvalidRequest naming every dataset in a key's scope that does not exist.

    A scope naming a missing dataset would be a typo the admin never notices
    (the key silently reaches nothing), or a key that reaches a dataset someone
    creates later under that name without anyone having decided so.
    """
    wanted = sorted(set(datasets))
    if not wanted:
        return
    found = set(session.execute(select(Dataset.id).where(Dataset.id.in_(wanted))).scalars())
    missing = [d for d in wanted if d not in found]
    if missing:
        names = ", ".join(repr(d) for d in missing)
        raise InvalidRequest(
            f"datasets: no dataset {names}; create it first, or scope the key to existing datasets",
            errors=[
                {"loc": ["body", "datasets", i], "msg": f"no dataset {d!r}", "type": "not_found"}
                for i, d in enumerate(datasets)
                if d in missing
            ],
        )


def count(session: Session) -> int:
    """How many keys exist (revoked ones too)."""
    return int(session.execute(select(func.count()).select_from(ApiKey)).scalar_one())


@dataclass(frozen=True)
class KeyIssued:
    """A new key and its bearer token (shown this once, never stored)."""

    key: ApiKey
    token: str


@dataclass(frozen=True)
class ShownKey:
    """A key as one caller may see it: its scope cut to the caller's own datasets."""

    key: ApiKey
    datasets: list[str] | None


def create(
    pipeline: Pipeline,
    principal: Principal,
    *,
    role: str,
    datasets: list[str] | None,
    name: str | None,
    idempotency: Idempotency | None = None,
) -> KeyIssued | Replayed:
    """Issue a key (admin); the result carries the bearer secret, shown this once."""
    principal.require("admin")

    def decide(session: Session, _: object) -> KeyIssued:
        if datasets is not None:
            require_datasets_exist(session, datasets)
        return KeyIssued(*issue(session, role=role, datasets=datasets, name=name))

    return pipeline.submit(Admission(decide, idempotency=idempotency))


def revoke_key(
    pipeline: Pipeline, principal: Principal, key_id: str, cache: KeyCache | None = None
) -> ApiKey:
    """Revoke a key (admin): refused from the next request on in this process (`cache`), and
    within the cache's bound in every other worker and process."""
    principal.require("admin")
    revoked = pipeline.submit(Admission(lambda session, _: revoke(session, key_id)))
    assert isinstance(revoked, ApiKey)
    if cache is not None:  # after the commit: a lookup from now on reads the revoked row
        cache.forget(key_id)
    return revoked


def list_keys(
    db: Database, principal: Principal, *, after: str | None, limit: int
) -> tuple[list[ShownKey], bool]:
    """Keys in id order, never their secrets; and whether more follow.

    Admins and unscoped auditors see every key. A scoped auditor sees the keys that may act on
    one of its datasets (unscoped keys included), each key's scope cut to the auditor's own:
    like everywhere else, datasets out of its scope are not shown to exist.
    """
    principal.require("auditor")
    scope = None if principal.role == "admin" else principal.datasets
    with db.read() as session:
        if scope is None:
            rows = listing(session, after=after, limit=limit + 1)
            return [ShownKey(r, _scope(r)) for r in rows[:limit]], len(rows) > limit
        shown = _keys_in_scope(session, scope, after=after, wanted=limit + 1)
        return [_within(r, scope) for r in shown[:limit]], len(shown) > limit


def _keys_in_scope(
    session: Session, scope: frozenset[str], *, after: str | None, wanted: int
) -> list[ApiKey]:
    # Scopes are JSON text, so the filter runs here, over batches in id order: there are few keys.
    found: list[ApiKey] = []
    while len(found) < wanted:
        batch = listing(session, after=after, limit=_SCAN_BATCH)
        found.extend(r for r in batch if r.datasets is None or scope & set(json.loads(r.datasets)))
        if len(batch) < _SCAN_BATCH:
            break
        after = batch[-1].id
    return found[:wanted]


def _scope(row: ApiKey) -> list[str] | None:
    return list(json.loads(row.datasets)) if row.datasets is not None else None


def _within(row: ApiKey, scope: frozenset[str]) -> ShownKey:
    datasets = _scope(row)
    return ShownKey(row, sorted(scope.intersection(datasets)) if datasets is not None else None)


def bootstrap_admin(pipeline: Pipeline) -> str | None:
    """On a database with no key at all, issue a first admin key and return its token."""

    def decide(session: Session, _: object) -> str | None:
        if count(session) > 0:
            return None
        return issue(session, role="admin", datasets=None, name="first admin")[1]

    token = pipeline.submit(Admission(decide))
    assert not isinstance(token, Replayed)
    return token

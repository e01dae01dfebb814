"""What the sync and async clients share: calls as data, the retry rule, error mapping.

The two clients differ only in how they send a request and how they sleep;
everything that decides *what* to send, *whether* to retry and *what* an
answer means lives here, so they cannot drift apart.

Retry rule (stripe-python's, narrowed): a request is retried, with exponential
backoff and full jitter, only when no answer came back (connection error,
timeout, dropped connection) or the answer was a 5xx. A 4xx is never retried:
it is the service's considered answer. POSTs are safe to retry because each
carries an Idempotency-Key that stays the same across its retries (the
service replays the first answer instead of charging twice). PATCH and DELETE
carry no key, so they are retried only when the request certainly never
reached the service (connect errors) or it answered 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from trainer_client.errors import LedgerError, TransportError, error_from_problem

logger = logging.getLogger("trainer_client")

# Indirections the tests patch, so retries can be checked without real sleeping.
sleep = time.sleep
async_sleep = asyncio.sleep

USER_AGENT = "privacy-ledger-trainer-client/0.1"
MAX_BACKOFF_SECONDS = 8.0

Params = Mapping[str, str | int | float | bool | None]


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key (a random UUID)."""
    return str(uuid.uuid4())


def segment(value: str) -> str:
    """`value` escaped as one URL path segment."""
    return quote(value, safe="")


@dataclass(frozen=True)
class Call:
    """One API call as data: method, path (under the base URL), query and JSON body."""

    method: str
    path: str
    params: Params | None = None
    body: Any = None
    idempotency_key: str | None = None
    accept: str = "application/json"
    extra_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pages:
    """A paginated listing as data: the call for the page after a cursor, and the cursor's field.

    `call_after(None)` fetches the first page; each next page is fetched with
    the `cursor_key` field of the last item of the page before.
    """

    call_after: Callable[[Any], Call]
    cursor_key: str


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait between attempts.

    The wait before retry `n` (0-based) is drawn uniformly from
    ``[0, min(max_backoff, backoff * 2**n)]`` ("full jitter", AWS Architecture
    Blog, "Exponential backoff and jitter", 2015); a 503's Retry-After, when
    given in seconds, is a floor (capped at `max_backoff`).
    """

    max_retries: int = 3
    backoff: float = 0.25
    max_backoff: float = MAX_BACKOFF_SECONDS
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.backoff >= 0:
            raise ValueError(f"backoff must be >= 0, got {self.backoff}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0**retry)
        wait = self.rng.uniform(0.0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


_SAFE_TO_RESEND_ANYWHERE = frozenset({"GET", "HEAD", "POST"})  # POST: by its Idempotency-Key

# Failures after which the request may have reached the service.
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Failures after which it certainly did not.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def should_retry_exception(method: str, exc: httpx.TransportError) -> bool:
    """Whether a request that got no answer may be sent again."""
    if method in _SAFE_TO_RESEND_ANYWHERE:
        return isinstance(exc, _RETRYABLE_TRANSPORT)
    return isinstance(exc, _NOT_SENT)


def should_retry_status(method: str, status: int) -> bool:
    """Whether an answer with this status may be retried."""
    if status < 500:
        return False
    return method in _SAFE_TO_RESEND_ANYWHERE or status == 503


def retry_wait(
    policy: RetryPolicy,
    request: httpx.Request,
    retry: int,
    outcome: httpx.Response | httpx.TransportError,
) -> float | None:
    """Seconds to wait before retry number `retry` (0-based) after `outcome`; None: do not retry.

    `outcome` is the answer to the last attempt or the failure that left it
    without one. A retry that is going to happen is logged here.
    """
    if retry >= policy.max_retries:
        return None
    if isinstance(outcome, httpx.Response):
        if not should_retry_status(request.method, outcome.status_code):
            return None
        wait = policy.delay(retry, retry_after_seconds(outcome))
        what = str(outcome.status_code)
    else:
        if not should_retry_exception(request.method, outcome):
            return None
        wait = policy.delay(retry)
        what = type(outcome).__name__
    log_retry(request, what, retry, wait)
    return wait


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, when it is given as a number."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from this service, fall back to the backoff
    return seconds if seconds >= 0 else None


def build_request(http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
    """The httpx request for `call`; a POST gets its Idempotency-Key here, once."""
    headers = {"Accept": call.accept, **call.extra_headers}
    if call.method == "POST":
        headers["Idempotency-Key"] = call.idempotency_key or new_idempotency_key()
    params = {k: _param(v) for k, v in (call.params or {}).items() if v is not None}
    content: bytes | None = None
    if call.body is not None:
        content = json.dumps(call.body, allow_nan=False).encode()
        headers["Content-Type"] = "application/json"
    return http.build_request(
        call.method, call.path, params=params, content=content, headers=headers
    )


def _param(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def transport_failure(
    request: httpx.Request, exc: httpx.TransportError, attempts: int
) -> LedgerError:
    """The TransportError raised when no answer came back on any attempt."""
    name = type(exc).__name__
    return TransportError(
        f"{request.method} {request.url.path}: no answer from the ledger after "
        f"{attempts} attempt(s) ({name}: {exc})",
        attempts=attempts,
    )


def log_retry(request: httpx.Request, what: str, retry: int, wait: float) -> None:
    """Note a retry (never the headers: they hold the API key)."""
    logger.info(
        "retrying %s %s after %s (retry %d, waiting %.3fs)",
        request.method,
        request.url.path,
        what,
        retry + 1,
        wait,
    )


def raise_for_status(response: httpx.Response, attempts: int) -> None:
    """Raise the mapped LedgerError when `response` is an error answer."""
    if response.status_code < 400:
        return
    problem: Mapping[str, Any]
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    if isinstance(parsed, Mapping):
        problem = parsed
    else:
        # Not problem+json (a proxy's HTML page, say): keep a short excerpt as the detail.
        problem = {"detail": response.text[:200] or response.reason_phrase}
    raise error_from_problem(
        response.status_code,
        problem,
        request_id=response.headers.get("x-request-id"),
        attempts=attempts,
    )


def json_of(response: httpx.Response) -> Any:
    """The JSON body of a successful answer.

    A dry run the service would refuse answers 200 with ``admitted: false``
    and the refusal's problem body; it is raised here as the exception the
    real call would raise, so a dry run behaves like the call minus the write.
    """
    try:
        body = response.json()
    except ValueError:
        raise LedgerError(
            f"unexpected response: {response.request.method} {response.request.url.path} "
            f"answered {response.status_code} without a JSON body",
            status=response.status_code,
            code="unexpected_response",
        ) from None
    if isinstance(body, Mapping) and body.get("dry_run") is True and body.get("admitted") is False:
        refusal = body.get("refusal")
        problem: Mapping[str, Any] = refusal if isinstance(refusal, Mapping) else {}
        status = problem.get("status")
        raise error_from_problem(
            status if isinstance(status, int) else 409,
            problem,
            request_id=response.headers.get("x-request-id"),
        )
    return body


def page(body: Any) -> tuple[list[Any], bool]:
    """The ``data`` items and ``has_more`` flag of a paginated answer."""
    if not isinstance(body, Mapping) or not isinstance(body.get("data"), list):
        raise LedgerError(
            "unexpected response: a list answer without a 'data' list",
            code="unexpected_response",
        )
    return list(body["data"]), bool(body.get("has_more", False))

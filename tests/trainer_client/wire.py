"""A transport for the clients that records every answer as it came off the wire."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Exchange:
    """One request and the answer the service gave to it."""

    method: str
    path: str
    status: int
    media_type: str
    body: Any  # the parsed JSON, or the text of a non-JSON answer

    def __str__(self) -> str:
        return f"{self.method} {self.path} → {self.status} {self.media_type}"


@dataclass
class Recording:
    """Every exchange the transports of one test saw, in order."""

    exchanges: list[Exchange] = field(default_factory=list)

    def note(self, request: httpx.Request, status: int, headers: httpx.Headers, raw: bytes) -> None:
        """Keep one exchange."""
        media_type = headers.get("content-type", "").split(";")[0].strip()
        text = raw.decode()
        body = json.loads(text) if media_type.endswith("json") else text
        self.exchanges.append(Exchange(request.method, request.url.path, status, media_type, body))


class RecordingTransport(httpx.BaseTransport):
    """httpx's own transport, noting each answer in a `Recording` before the client reads it."""

    def __init__(self, recording: Recording) -> None:
        self._inner = httpx.HTTPTransport()
        self._recording = recording

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        raw = response.read()
        self._recording.note(request, response.status_code, response.headers, raw)
        return httpx.Response(response.status_code, headers=response.headers, content=raw)

    def close(self) -> None:
        self._inner.close()


class AsyncRecordingTransport(httpx.AsyncBaseTransport):
    """The async twin of `RecordingTransport`."""

    def __init__(self, recording: Recording) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._recording = recording

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        raw = await response.aread()
        self._recording.note(request, response.status_code, response.headers, raw)
        return httpx.Response(response.status_code, headers=response.headers, content=raw)

    async def aclose(self) -> None:
        await self._inner.aclose()

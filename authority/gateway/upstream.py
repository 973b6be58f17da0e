"""The gateway's client to its upstream MCP servers: one keep-alive connection pool
(httpcore2, the transport under httpx2), without a client's extras. There is no cookie jar (a
cookie one agent's call received must never ride on another's), no redirects, no environment
proxies; each request carries exactly the headers the gateway chose.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol

import h11
import httpcore2

Headers = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off its answer."""


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers: ...

    def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives (once)."""
        ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def open(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send the request; the response once its head has arrived (``UpstreamError``)."""
        ...

    async def aclose(self) -> None: ...


class _Response:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpcore2.Response) -> None:
        self._response = response
        self.status = response.status
        self.headers: Headers = response.headers

    async def body(self) -> AsyncIterator[bytes]:
        stream = self._response.stream
        if not isinstance(stream, AsyncIterable):
            raise UpstreamError("the pool gave a synchronous body")
        try:
            async for chunk in stream:
                yield chunk
        except (httpcore2.TimeoutException, httpcore2.NetworkError, httpcore2.ProtocolError) as exc:
            raise UpstreamError(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpUpstream:
    """One pool for every upstream (keep-alive per origin)."""

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context or ssl.create_default_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        )
        # read: the longest silence within an answer (an SSE stream's keep-alives reset it)
        self._timeouts = {
            "connect": connect_timeout,
            "read": timeout,
            "write": timeout,
            "pool": timeout,
        }

    async def open(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        sent = list(headers)
        if body or method == "POST":  # the pool sends what it is told: the length too
            sent.append((b"content-length", str(len(body)).encode()))
        request = httpcore2.Request(
            method,
            url,
            headers=sent,
            content=body if body else None,
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._pool.handle_async_request(request)
        except (
            httpcore2.TimeoutException,
            httpcore2.NetworkError,
            httpcore2.ProtocolError,
            httpcore2.UnsupportedProtocol,
            OSError,
            h11.LocalProtocolError,
        ) as exc:
            raise UpstreamError(type(exc).__name__) from None
        return _Response(response)

    async def aclose(self) -> None:
        await self._pool.aclose()

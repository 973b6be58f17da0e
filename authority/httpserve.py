"""HTTPS for workloads that serve HTTP with their SVID: the MCP gateway and relying services.

``TlsIdentity`` holds the server's X.509-SVID, key and trust bundle as an ``ssl.SSLContext``
and replaces them without a restart: the listening context only names, at each handshake, the
context of the SVID held now (an SNI callback switches the connection to it, with or without
SNI in the client's hello), so a rotation applies to the next connection and never touches an
open one. Client certificates are asked for and, when presented, verified against the trust
bundle (``CERT_OPTIONAL``): a client without one still reaches the application, which answers
401 with what to present, as HTTP authorization expects, rather than a bare failed handshake.

``serve`` runs an ASGI application under uvicorn on such a context and puts the client's
verified certificate in each request's scope, as the ASGI TLS extension defines it
(``scope["extensions"]["tls"]["client_cert_chain"]``: PEM strings, leaf first; here the leaf
only, which is what the verified handshake gives Python), plus ``client_cert_der`` (the same
leaf as DER, the form a token's ``cnf`` thumbprint is taken over). ``peer_certificate_der``
reads it back. uvicorn does not expose the peer certificate itself: its protocol is extended
per connection (``_protocol_with_peer``), read once after the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# The HTTP/1.1 parser: httptools (a dependency) unless AUTHORITY_HTTP_PARSER=h11 asks for uvicorn's
# pure-Python one (the benchmark compares them).
HTTP = os.environ.get("AUTHORITY_HTTP_PARSER", "httptools")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_chain_and_key(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``context.load_cert_chain`` from memory. Python's ssl loads only from files: the key is
    written encrypted under a one-time password, in a private temporary folder, and removed."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("an SVID key is an EC key")
    password = secrets.token_bytes(32)
    sealed = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="authority-tls-") as folder:
        chain_path, key_path = Path(folder, "chain.pem"), Path(folder, "key.pem")
        for path, data in ((chain_path, chain_pem), (key_path, sealed)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(chain_path, key_path, password=password)


def client_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """A client's context: presents the SVID, verifies the server's chain against the trust
    bundle. Host names are not checked (SVIDs name SPIFFE IDs, not hosts): check the server's
    SPIFFE ID after the handshake where it matters."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=bundle_pem.decode())
    load_chain_and_key(context, chain_pem, key_pem)
    return context


class TlsIdentity:
    """A server's SVID as TLS contexts, replaceable while serving (``update``)."""

    def __init__(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        self._current = self._context(chain_pem, key_pem, bundle_pem)
        # The listening context needs a certificate of its own for OpenSSL to accept it; each
        # handshake is moved to the current context before any certificate is sent.
        self.listening = self._context(chain_pem, key_pem, bundle_pem)
        self.listening.sni_callback = self._switch
        self.updates = 0

    @staticmethod
    def _context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=bundle_pem.decode())
        load_chain_and_key(context, chain_pem, key_pem)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _switch(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current

    def update(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        """Serve this SVID and trust this bundle from the next handshake on."""
        self._current = self._context(chain_pem, key_pem, bundle_pem)
        self.updates += 1


def peer_certificate_der(scope: Scope) -> bytes | None:
    """The verified client certificate (DER) of the connection a request came on, or None."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    der = tls.get("client_cert_der")
    return der if isinstance(der, bytes) and der else None


def _tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
        "client_cert_der": der or None,
    }


class _WithPeer:
    """The application, seeing this connection's TLS facts in every request's scope."""

    __slots__ = ("_app", "_tls")

    def __init__(self, app: AsgiApp, tls: dict[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = scope.setdefault("extensions", {})
            extensions["tls"] = self._tls
        await self._app(scope, receive, send)


def _with_peer(app: AsgiApp, transport: asyncio.BaseTransport) -> AsgiApp:
    tls = _tls_extension(transport)
    return app if tls is None else _WithPeer(app, tls)


class PeerH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11, pure Python), reading the client certificate once per
    connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_peer(self.config.loaded_app, transport)


class PeerHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C): the same, parsed faster."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_peer(self.config.loaded_app, transport)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the program running it owns those."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpsServer:
    """An ASGI application served over TLS on one address, until ``stop``. With no
    ``identity``, plain HTTP: only for a caller that decided so explicitly (the console's
    ``console_plain_http``)."""

    def __init__(
        self,
        app: AsgiApp,
        identity: TlsIdentity | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_keep_alive: float = 30.0,
        log_level: str = "warning",
    ) -> None:
        self.identity = identity
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
        # (proto 0 kept Nagle on: 40 ms per response, headers and body being two writes).
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host, self.port = host, self._socket.getsockname()[1]
        tls: dict[str, Any] = {}
        if identity is not None:
            listening = identity.listening
            tls["ssl_context_factory"] = lambda _config, _default: listening
        config = uvicorn.Config(
            app,
            http=PeerHttpToolsProtocol if HTTP == "httptools" else PeerH11Protocol,
            lifespan="off",
            log_level=log_level,
            access_log=False,
            server_header=False,
            timeout_keep_alive=int(timeout_keep_alive),
            ws="none",
            **tls,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'http' if self.identity is None else 'https'}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raise what stopped it
                raise RuntimeError("the HTTPS server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()


@contextlib.asynccontextmanager
async def serve(
    app: AsgiApp, identity: TlsIdentity, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[HttpsServer]:
    """Serve ``app`` over TLS (``identity``) while the context is open."""
    server = HttpsServer(app, identity, host=host, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

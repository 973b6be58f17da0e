"""Serving the console: its own listener beside the authority's, with TLS unless refused.

TLS uses, in order: the files given (``console_tls_cert``/``console_tls_key``), else an
X.509-SVID of the authority's own SPIFFE ID issued for the console (renewed at half life and on
CA rotation, through ``httpserve.TlsIdentity``). ``console_plain_http`` serves HTTP, which is
refused on an address other than loopback unless ``console_allow_plain_http`` is set too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority.binding import address_in_use, check_tcp_free
from authority.ca import CertificateAuthority
from authority.clock import Clock
from authority.config import Config, is_loopback, split_host_port
from authority.console.app import Console
from authority.console.auth import ConsoleAuth
from authority.console.links import SignInLinks
from authority.console.views import ConsoleData
from authority.errors import FailedPrecondition
from authority.exchange import ExchangeService
from authority.httpserve import AsgiApp, HttpsServer, Receive, Scope, Send, TlsIdentity
from authority.ids import SpiffeId
from authority.keyvault import private_key_pem
from authority.policy_admin import PolicyAdmin
from authority.service import Authority
from authority.store import Store

log = logging.getLogger(__name__)

CONSOLE_SVID_TTL = dt.timedelta(hours=1)


def check_console_config(config: Config) -> None:
    """Refuse, before anything starts, a console that would serve plain HTTP beyond loopback."""
    if not config.console_listen:
        return
    host, _ = split_host_port(config.console_listen)
    if config.console_plain_http and not is_loopback(host) and not config.console_allow_plain_http:
        raise FailedPrecondition(
            f"console_listen {config.console_listen} is not a loopback address: the console "
            "serves it only over TLS (drop console_plain_http), or set console_allow_plain_http "
            "to send sign-in links and session cookies in clear text",
            reason="CONSOLE_PLAIN_HTTP",
        )
    if (config.console_tls_cert is None) != (config.console_tls_key is None):
        raise FailedPrecondition(
            "console_tls_cert and console_tls_key go together", reason="CONSOLE_TLS_FILES"
        )
    check_tcp_free(config.console_listen, "console_listen")


class _FileIdentity(TlsIdentity):
    """TLS from PEM files (a certificate chain and its key, any key type ssl accepts)."""

    def __init__(self, cert: Path, key: Path, bundle_pem: bytes) -> None:
        self.listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.listening.minimum_version = ssl.TLSVersion.TLSv1_2
        self.listening.verify_mode = ssl.CERT_OPTIONAL
        self.listening.load_verify_locations(cadata=bundle_pem.decode())
        self.listening.load_cert_chain(cert, key)
        self.listening.set_alpn_protocols(["http/1.1"])
        self._current = self.listening
        self.updates = 0


def _derived_url(server: HttpsServer) -> str:
    """The bound address as a URL; an unspecified one (0.0.0.0, ::) by this host's name, which
    browsers can reach (set console_url when they reach it by another)."""
    try:
        unspecified = ipaddress.ip_address(server.host).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        return server.url
    scheme = server.url.split("://", 1)[0]
    return f"{scheme}://{socket.gethostname()}:{server.port}"


class _Deferred:
    """The application, set once the bound port (and so the public URL) is known."""

    app: AsgiApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        await self.app(scope, receive, send)


class ConsoleServer:
    """The console, built over the authority's running parts; ``start`` binds, ``stop`` ends."""

    def __init__(
        self,
        config: Config,
        *,
        authority: Authority,
        exchange: ExchangeService,
        policy: PolicyAdmin,
        store: Store,
        clock: Clock,
    ) -> None:
        self._config = config
        self._authority = authority
        self._ca: CertificateAuthority = authority.ca
        self._clock = clock
        self.auth = ConsoleAuth(clock, config.console_session_ttl)
        self._data = ConsoleData(authority, exchange, policy, store)
        self._store = store
        self._server: HttpsServer | None = None
        self._identity: TlsIdentity | None = None
        self._svid_expires: dt.datetime | None = None
        self.links: SignInLinks | None = None
        self.url = ""

    def _issue(self) -> tuple[bytes, bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        host, _ = split_host_port(self._config.console_listen)
        ips = []
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host or "127.0.0.1")
            ips.append(ipaddress.ip_address("127.0.0.1") if ip.is_unspecified else ip)
        svid = self._ca.issue_x509_svid(
            SpiffeId.from_segments(self._config.trust_domain, "authority"),
            key.public_key(),
            CONSOLE_SVID_TTL,
            dns_names=self._config.server_dns_names,
            ip_addresses=ips,
        )
        self._svid_expires = svid.certificate.not_valid_after_utc
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
        return chain, private_key_pem(key), self._ca.bundle().pem()

    def refresh(self) -> None:
        """A new console certificate (on CA rotation, and at half life)."""
        if self._identity is not None and self._config.console_tls_cert is None:
            self._identity.update(*self._issue())

    def due(self, now: dt.datetime) -> bool:
        expires = self._svid_expires
        return expires is not None and now >= expires - CONSOLE_SVID_TTL / 2

    def _bind(self, app: AsgiApp, host: str, port: int) -> HttpsServer:
        config = self._config
        if config.console_plain_http:
            if not is_loopback(host):
                log.warning(
                    "CONSOLE WITHOUT TLS on %s (console_allow_plain_http): sign-in links and "
                    "session cookies cross the network in clear text",
                    config.console_listen,
                )
            return HttpsServer(app, None, host=host, port=port)
        bundle = self._ca.bundle().pem()
        if config.console_tls_cert is not None and config.console_tls_key is not None:
            self._identity = _FileIdentity(config.console_tls_cert, config.console_tls_key, bundle)
        else:
            self._identity = TlsIdentity(*self._issue())
            self._ca.add_listener(self.refresh)
        return HttpsServer(app, self._identity, host=host, port=port)

    async def start(self) -> None:
        config = self._config
        host, port = split_host_port(config.console_listen)
        app = _Deferred()
        try:
            server = self._bind(app, host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise address_in_use(config.console_listen, "console_listen") from None
            raise
        self.url = (config.console_url or _derived_url(server)).rstrip("/")
        app.app = Console(
            self._data, self.auth, public_url=self.url, secure=not config.console_plain_http
        )
        self.links = SignInLinks(self.auth, self.url, self._store, self._clock)
        await server.start()
        self._server = server
        log.info("console serving: %s (listening on %s)", self.url, server.url)

    async def maintain(self) -> None:
        if self.due(self._clock.now()):
            self.refresh()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None


__all__ = ["ConsoleServer", "check_console_config"]

"""Configuration and hard limits, in frozen dataclasses.

``Config.from_mapping`` validates a parsed TOML document (or any mapping); only the composition root
(``authority.server``) and the CLI read files or the environment. Every bound the server enforces is
in ``Limits``, checked before parsing what it bounds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from authority.errors import InvalidArgument
from authority.ids import SpiffeId, TrustDomain

_T = TypeVar("_T")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)?$")
MAX_UNIX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes, the last one NUL
_INSTANCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # a selector type
LOG_FORMATS = ("text", "json")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def parse_duration(value: str | int | float | dt.timedelta) -> dt.timedelta:
    """``90``, ``"90s"``, ``"5m"``, ``"12h"``, ``"7d"`` -> timedelta (bare numbers are seconds)."""
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidArgument(f"not a duration: {value!r}")
    try:
        if not isinstance(value, str):
            return dt.timedelta(seconds=value)
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise InvalidArgument(f"not a duration: {value!r} (use e.g. 30s, 5m, 12h, 7d)")
        return dt.timedelta(milliseconds=int(match.group(1)) * _UNIT_MS[match.group(2)])
    except (OverflowError, ValueError):  # too large, or a non-finite float
        raise InvalidArgument(f"not a duration: {value!r} (out of range)") from None


def format_duration(value: dt.timedelta) -> str:
    """The inverse of ``parse_duration``: the largest exact unit (ms below whole seconds)."""
    if value % dt.timedelta(seconds=1):
        return f"{round(value / dt.timedelta(milliseconds=1))}ms"
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 256 * 1024
    max_csr_bytes: int = 16 * 1024
    max_evidence_bytes: int = 64 * 1024
    max_attest_rounds: int = 5
    attest_timeout: dt.timedelta = dt.timedelta(seconds=30)
    max_audiences: int = 8
    max_audience_chars: int = 256
    max_selectors: int = 32
    max_dns_names: int = 16
    max_node_csrs: int = 64  # CSRs a node agent sends in one SignAgentSVIDs call
    default_x509_ttl: dt.timedelta = dt.timedelta(minutes=5)
    default_jwt_ttl: dt.timedelta = dt.timedelta(minutes=5)
    max_x509_ttl: dt.timedelta = dt.timedelta(hours=1)
    max_jwt_ttl: dt.timedelta = dt.timedelta(hours=1)
    min_ttl: dt.timedelta = dt.timedelta(seconds=30)
    default_join_token_ttl: dt.timedelta = dt.timedelta(minutes=10)
    max_join_token_ttl: dt.timedelta = dt.timedelta(days=7)
    max_concurrent_streams: int = 1000  # per HTTP/2 connection, on every listener
    max_header_list_bytes: int = 16 * 1024  # HTTP/2 header list of a call on the Unix sockets
    # The gRPC listeners (authority.api.listeners): connections each TCP listener (server-TLS,
    # mutual-TLS) and the admin socket hold at once (more are accepted and closed at once), calls
    # one peer address has in flight on the TCP listeners, how long a TLS handshake and an idle
    # connection may last, and the descriptors kept beyond the caps (the store, files). The
    # soft RLIMIT_NOFILE must hold 2 x max_connections_per_listener + max_admin_connections +
    # max_local_connections per Unix socket (attest, Workload API) + fd_reserve; below that the
    # TCP and Unix caps are lowered in proportion to fit, and under 32 each the server refuses.
    max_connections_per_listener: int = 1000
    max_admin_connections: int = 64
    max_calls_per_peer: int = 1024
    handshake_timeout: dt.timedelta = dt.timedelta(seconds=10)
    connection_idle_timeout: dt.timedelta = dt.timedelta(minutes=5)
    fd_reserve: int = 256
    # The grpclib Unix sockets (attest, Workload API, a node agent's): connections each holds at
    # once, and at once from one uid (more are closed as they come, logged on one throttled line).
    max_local_connections: int = 1024
    max_local_connections_per_uid: int = 256
    # Task tokens and approvals.
    default_task_ttl: dt.timedelta = dt.timedelta(minutes=5)
    approval_wait: dt.timedelta = dt.timedelta(minutes=15)  # a pending approval expires
    default_approval_grant: dt.timedelta = dt.timedelta(minutes=15)
    max_approval_grant: dt.timedelta = dt.timedelta(hours=1)
    # Webhook deliveries of pending approvals waiting to be sent (authority.notify); more are
    # dropped (logged and counted).
    notify_queue: int = 1000
    # Input bounds: every string a request can put into the store or the audit, every integer
    # of a request, every JSON document the server parses, checked before parsing or storing.
    max_name_chars: int = 64  # attestor and plugin names (the selector-type rule)
    max_reason_chars: int = 500  # revocation, denial and end-task reasons, approval notes
    max_request_seconds: int = 366 * 86400  # any *_seconds of a request (TTLs, grants): 0..this
    max_json_bytes: int = 64 * 1024  # attestor configurations, policy inputs, policy tests
    max_json_depth: int = 32
    # Refused attestations in the audit: each field cut to max_refusal_field_chars (then a
    # marker and its SHA-256); per refusal_window, at most refusals_per_caller records per
    # caller and refusals_per_window in all, then one summary record of those suppressed.
    max_refusal_field_chars: int = 256
    refusals_per_caller: int = 10
    refusals_per_window: int = 100
    refusal_window: dt.timedelta = dt.timedelta(minutes=1)
    # Audit export: a page ends at whichever bound comes first; a record larger than one
    # message (written by an older version) travels in fragments of audit_fragment_bytes.
    audit_page_records: int = 1000
    max_export_task_ids: int = 256  # task ids one ExportAudit request may name
    audit_page_bytes: int = 1024 * 1024
    audit_fragment_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (isinstance(value, int) and value <= 0) or (
                isinstance(value, dt.timedelta) and value <= dt.timedelta(0)
            ):
                raise InvalidArgument(f"limits.{f.name} must be positive")
        if self.default_x509_ttl > self.max_x509_ttl or self.default_jwt_ttl > self.max_jwt_ttl:
            raise InvalidArgument("default TTLs must not exceed the maximum TTLs")
        if self.min_ttl > min(self.default_x509_ttl, self.default_jwt_ttl):
            raise InvalidArgument("limits.min_ttl must not exceed the default TTLs")
        if self.audit_fragment_bytes > 3 * 1024 * 1024:
            raise InvalidArgument("limits.audit_fragment_bytes must leave room in a 4 MiB message")


@dataclass(frozen=True, slots=True)
class CaConfig:
    ca_ttl: dt.timedelta = dt.timedelta(hours=24)
    key_type: str = "ec-p256"  # or ec-p384; the JWT signing key follows (ES256 / ES384)
    subject_organization: str = "SPIFFE"
    refresh_hint: dt.timedelta = dt.timedelta(minutes=5)
    # An upstream CA: the authority's signing CAs are then intermediates under it.
    upstream_cert: Path | None = None
    upstream_key: Path | None = None
    upstream_bundle: Path | None = None  # roots, when the upstream certificate is not a root

    def __post_init__(self) -> None:
        if self.key_type not in ("ec-p256", "ec-p384"):
            raise InvalidArgument("ca.key_type must be ec-p256 or ec-p384")
        if self.ca_ttl < dt.timedelta(hours=1):
            raise InvalidArgument("ca.ca_ttl must be at least 1h")
        if self.refresh_hint <= dt.timedelta(0):
            raise InvalidArgument("ca.refresh_hint must be positive")
        if (self.upstream_cert is None) != (self.upstream_key is None):
            raise InvalidArgument("ca.upstream_cert and ca.upstream_key go together")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # Empty: SQLite in the data directory (one authority). postgresql://...: replicas sharing
    # that database form one trust domain (libpq's environment and PGPASSFILE apply; keep the
    # password out of the URL).
    url: str = ""
    # This replica's name on a shared database; empty: generated on first start and kept in
    # <data_dir>/replica-id.
    replica: str = ""

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument("store.url must be a postgresql:// URL (or empty for SQLite)")
        if self.replica and not _REPLICA_NAME.fullmatch(self.replica):
            raise InvalidArgument(
                "store.replica must be 1-32 letters, digits, '-' or '_', starting with a letter"
            )


_REPLICA_NAME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
WEBHOOK_FORMATS: Final = ("json", "slack")
MAX_WEBHOOKS: Final = 16


def check_webhook_url(url: str, *, allow_http: bool = False) -> str:
    """An https URL with a host, or http to a loopback host (any host with ``allow_http``).
    Errors name the problem, never the URL (its path or query may be the webhook's secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise InvalidArgument("a webhook url is https://HOST/... (or http:// to loopback)")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("a webhook url carries no user:password@ (use secret_file)")
    if any(c.isspace() or ord(c) < 0x21 for c in url) or parts.fragment:
        raise InvalidArgument("a webhook url has no spaces, control characters or #fragment")
    if parts.scheme == "http" and not allow_http and not is_loopback(host):
        raise InvalidArgument(
            f"webhook host {host!r}: http only to loopback (or set allow_http = true)"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidArgument(f"webhook host {host!r}: bad port") from None
    return url


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (the webhook, console and metrics rules)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One ``[[webhooks]]`` entry: where pending approvals are posted (authority.notify)."""

    url: str = field(repr=False)  # a Slack webhook's path is its secret
    format: str = "json"  # "json": the generic body; "slack": Slack incoming-webhook text+blocks
    secret_file: Path | None = None  # HMAC-SHA256 key: the file's bytes (stripped of whitespace)
    secret_env: str = ""  # ... or this environment variable's value
    timeout: dt.timedelta = dt.timedelta(seconds=10)  # one attempt, connect to answer
    max_attempts: int = 5  # then given up (logged); 4xx but 429 ends it at once
    allow_http: bool = False  # plain http to a host that is not loopback

    def __post_init__(self) -> None:
        check_webhook_url(self.url, allow_http=self.allow_http)
        if self.format not in WEBHOOK_FORMATS:
            raise InvalidArgument(f"webhooks.format must be one of {', '.join(WEBHOOK_FORMATS)}")
        if self.secret_file is not None and self.secret_env:
            raise InvalidArgument("webhooks: secret_file or secret_env, not both")
        if not 1 <= self.max_attempts <= 20:
            raise InvalidArgument("webhooks.max_attempts must be 1..20")
        if not dt.timedelta(0) < self.timeout <= dt.timedelta(minutes=1):
            raise InvalidArgument("webhooks.timeout must be positive and at most 1m")

    @property
    def host(self) -> str:
        """What logs name: the host, never the path or query."""
        return urllib.parse.urlsplit(self.url).hostname or ""


@dataclass(frozen=True, slots=True)
class Config:
    trust_domain: TrustDomain = field(default_factory=lambda: TrustDomain("example.org"))
    data_dir: Path = Path("authority-data")
    listen: str = "127.0.0.1:8081"
    listen_mtls: str = "127.0.0.1:8082"
    # host:port clients should use for the mutual-TLS endpoint; empty host means "the same host".
    advertise_mtls: str = ""
    admin_socket: Path | None = None  # default: <data_dir>/admin.sock
    admin_socket_mode: int = 0o600
    # The local endpoint: Attest on a Unix socket whose peers the kernel identifies (the unix
    # attestor). Any local process may attest there; attestation is the gate.
    local_socket: Path | None = None  # default: <data_dir>/attest.sock
    local_socket_mode: int = 0o666
    # The SPIFFE Workload API on a Unix socket (off unless set): local processes, identified by
    # the kernel, get the SVIDs their registration entries grant (mode 0666: the kernel is the
    # gate). Selectors are those of the unix attestor, namespaced by this instance name.
    workload_api_socket: Path | None = None
    workload_api_attestor: str = "unix"
    server_dns_names: tuple[str, ...] = ("localhost",)
    # How often the revocation feed sends a heartbeat to a quiet subscriber.
    revocation_heartbeat: dt.timedelta = dt.timedelta(seconds=1)
    # How often the audit chain's head is signed (when it moved).
    audit_checkpoint_interval: dt.timedelta = dt.timedelta(seconds=60)
    log_level: str = "INFO"
    # "text" (one line a record) or "json" (one JSON object a line, for log shippers).
    log_format: str = "text"
    # gRPC reflection on the TCP listeners too (it is always on the admin socket); off, it lists
    # nothing the public ports do not serve.
    reflection_on_public: bool = False
    # Policy files (.cedar or .rego, tests in <name>.tests.json beside them) loaded at start and
    # reloaded when they change; empty: what an operator loaded last, else default deny.
    policy_files: tuple[str, ...] = ()
    # SPIFFE IDs of the MCP gateways that may call ListCallableTools and RecordToolCalls.
    gateways: tuple[str, ...] = ()
    # Prometheus metrics on HOST:PORT (GET /metrics; off when empty): loopback only unless
    # metrics_allow_remote (they carry no secrets but reveal counts).
    metrics_listen: str = ""
    metrics_allow_remote: bool = False
    # The operators' console (authority.console), off unless console_listen is set; TLS with
    # the authority's own certificate unless console_tls_cert/key or console_plain_http.
    console_listen: str = ""
    console_tls_cert: Path | None = None
    console_tls_key: Path | None = None
    console_plain_http: bool = False  # refused beyond loopback without console_allow_plain_http
    console_allow_plain_http: bool = False
    console_session_ttl: dt.timedelta = dt.timedelta(hours=8)
    # The console's public URL: a pending approval's page is <console_url>/approvals/<id>.
    console_url: str = ""
    # Where pending approvals are posted ([[webhooks]] tables; authority.notify).
    webhooks: tuple[WebhookConfig, ...] = ()
    ca: CaConfig = field(default_factory=CaConfig)
    limits: Limits = field(default_factory=Limits)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        if self.admin_socket_mode not in (0o600, 0o660):
            raise InvalidArgument("admin_socket_mode must be 0600 or 0660")
        if self.local_socket_mode not in (0o600, 0o660, 0o666):
            raise InvalidArgument("local_socket_mode must be 0600, 0660 or 0666")
        for address in (self.listen, self.listen_mtls):
            split_host_port(address)
        if self.console_listen:
            split_host_port(self.console_listen)
        if self.workload_api_socket is not None and (
            len(str(self.workload_api_socket).encode()) > MAX_UNIX_SOCKET_PATH
        ):
            raise InvalidArgument(
                f"workload_api_socket must be at most {MAX_UNIX_SOCKET_PATH} bytes (sun_path)"
            )
        if not _INSTANCE_NAME.fullmatch(self.workload_api_attestor):
            raise InvalidArgument("workload_api_attestor must be an attestor instance name")
        for gateway in self.gateways:
            SpiffeId.parse(gateway)  # InvalidSpiffeId names what is wrong
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.metrics_listen:
            check_metrics_listen(self.metrics_listen, allow_remote=self.metrics_allow_remote)
        if self.console_url:
            check_webhook_url(self.console_url, allow_http=True)
        if len(self.webhooks) > MAX_WEBHOOKS:
            raise InvalidArgument(f"at most {MAX_WEBHOOKS} webhooks")

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def local_socket_path(self) -> Path:
        return self.local_socket or self.data_dir / "attest.sock"

    @property
    def advertised_mtls(self) -> str:
        if self.advertise_mtls:
            return self.advertise_mtls
        return f":{split_host_port(self.listen_mtls)[1]}"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Config | None = None) -> Config:
        """Overlay a parsed TOML document on ``base`` (defaults when None); unknown keys fail."""
        base = base or cls()
        top = dict(data)
        ca = _overlay(base.ca, top.pop("ca", {}), "ca")
        limits = _overlay(base.limits, top.pop("limits", {}), "limits")
        store = _overlay(base.store, top.pop("store", {}), "store")
        webhooks = _webhooks(top.pop("webhooks")) if "webhooks" in top else base.webhooks
        return _overlay(base, top, "", ca=ca, limits=limits, store=store, webhooks=webhooks)


def check_metrics_listen(address: str, *, allow_remote: bool, key: str = "metrics_listen") -> None:
    """HOST:PORT on a loopback address (or localhost), unless ``allow_remote``: metrics carry
    no secrets but reveal counts (workloads, issuance, pending approvals)."""
    host, _ = split_host_port(address)
    if not allow_remote and not is_loopback(host):
        raise InvalidArgument(
            f"{key} {address!r} is not a loopback address: metrics reveal counts "
            "(metrics_allow_remote / --metrics-allow-remote exposes them)"
        )


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _webhooks(data: object) -> tuple[WebhookConfig, ...]:
    """``[[webhooks]]``: a list of tables, each with a ``url``."""
    if not isinstance(data, list | tuple):
        raise InvalidArgument("webhooks must be a list of tables ([[webhooks]])")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("url"), str):
            raise InvalidArgument(f"webhooks[{i}] must be a table with a url")
        base = WebhookConfig(url=entry["url"], allow_http=entry.get("allow_http") is True)
        out.append(_overlay(base, entry, f"webhooks[{i}]"))
    return tuple(out)


_OPTIONAL_PATHS = frozenset(
    {
        "secret_file",
        "admin_socket",
        "local_socket",
        "workload_api_socket",
        "console_tls_cert",
        "console_tls_key",
        "upstream_cert",
        "upstream_key",
        "upstream_bundle",
    }
)


def _convert(name: str, current: object, value: object) -> object:
    if isinstance(current, dt.timedelta):
        if not isinstance(value, str | int | float):
            raise InvalidArgument(f"{name} must be a duration such as 30s, 5m, 12h")
        return parse_duration(value)
    if isinstance(current, TrustDomain):
        return TrustDomain.parse(str(value))
    if isinstance(current, Path) or name in _OPTIONAL_PATHS:
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a path (a string)")
        if not value:
            if name in _OPTIONAL_PATHS:
                return None
            raise InvalidArgument(f"{name} must not be empty")
        return Path(value)
    if isinstance(current, tuple):
        if not isinstance(value, list | tuple):
            raise InvalidArgument(f"{name} must be a list")
        return tuple(str(v) for v in value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be true or false")
        return value
    if isinstance(current, int):
        if isinstance(value, str) and name.endswith("_mode"):
            try:
                return int(value, 8)
            except ValueError:
                raise InvalidArgument(f"{name} must be an octal mode such as 0600") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"{name} must be an integer")
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string")
    return value


def _overlay(base: _T, data: object, prefix: str, **fixed: object) -> _T:
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"[{prefix}] must be a table")
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    changes: dict[str, object] = dict(fixed)
    for key, value in data.items():
        if key not in names or key in fixed:
            where = f"{prefix}.{key}" if prefix else key
            raise InvalidArgument(f"unknown configuration key {where!r}")
        changes[key] = _convert(key, getattr(base, key), value)
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]

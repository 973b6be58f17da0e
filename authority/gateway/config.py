"""The gateway's TOML configuration: read once, checked whole, every error naming its key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authority import toolcall
from authority.errors import InvalidArgument
from authority.ids import TrustDomain

# The methods admitted by default: the session's life, discovery, and tools.
DEFAULT_METHODS = frozenset({"initialize", "ping", "server/discover", "tools/list", "tools/call"})
MAX_CREDENTIAL_CHARS = 8192


class GatewayConfigError(InvalidArgument):
    """A configuration that cannot run: the message names the key."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One MCP server behind the gateway, reached at ``/mcp/<name>``."""

    name: str
    url: str
    credential_header: str = "Authorization"
    credential: str | None = field(default=None, repr=False)  # never shown, never logged

    def __repr__(self) -> str:  # no credential, even by accident
        return f"Upstream(name={self.name!r}, url={self.url!r})"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: str
    audience: str
    trust_domain: TrustDomain
    authority: tuple[str, ...]
    trust_bundle: Path
    workload_api_socket: str
    servers: Mapping[str, Upstream]
    public_url: str
    # which of the Workload API's SVIDs is the gateway's (a workload may hold several): by
    # default the first
    spiffe_id: str = ""
    methods: frozenset[str] = DEFAULT_METHODS
    max_body_bytes: int = 1024 * 1024
    max_list_bytes: int = 4 * 1024 * 1024
    stale_after_seconds: float = 5.0
    tools_list_cache_seconds: float = 10.0
    audit_backlog: int = 10_000
    audit_batch: int = 256
    audit_flush_ms: int = 50
    upstream_timeout_seconds: float = 30.0


def _fail(key: str, problem: str) -> GatewayConfigError:
    return GatewayConfigError(f"{key}: {problem}", reason="BAD_CONFIG")


def _str(doc: Mapping[str, Any], key: str, where: str = "", default: str | None = None) -> str:
    name = f"{where}{key}"
    value = doc.get(key, default)
    if value is None:
        raise _fail(name, "is required")
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, "must be a non-empty string")
    return value


def _number(doc: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(key, f"must be a number between {low:g} and {high:g}")
    return float(value)


def _address(key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _fail(key, f"{value!r} is not HOST:PORT")
    return value


def _upstream(index: int, doc: object, env: Mapping[str, str]) -> Upstream:
    where = f"servers[{index}]."
    if not isinstance(doc, Mapping):
        raise _fail(f"servers[{index}]", "must be a table ([[servers]])")
    known = {"name", "url", "credential_header", "credential_file", "credential_env"}
    for key in doc:
        if key not in known:
            raise _fail(
                f"{where}{key}", f"is not a key of [[servers]] ({', '.join(sorted(known))})"
            )
    name = _str(doc, "name", where)
    try:
        toolcall.check_server(name)
    except InvalidArgument as exc:
        raise _fail(f"{where}name", exc.message) from None
    url = _str(doc, "url", where)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"{where}url", f"{url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise _fail(f"{where}url", "must not carry a user or password (use credential_file)")
    header = _str(doc, "credential_header", where, "Authorization")
    if not header.isascii() or any(c in header for c in " :\r\n\t") or not header.isprintable():
        raise _fail(f"{where}credential_header", "is not an HTTP header name")
    if header.lower() in _HOP_BY_HOP | {"host", "content-length", "content-type"}:
        raise _fail(f"{where}credential_header", f"{header!r} cannot carry a credential")
    credential: str | None = None
    if "credential_file" in doc and "credential_env" in doc:
        raise _fail(f"{where}credential_file", "give credential_file or credential_env, not both")
    if "credential_file" in doc:
        path = Path(_str(doc, "credential_file", where))
        try:
            credential = path.read_text().strip()
        except OSError as exc:
            raise _fail(f"{where}credential_file", f"cannot read {path}: {exc.strerror}") from None
        if not credential:
            raise _fail(f"{where}credential_file", f"{path} is empty")
    elif "credential_env" in doc:
        variable = _str(doc, "credential_env", where)
        credential = env.get(variable, "").strip()
        if not credential:
            raise _fail(f"{where}credential_env", f"the environment has no {variable}")
    if credential is not None and (
        len(credential) > MAX_CREDENTIAL_CHARS
        or not credential.isascii()
        or any(c in credential for c in "\r\n\0")
    ):
        # Say nothing of the value itself.
        raise _fail(f"{where}credential", "is not a single line of ASCII text")
    return Upstream(
        name, url.rstrip("/") if parts.path not in ("", "/") else url, header, credential
    )


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_TOP_KEYS = {
    "listen",
    "audience",
    "trust_domain",
    "authority",
    "trust_bundle",
    "workload_api_socket",
    "spiffe_id",
    "public_url",
    "methods",
    "max_body_bytes",
    "stale_after_seconds",
    "tools_list_cache_seconds",
    "audit_backlog",
    "audit_batch",
    "audit_flush_ms",
    "upstream_timeout_seconds",
    "servers",
}


def parse(doc: Mapping[str, Any], *, base: Path, env: Mapping[str, str]) -> GatewayConfig:
    """A checked configuration from the parsed TOML ``doc`` (relative paths from ``base``)."""
    for key in doc:
        if key not in _TOP_KEYS:
            raise _fail(key, f"is not a gateway key ({', '.join(sorted(_TOP_KEYS))})")
    listen = _address("listen", _str(doc, "listen"))
    audience = _str(doc, "audience")
    if len(audience) > 256 or any(c.isspace() for c in audience):
        raise _fail("audience", "must be one name without spaces")
    trust_domain_text = _str(doc, "trust_domain")
    try:
        trust_domain = TrustDomain.parse(trust_domain_text)
    except (InvalidArgument, ValueError) as exc:
        raise _fail("trust_domain", str(exc)) from None
    raw_authority = doc.get("authority")
    if isinstance(raw_authority, str):
        raw_authority = [raw_authority]
    if not isinstance(raw_authority, list) or not raw_authority:
        raise _fail("authority", "is required: the authority's server-TLS address(es), HOST:PORT")
    authority = tuple(
        a if isinstance(a, str) and a.startswith("unix:") else _address("authority", str(a))
        for a in raw_authority
    )
    bundle = base / _str(doc, "trust_bundle")
    if not bundle.is_file():
        raise _fail("trust_bundle", f"no file at {bundle}")
    socket = _str(doc, "workload_api_socket")
    if not socket.startswith(("unix:", "tcp:")):
        socket = str(base / socket)
    spiffe_id = doc.get("spiffe_id", "")
    prefix = trust_domain.id.uri + "/"
    if spiffe_id and (not isinstance(spiffe_id, str) or not spiffe_id.startswith(prefix)):
        raise _fail("spiffe_id", f"must be a SPIFFE ID of {trust_domain}")
    raw_servers = doc.get("servers")
    if not isinstance(raw_servers, list) or not raw_servers:
        raise _fail("servers", "at least one [[servers]] table is required")
    servers: dict[str, Upstream] = {}
    for index, item in enumerate(raw_servers):
        upstream = _upstream(index, item, env)
        if upstream.name in servers:
            raise _fail(f"servers[{index}].name", f"{upstream.name!r} is named twice")
        servers[upstream.name] = upstream
    raw_methods = doc.get("methods", [])
    if not isinstance(raw_methods, list) or not all(
        isinstance(m, str) and m and len(m) <= 128 for m in raw_methods
    ):
        raise _fail("methods", "must be a list of JSON-RPC method names (added to the defaults)")
    public_url = _str(doc, "public_url", default=f"https://{listen}").rstrip("/")
    if urlsplit(public_url).scheme != "https":
        raise _fail("public_url", "must be an https URL")
    return GatewayConfig(
        listen=listen,
        audience=audience,
        trust_domain=trust_domain,
        authority=authority,
        trust_bundle=bundle,
        workload_api_socket=socket,
        servers=servers,
        spiffe_id=spiffe_id,
        public_url=public_url,
        methods=DEFAULT_METHODS | frozenset(raw_methods),
        max_body_bytes=int(_number(doc, "max_body_bytes", 1024 * 1024, 1024, 64 * 1024 * 1024)),
        stale_after_seconds=_number(doc, "stale_after_seconds", 5.0, 0.5, 300.0),
        tools_list_cache_seconds=_number(doc, "tools_list_cache_seconds", 10.0, 0.0, 300.0),
        audit_backlog=int(_number(doc, "audit_backlog", 10_000, 1, 1_000_000)),
        audit_batch=int(_number(doc, "audit_batch", 256, 1, 1000)),
        audit_flush_ms=int(_number(doc, "audit_flush_ms", 50, 1, 10_000)),
        upstream_timeout_seconds=_number(doc, "upstream_timeout_seconds", 30.0, 0.1, 3600.0),
    )


def load(path: Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and check ``path``; a ``GatewayConfigError`` names the first bad key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise GatewayConfigError(
            f"cannot read {path}: {exc.strerror}", reason="BAD_CONFIG"
        ) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(f"{path} is not TOML: {exc}", reason="BAD_CONFIG") from None
    return parse(doc, base=path.parent, env=os.environ if env is None else env)

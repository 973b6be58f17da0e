"""The ``authority`` command: serve, operate (over the admin socket) and act as a workload.

Errors print one line to stderr and exit non-zero; secrets are printed only where the command's
purpose is to hand one over (``token create``, ``workload jwt``) and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

# gRPC's own log lines (a failed handshake, say) would stand before our one-line error on stderr.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf.message import Message

from authority import audit_cli, backoff, logs, prom_cli
from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.status import status_reason
from authority.client import (
    AdminClient,
    FetchedX509Svid,
    RevocationWatcher,
    ServerRotation,
    SvidFiles,
    WorkloadApiClient,
    WorkloadClient,
    der_chain_to_pem,
    read_trust_bundle,
    requires_client_certificate,
    x509pop_responder,
)
from authority.config import (
    LOG_FORMATS,
    Config,
    check_metrics_listen,
    format_duration,
    parse_duration,
    split_host_port,
)
from authority.errors import AuthorityError
from authority.files import check_private_folder
from authority.watch import unseen

if TYPE_CHECKING:
    from authority.agent import AttestProof

DEFAULT_ADMIN_SOCKET = str(Config().admin_socket_path)
ADMIN_SOCKET_ENV = "AUTHORITY_ADMIN_SOCKET"
WATCH_BACKOFF_MAX = 10.0  # `authority watch` is back within this of the authority

_T = TypeVar("_T")


class CliError(click.ClickException):
    """Printed as ``error: ...`` and exit code ``code``, from a command or from an option's
    type (click shows it the same way: one line, no usage text)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code  # click exits 1 when it shows one raised outside a command

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _mtls_port_message(server: str) -> str:
    return (
        f"{server} is the mutual-TLS port; --server names the server-TLS port "
        f"({DEFAULT_TLS_PORT} by default)"
    )


def _run(coro: Coroutine[Any, Any, _T], servers: Sequence[str] = ()) -> _T:
    """Run ``coro``; a failed call is one line. ``servers``: the --server addresses the command
    dialed for server-TLS calls; when one turns out to be a mutual-TLS port, the line says so."""
    try:
        return asyncio.run(coro)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            for server in servers:
                if requires_client_certificate(server):
                    raise CliError(_mtls_port_message(server)) from None
        reason = status_reason(exc)
        suffix = f" [{reason}]" if reason else ""
        raise CliError(f"{exc.code().name}: {exc.details()}{suffix}") from None


def command(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Turn expected failures into one line on stderr and a non-zero exit."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        try:
            return fn(*args, **kwargs)
        except CliError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.code)
        except (AuthorityError, OSError, ValueError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.timedelta:
        try:
            return parse_duration(value)
        except AuthorityError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
DEFAULT_TLS_PORT = split_host_port(Config().listen)[1]


class ServerAddress(click.ParamType):  # type: ignore[type-arg]
    """HOST:PORT of the authority's server-TLS endpoint; anything else is one line."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            host, port = split_host_port(text)
        except AuthorityError:
            host, port = "", 0
        if not host or not port:
            raise CliError(
                f"--server must be HOST:PORT (got {text!r}); the server-TLS port is "
                f"{DEFAULT_TLS_PORT} by default"
            )
        return text


SERVER = ServerAddress()
# Read by read_trust_bundle, whose one-line errors cover a missing file and a folder too.
TRUST_BUNDLE = click.Path(path_type=Path)

admin_socket_option = click.option(
    "--admin-socket",
    envvar=ADMIN_SOCKET_ENV,
    default=DEFAULT_ADMIN_SOCKET,
    show_default=True,
    show_envvar=True,
    help="The authority's operator Unix socket.",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)


def _admin_call(socket_path: str, call: Callable[[AdminClient], Awaitable[_T]]) -> _T:
    if not Path(socket_path).exists():
        raise CliError(
            f"no admin socket at {socket_path} (is the authority running? see --admin-socket)"
        )

    async def go() -> _T:
        async with AdminClient(socket_path) as client:
            return await call(client)

    return _run(go())


def _as_dict(message: Message) -> dict[str, Any]:
    """A message as plain JSON values: integers stay numbers, bytes become base64."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if _is_repeated(field):
                out[field.name] = [_as_dict(v) for v in value]
            else:
                out[field.name] = _as_dict(value)
        elif field.type == field.TYPE_BYTES:
            encode = base64.b64encode
            out[field.name] = (
                [encode(v).decode() for v in value]
                if _is_repeated(field)
                else encode(value).decode()
            )
        else:
            out[field.name] = list(value) if _is_repeated(field) else value
    return out


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _entry_text(entry: pb.RegistrationEntry) -> str:
    lines = [
        f"Entry ID     : {entry.id}",
        f"SPIFFE ID    : {entry.spiffe_id}",
        *(f"Selector     : {s.type}:{s.value}" for s in entry.selectors),
        f"X509-SVID TTL: {format_duration(dt.timedelta(seconds=entry.x509_ttl_seconds))}",
        f"JWT-SVID TTL : {format_duration(dt.timedelta(seconds=entry.jwt_ttl_seconds))}",
        *(f"DNS name     : {n}" for n in entry.dns_names),
        f"Admin        : {str(entry.admin).lower()}",
        f"Prompts      : {'recorded in the audit' if entry.record_prompts else 'digests only'}",
        *([f"Parent ID    : {entry.parent_id}"] if entry.parent_id else []),
    ]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agent-authority")
def main() -> None:
    """A SPIFFE credential authority for autonomous agents."""


main.add_command(prom_cli.healthcheck)
main.add_command(prom_cli.metrics)


# --- serve ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="TOML file."
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", help="HOST:PORT of the server-TLS workload endpoint.")
@click.option("--listen-mtls", help="HOST:PORT of the mutual-TLS workload endpoint.")
@click.option("--admin-socket", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trust-domain")
@click.option(
    "--workload-api-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve the SPIFFE Workload API on this Unix socket (keep the path short).",
)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    help="text (default) or json: one JSON object a line, for log shippers.",
)
@click.option(
    "--store",
    "store_url",
    help="postgresql://HOST/DB: share that database with other replicas (password from "
    "PGPASSFILE or the libpq environment, not the URL). Default: SQLite in the data directory.",
)
@click.option("--replica", help="This replica's name on a shared store (default: generated).")
@click.option(
    "--metrics-listen",
    help="HOST:PORT: Prometheus metrics at http://HOST:PORT/metrics (loopback unless "
    "--metrics-allow-remote).",
)
@click.option(
    "--metrics-allow-remote", is_flag=True, help="Let --metrics-listen bind a non-loopback address."
)
@click.option("--console-listen", help="HOST:PORT of the operators' console (off by default).")
@click.option("--console-url", help="The console's public URL (default: from the bound address).")
@click.option(
    "--console-tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM chain for the console (default: a certificate of the authority's own).",
)
@click.option("--console-tls-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--console-plain-http", is_flag=True, help="Serve the console without TLS.")
@click.option(
    "--console-allow-plain-http",
    is_flag=True,
    help="Allow --console-plain-http on an address other than loopback (clear-text cookies).",
)
@command
def serve(
    config_file: Path | None,
    data_dir: Path | None,
    listen: str | None,
    listen_mtls: str | None,
    admin_socket: Path | None,
    trust_domain: str | None,
    workload_api_socket: Path | None,
    log_level: str | None,
    log_format: str | None,
    store_url: str | None,
    replica: str | None,
    metrics_listen: str | None,
    metrics_allow_remote: bool,
    console_listen: str | None,
    console_url: str | None,
    console_tls_cert: Path | None,
    console_tls_key: Path | None,
    console_plain_http: bool,
    console_allow_plain_http: bool,
) -> None:
    """Run the authority (creates its CA in the data directory on first start)."""
    from authority.server import serve as run_server  # the server's imports are heavier

    doc: dict[str, Any] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"{config_file}: {exc}") from None
    overrides = {
        "data_dir": data_dir,
        "listen": listen,
        "listen_mtls": listen_mtls,
        "admin_socket": admin_socket,
        "trust_domain": trust_domain,
        "workload_api_socket": workload_api_socket,
        "log_level": log_level,
        "log_format": log_format,
        "metrics_listen": metrics_listen,
        "console_listen": console_listen,
        "console_url": console_url,
        "console_tls_cert": console_tls_cert,
        "console_tls_key": console_tls_key,
    }
    doc.update({k: str(v) for k, v in overrides.items() if v is not None})
    if metrics_allow_remote:
        doc["metrics_allow_remote"] = True
    for key, flag in (
        ("console_plain_http", console_plain_http),
        ("console_allow_plain_http", console_allow_plain_http),
    ):
        if flag:
            doc[key] = True
    store_doc = dict(doc.get("store", {}))
    store_doc.update({k: v for k, v in (("url", store_url), ("replica", replica)) if v})
    if store_doc:
        doc["store"] = store_doc
    config = Config.from_mapping(doc)
    logs.configure(config.log_level, config.log_format)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_server(config, stop)

    asyncio.run(main_loop())


# --- entries -------------------------------------------------------------------------------


@main.group()
def entry() -> None:
    """Registration entries: selectors -> SPIFFE ID."""


_FORCE_HELP = (
    "Accept selectors no registered attestor can produce now (for an attestor registered later)."
)


@entry.command("create")
@click.option("--spiffe-id", required=True)
@click.option(
    "--selector", "selectors", multiple=True, required=True, help="TYPE:VALUE, repeatable."
)
@click.option("--x509-ttl", type=DURATION)
@click.option("--jwt-ttl", type=DURATION)
@click.option("--dns-name", "dns_names", multiple=True)
@click.option(
    "--admin",
    is_flag=True,
    help="Mark the entry's identities admin: task-token policies see attributes.admin = "
    '"true" (Cedar context.attributes, Rego input.attributes). It grants no operator API: that '
    "is served on the admin socket alone. Not with --parent-id.",
)
@click.option(
    "--record-prompts",
    is_flag=True,
    help="Keep the full prompt text agents send with Exchange in the audit (else digests only).",
)
@click.option(
    "--parent-id",
    default="",
    help="A node entry: served only by the node agent with this SPIFFE ID (authority agent).",
)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@admin_socket_option
@format_option
@command
def entry_create(
    spiffe_id: str,
    selectors: tuple[str, ...],
    x509_ttl: dt.timedelta | None,
    jwt_ttl: dt.timedelta | None,
    dns_names: tuple[str, ...],
    admin: bool,
    record_prompts: bool,
    parent_id: str,
    force: bool,
    admin_socket: str,
    fmt: str,
) -> None:
    """Create an entry.

    Selectors are ATTESTOR:KEY:VALUE: ATTESTOR a registered attestor instance (authority
    attestor list), KEY one its plugin produces. A node entry (--parent-id) takes the selectors
    the agent's unix attestor finds on its machine (unix:uid:1000, unix:path:..., ...)."""
    request = pb.CreateEntryRequest(
        spiffe_id=spiffe_id,
        selectors=_selectors_pb(selectors),
        x509_ttl_seconds=int(x509_ttl.total_seconds()) if x509_ttl else 0,
        jwt_ttl_seconds=int(jwt_ttl.total_seconds()) if jwt_ttl else 0,
        dns_names=list(dns_names),
        admin=admin,
        record_prompts=record_prompts,
        parent_id=parent_id,
        force=force,
    )
    created = _admin_call(admin_socket, lambda c: c.stub.CreateEntry(request))
    click.echo(json.dumps(_as_dict(created)) if fmt == "json" else _entry_text(created))


def _selectors_pb(selectors: tuple[str, ...]) -> list[pb.Selector]:
    parsed = []
    for text in selectors:
        kind, sep, value = text.partition(":")
        if not sep or not kind or not value:
            raise CliError(f"selector {text!r} must be TYPE:VALUE")
        parsed.append(pb.Selector(type=kind, value=value))
    return parsed


@entry.command("update")
@click.argument("entry_id")
@click.option("--x509-ttl", type=DURATION, help="0: the configured default.")
@click.option("--jwt-ttl", type=DURATION, help="0: the configured default.")
@click.option(
    "--dns-name", "dns_names", multiple=True, help="The new DNS names (replace the old ones)."
)
@click.option("--no-dns-names", is_flag=True, help="Remove every DNS name.")
@click.option(
    "--selector", "selectors", multiple=True, help="The new selectors (replace the old ones)."
)
@click.option(
    "--record-prompts/--no-record-prompts", default=None, help="Keep full prompt text, or not."
)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@admin_socket_option
@format_option
@command
def entry_update(
    entry_id: str,
    x509_ttl: dt.timedelta | None,
    jwt_ttl: dt.timedelta | None,
    dns_names: tuple[str, ...],
    no_dns_names: bool,
    selectors: tuple[str, ...],
    record_prompts: bool | None,
    force: bool,
    admin_socket: str,
    fmt: str,
) -> None:
    """Change an entry's TTLs, DNS names, selectors or prompt recording; what is not given
    stays. Its SPIFFE ID, parent and admin flag are fixed (delete and create for those).
    Node agents and open Workload API streams get the change at once."""
    if dns_names and no_dns_names:
        raise CliError("give --dns-name or --no-dns-names, not both")
    request = pb.UpdateEntryRequest(
        id=entry_id,
        replace_dns_names=bool(dns_names) or no_dns_names,
        dns_names=list(dns_names),
        replace_selectors=bool(selectors),
        selectors=_selectors_pb(selectors),
        force=force,
    )
    if x509_ttl is not None:
        request.x509_ttl_seconds = int(x509_ttl.total_seconds())
    if jwt_ttl is not None:
        request.jwt_ttl_seconds = int(jwt_ttl.total_seconds())
    if record_prompts is not None:
        request.record_prompts = record_prompts
    if not any(request.HasField(f) for f in ("x509_ttl_seconds", "jwt_ttl_seconds")) and not (
        request.replace_dns_names or request.replace_selectors or record_prompts is not None
    ):
        raise CliError("nothing to change: give --x509-ttl, --jwt-ttl, --dns-name, --selector...")
    updated = _admin_call(admin_socket, lambda c: c.stub.UpdateEntry(request))
    click.echo(json.dumps(_as_dict(updated)) if fmt == "json" else _entry_text(updated))


@entry.command("list")
@admin_socket_option
@format_option
@command
def entry_list(admin_socket: str, fmt: str) -> None:
    """List entries."""
    response = _admin_call(admin_socket, lambda c: c.stub.ListEntries(pb.ListEntriesRequest()))
    if fmt == "json":
        click.echo(json.dumps([_as_dict(e) for e in response.entries]))
        return
    click.echo(f"Found {len(response.entries)} entries")
    for item in response.entries:
        click.echo("\n" + _entry_text(item))


@entry.command("show")
@click.argument("entry_id")
@admin_socket_option
@format_option
@command
def entry_show(entry_id: str, admin_socket: str, fmt: str) -> None:
    """Show one entry."""
    found = _admin_call(admin_socket, lambda c: c.stub.GetEntry(pb.GetEntryRequest(id=entry_id)))
    click.echo(json.dumps(_as_dict(found)) if fmt == "json" else _entry_text(found))


@entry.command("delete")
@click.argument("entry_id")
@admin_socket_option
@command
def entry_delete(entry_id: str, admin_socket: str) -> None:
    """Delete an entry."""
    _admin_call(admin_socket, lambda c: c.stub.DeleteEntry(pb.DeleteEntryRequest(id=entry_id)))
    click.echo(f"deleted {entry_id}", err=True)


# --- join tokens ---------------------------------------------------------------------------


@main.group()
def token() -> None:
    """Join tokens."""


@token.command("create")
@click.option("--spiffe-id", required=True, help="The identity the token grants.")
@click.option("--ttl", type=DURATION, default="10m", show_default=True)
@admin_socket_option
@command
def token_create(spiffe_id: str, ttl: dt.timedelta, admin_socket: str) -> None:
    """Create a single-use join token; prints the token alone on stdout."""
    request = pb.CreateJoinTokenRequest(spiffe_id=spiffe_id, ttl_seconds=int(ttl.total_seconds()))
    created = _admin_call(admin_socket, lambda c: c.stub.CreateJoinToken(request))
    click.echo(created.token)


# --- bundle and CA -------------------------------------------------------------------------


def _bundle_output(bundle: pb.Bundle, fmt: str) -> str:
    if fmt == "jwks":
        return json.dumps(json.loads(bundle.jwks_json), indent=2)
    return der_chain_to_pem(list(bundle.x509_authorities)).decode()


@main.group()
def bundle() -> None:
    """The trust bundle."""


@bundle.command("show")
@click.option(
    "--format", "fmt", type=click.Choice(["pem", "jwks"]), default="pem", show_default=True
)
@click.option(
    "--server",
    type=SERVER,
    multiple=True,
    help="Fetch from a workload endpoint instead of the admin socket (repeat: replicas).",
)
@click.option("--trust-bundle", type=TRUST_BUNDLE)
@admin_socket_option
@command
def bundle_show(
    fmt: str, server: tuple[str, ...], trust_bundle: Path | None, admin_socket: str
) -> None:
    """Print the bundle as PEM or as the SPIFFE JWK Set."""
    if server:
        if trust_bundle is None:
            raise CliError("--server needs --trust-bundle to verify the server")
        bundle_pem = read_trust_bundle(trust_bundle)

        async def fetch() -> pb.Bundle:
            async with WorkloadClient(server, bundle_pem) as client:
                return await client.get_bundle()

        result = _run(fetch(), server)
    else:
        result = _admin_call(admin_socket, lambda c: c.stub.GetBundle(pb.GetBundleRequest()))
    click.echo(_bundle_output(result, fmt), nl=fmt == "jwks")


@main.group()
def ca() -> None:
    """The trust domain's signing keys."""


def _authorities_text(authorities: list[pb.Authority]) -> str:
    rows = []
    for a in authorities:
        until = dt.datetime.fromtimestamp(a.not_after, dt.UTC).isoformat()
        rows.append(f"{a.kind:5} {a.state:9} {a.key_id}  until {until}")
    return "\n".join(rows)


@ca.command("rotate")
@click.option(
    "--immediate",
    is_flag=True,
    help="Prepare and activate at once (a compromised key); old bundles stop verifying.",
)
@admin_socket_option
@format_option
@command
def ca_rotate(immediate: bool, admin_socket: str, fmt: str) -> None:
    """Rotate one step: prepare and publish new keys, or activate the prepared ones.

    Run it once, let relying parties fetch the bundle (its refresh hint), then run it again.
    """
    request = pb.RotateCARequest(immediate=immediate)
    response = _admin_call(admin_socket, lambda c: c.stub.RotateCA(request))
    if fmt == "json":
        click.echo(json.dumps([_as_dict(a) for a in response.authorities]))
    else:
        click.echo(_authorities_text(list(response.authorities)))


@ca.command("list")
@admin_socket_option
@format_option
@command
def ca_list(admin_socket: str, fmt: str) -> None:
    """List the signing keys and their states."""
    response = _admin_call(
        admin_socket, lambda c: c.stub.ListAuthorities(pb.ListAuthoritiesRequest())
    )
    if fmt == "json":
        click.echo(json.dumps([_as_dict(a) for a in response.authorities]))
    else:
        click.echo(_authorities_text(list(response.authorities)))


# --- attestors ----------------------------------------------------------------------------


@main.group()
def attestor() -> None:
    """Attestor instances: a plugin, its configuration, and the name its selectors carry."""


def _config_from(config_file: Path | None, settings: tuple[str, ...]) -> str:
    """--config FILE (JSON or TOML) and/or --set key=value (value parsed as JSON if it parses)."""
    config: dict[str, Any] = {}
    if config_file is not None:
        text = config_file.read_text()
        try:
            loaded = json.loads(text) if config_file.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"{config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"{config_file}: the configuration must be an object")
        config.update(loaded)
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r} must be KEY=VALUE")
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return json.dumps(config)


def _attestor_text(record: pb.AttestorInstance) -> str:
    created = dt.datetime.fromtimestamp(record.created_at, dt.UTC).isoformat()
    return (
        f"{record.name:20} plugin={record.plugin:12} created={created} config={record.config_json}"
    )


config_options = [
    click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="A JSON or TOML file with the configuration.",
    ),
    click.option("--set", "settings", multiple=True, help="KEY=VALUE (JSON values allowed)."),
]


@attestor.command("register")
@click.argument("name")
@click.option("--plugin", required=True, help="The plugin's entry-point name (see attestor list).")
@config_options[0]
@config_options[1]
@admin_socket_option
@format_option
@command
def attestor_register(
    name: str,
    plugin: str,
    config_file: Path | None,
    settings: tuple[str, ...],
    admin_socket: str,
    fmt: str,
) -> None:
    """Register an attestor instance (validated by the plugin before it is stored)."""
    request = pb.RegisterAttestorRequest(
        name=name, plugin=plugin, config_json=_config_from(config_file, settings)
    )
    record = _admin_call(admin_socket, lambda c: c.stub.RegisterAttestor(request))
    click.echo(json.dumps(_as_dict(record)) if fmt == "json" else _attestor_text(record))


@attestor.command("update")
@click.argument("name")
@config_options[0]
@config_options[1]
@admin_socket_option
@format_option
@command
def attestor_update(
    name: str, config_file: Path | None, settings: tuple[str, ...], admin_socket: str, fmt: str
) -> None:
    """Replace an instance's configuration (validated first; the old one stays on error)."""
    request = pb.UpdateAttestorRequest(name=name, config_json=_config_from(config_file, settings))
    record = _admin_call(admin_socket, lambda c: c.stub.UpdateAttestor(request))
    click.echo(json.dumps(_as_dict(record)) if fmt == "json" else _attestor_text(record))


@attestor.command("list")
@admin_socket_option
@format_option
@command
def attestor_list(admin_socket: str, fmt: str) -> None:
    """List attestor instances and the installed plugins."""
    response = _admin_call(admin_socket, lambda c: c.stub.ListAttestors(pb.ListAttestorsRequest()))
    if fmt == "json":
        click.echo(json.dumps(_as_dict(response)))
        return
    for record in response.attestors:
        click.echo(_attestor_text(record))
    click.echo(f"plugins installed: {', '.join(response.plugins)}")


@attestor.command("show")
@click.argument("name")
@admin_socket_option
@format_option
@command
def attestor_show(name: str, admin_socket: str, fmt: str) -> None:
    """Show one attestor instance."""
    record = _admin_call(
        admin_socket, lambda c: c.stub.GetAttestor(pb.GetAttestorRequest(name=name))
    )
    click.echo(json.dumps(_as_dict(record)) if fmt == "json" else _attestor_text(record))


@attestor.command("unregister")
@click.argument("name")
@admin_socket_option
@command
def attestor_unregister(name: str, admin_socket: str) -> None:
    """Unregister an instance: it attests no more, and SVIDs it granted are no longer renewed."""
    _admin_call(
        admin_socket, lambda c: c.stub.UnregisterAttestor(pb.UnregisterAttestorRequest(name=name))
    )
    click.echo(f"unregistered {name}", err=True)


# --- approvals and policy ------------------------------------------------------------------


def _approval_text(a: pb.ApprovalInfo) -> str:
    intent = json.loads(a.intent_json) if a.intent_json else {}
    until = dt.datetime.fromtimestamp(a.grant_expires_at or a.expires_at, dt.UTC).isoformat(
        timespec="seconds"
    )
    return (
        f"{a.id}  {a.state:9} {a.principal}  {intent.get('action')} {intent.get('resource')} "
        f"aud={a.audience} task={a.task_id} until={until} purpose={intent.get('purpose')!r}"
        + (f" note={a.note!r}" if a.note else "")
    )


@main.group()
def approvals() -> None:
    """Elevations waiting for an operator."""


@approvals.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include answered and expired ones.")
@admin_socket_option
@format_option
@command
def approvals_list(show_all: bool, admin_socket: str, fmt: str) -> None:
    """List pending approvals (all with --all)."""
    request = pb.ListApprovalsRequest(all=show_all)
    response = _admin_call(admin_socket, lambda c: c.stub.ListApprovals(request))
    if fmt == "json":
        click.echo(json.dumps([_as_dict(a) for a in response.approvals]))
        return
    for item in response.approvals:
        click.echo(_approval_text(item))
    if not response.approvals:
        click.echo("no approvals", err=True)


@main.command()
@click.argument("approval_id")
@click.option("--for", "grant", type=DURATION, help="How long the approval lasts (default 15m).")
@click.option("--note", default="", help="Why, for the audit.")
@admin_socket_option
@command
def approve(approval_id: str, grant: dt.timedelta | None, note: str, admin_socket: str) -> None:
    """Approve an elevation: the agent may collect one token for exactly that intent."""
    request = pb.ApproveRequest(
        id=approval_id, grant_seconds=int(grant.total_seconds()) if grant else 0, note=note
    )
    click.echo(_approval_text(_admin_call(admin_socket, lambda c: c.stub.Approve(request))))


@main.command()
@click.argument("approval_id")
@click.option("--reason", required=True)
@admin_socket_option
@command
def deny(approval_id: str, reason: str, admin_socket: str) -> None:
    """Deny an elevation."""
    request = pb.DenyRequest(id=approval_id, reason=reason)
    click.echo(_approval_text(_admin_call(admin_socket, lambda c: c.stub.Deny(request))))


@main.group()
def console() -> None:
    """The operators' console (authority serve --console-listen)."""


@console.command("login")
@click.option(
    "--operator", required=True, help="Your name: approvals you decide record it as decided_by."
)
@click.option("--ttl", type=DURATION, help="How long the link may wait to be used (default 5m).")
@admin_socket_option
@command
def console_login(operator: str, ttl: dt.timedelta | None, admin_socket: str) -> None:
    """Print a one-time sign-in link to the console (it signs in once, within minutes)."""
    request = pb.CreateConsoleSignInRequest(
        operator=operator, ttl_seconds=int(ttl.total_seconds()) if ttl else 0
    )
    link = _admin_call(admin_socket, lambda c: c.stub.CreateConsoleSignIn(request))
    expires = dt.datetime.fromtimestamp(link.expires_at, dt.UTC)
    click.echo(link.url)
    click.echo(f"signs in once, until {expires.isoformat(timespec='seconds')}", err=True)


@console.command("logout")
@click.option("--operator", required=True, help="The name given to console login, or a SPIFFE ID.")
@admin_socket_option
@command
def console_logout(operator: str, admin_socket: str) -> None:
    """End every console session of an operator, and its unused sign-in links."""
    request = pb.EndConsoleSessionsRequest(operator=operator)
    ended = _admin_call(admin_socket, lambda c: c.stub.EndConsoleSessions(request))
    click.echo(f"{operator}: {ended.sessions} sessions ended, {ended.links} unused links dropped")


@main.group()
def policy() -> None:
    """Policy-as-code (Cedar, or Rego with the rego extra)."""


def _policy_files(files: tuple[Path, ...]) -> dict[str, str]:
    """The given policy files and the tests files beside them."""
    from authority.policy.loader import tests_file_for

    found: dict[str, str] = {}
    for path in files:
        found[path.name] = path.read_text()
        tests = tests_file_for(path)
        if not path.name.endswith(".tests.json") and tests.exists():
            found[tests.name] = tests.read_text()
    return found


def _policy_text(info: pb.PolicyInfo) -> str:
    loaded = dt.datetime.fromtimestamp(info.loaded_at, dt.UTC).isoformat(timespec="seconds")
    files = ", ".join(info.files) or "(built-in default: deny everything)"
    if not info.tests_total:
        tests = "none (untested)"
    elif info.tests_passed == info.tests_total:
        tests = f"{info.tests_total}, all passed when it was loaded"
    else:
        tests = f"{info.tests_passed} of {info.tests_total} passed when it was loaded"
    return (
        f"policy {info.policy_id} version {info.version} ({info.backend}), loaded {loaded}\n"
        f"files: {files}\ntests: {tests}"
    )


@policy.command("load")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option(
    "--allow-untested",
    is_flag=True,
    help="Load a policy that has no test cases (refused otherwise, as policy test fails it).",
)
@admin_socket_option
@command
def policy_load(files: tuple[Path, ...], allow_untested: bool, admin_socket: str) -> None:
    """Replace the running policy (only if it compiles and its own tests, in <stem>.tests.json
    beside each file, pass)."""
    request = pb.LoadPolicyRequest(
        files=[pb.PolicyFile(name=n, content=c) for n, c in _policy_files(files).items()],
        allow_untested=allow_untested,
    )
    click.echo(_policy_text(_admin_call(admin_socket, lambda c: c.stub.LoadPolicy(request))))


@policy.command("show")
@admin_socket_option
@command
def policy_show(admin_socket: str) -> None:
    """Show the running policy."""
    info = _admin_call(admin_socket, lambda c: c.stub.GetPolicy(pb.GetPolicyRequest()))
    click.echo(_policy_text(info))


@policy.command("test")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@command
def policy_test(files: tuple[Path, ...]) -> None:
    """Compile policies and run their tests locally (exit 1 on any failure; for CI)."""
    from authority.policy import load_policy_set, run_policy_tests
    from authority.policy.loader import find_policy_tests

    sources = [f for f in files if not f.name.endswith(".tests.json")]
    tests = [f for f in files if f.name.endswith(".tests.json")] or find_policy_tests(sources)
    engine = load_policy_set(sources, None)
    results = run_policy_tests(engine, tests)
    failed = 0
    for result in results:
        mark = "ok  " if result.passed else "FAIL"
        failed += not result.passed
        detail = "" if result.passed else ": " + "; ".join(result.failures)
        click.echo(f"{mark} {result.name}{detail}")
    click.echo(f"{len(results) - failed} passed, {failed} failed")
    if failed or not results:
        sys.exit(1)


@policy.command("explain")
@click.option(
    "--input",
    "input_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@admin_socket_option
@command
def policy_explain(input_file: Path, admin_socket: str) -> None:
    """Explain the running policy's decision for an input (JSON, as in policy tests).

    The authority's facts at the top level (principal, action, resource, audience, time, risk,
    delegation_depth, approved, attributes); what the caller says under "requested" (purpose,
    environment, parameters). The resource's kind and environment follow from its name."""
    request = pb.ExplainPolicyRequest(input_json=input_file.read_text())
    response = _admin_call(admin_socket, lambda c: c.stub.ExplainPolicy(request))
    click.echo(json.dumps(json.loads(response.explanation_json), indent=2))


# --- revocation --------------------------------------------------------------------------


@main.command()
@click.option("--jti")
@click.option("--task")
@click.option("--spiffe-id")
@click.option("--entry")
@click.option("--attestor", "attestor_name")
@click.option("--key", "key_id")
@click.option("--reason", required=True)
@click.option(
    "--preemptive",
    is_flag=True,
    help="Revoke an entry, attestor or SPIFFE ID the authority has no record of (yet); "
    "refused NOT_FOUND otherwise. Recorded as preemptive in the audit.",
)
@admin_socket_option
@format_option
@command
def revoke(
    jti: str | None,
    task: str | None,
    spiffe_id: str | None,
    entry: str | None,
    attestor_name: str | None,
    key_id: str | None,
    reason: str,
    preemptive: bool,
    admin_socket: str,
    fmt: str,
) -> None:
    """Revoke a token, task, SPIFFE ID, entry, attestor or signing key (durable on return)."""
    given = [
        (kind, value)
        for kind, value in (
            ("jti", jti),
            ("task", task),
            ("subject", spiffe_id),
            ("entry", entry),
            ("attestor", attestor_name),
            ("key", key_id),
        )
        if value
    ]
    if len(given) != 1:
        raise CliError("give exactly one of --jti, --task, --spiffe-id, --entry, --attestor, --key")
    kind, target = given[0]
    request = pb.RevokeRequest(kind=kind, target=target, reason=reason, preemptive=preemptive)
    response = _admin_call(admin_socket, lambda c: c.stub.Revoke(request))
    for event in response.revocations:
        if fmt == "json":
            click.echo(json.dumps(_event_json(event)))
        else:
            click.echo(f"revoked {event.kind} {event.target} (seq {event.seq})")


def _event_json(event: pb.RevocationEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "target": event.target,
        "reason": event.reason,
        "actor": event.actor,
        "revoked_at": dt.datetime.fromtimestamp(event.revoked_at_us / 1e6, dt.UTC).isoformat(),
        "expires_at": dt.datetime.fromtimestamp(event.expires_at_us / 1e6, dt.UTC).isoformat(),
        "security_event_token": event.security_event_token,
    }


@main.command()
@click.option("--since", type=int, default=0, show_default=True, help="The last seq already seen.")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("--heartbeats", is_flag=True, help="Print heartbeats too.")
@click.option(
    "--server",
    type=SERVER,
    multiple=True,
    help="Subscribe as a relying service does (mutual TLS). Repeat it for the authority's "
    "replicas: a lost stream resumes on the next one.",
)
@click.option("--svid-dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--trust-bundle", type=TRUST_BUNDLE)
@admin_socket_option
@command
def watch(
    since: int,
    fmt: str,
    heartbeats: bool,
    server: tuple[str, ...],
    svid_dir: Path | None,
    trust_bundle: Path | None,
    admin_socket: str,
) -> None:
    """Print revocations as they arrive (replaying from --since), until interrupted.

    A lost stream (the authority restarting, say) is resumed from the last revocation printed,
    after a backoff with jitter; the loss and the recovery are logged once each on stderr."""
    if server and svid_dir is None:
        raise CliError("--server needs --svid-dir (the subscriber's SVID)")
    if not server and not Path(admin_socket).exists():
        raise CliError(
            f"no admin socket at {admin_socket} (is the authority running? see --admin-socket)"
        )
    if server and svid_dir is not None:
        SvidFiles(svid_dir).read_checked()  # once now: a lost stream is retried for ever
    if trust_bundle is not None:
        read_trust_bundle(trust_bundle)  # one line now, not a failure on every reconnect
    for address in server:  # else it would retry for ever
        if requires_client_certificate(address):
            raise CliError(_mtls_port_message(address))
    logs.configure("INFO")
    rotation = ServerRotation(server) if server else None  # shared by successive connections

    def show(message: pb.RevocationMessage, last: int) -> None:
        """``last``: the position before ``message``; what is at or below it was printed."""
        for event in unseen(message, last):
            if fmt == "json":
                click.echo(json.dumps(_event_json(event)))
            else:
                click.echo(f"{event.seq:>6} {event.kind:8} {event.target}  reason={event.reason!r}")
        body = message.WhichOneof("body")
        if body == "heartbeat" and heartbeats:
            click.echo(
                json.dumps({"heartbeat": message.heartbeat.seq})
                if fmt == "json"
                else f"heartbeat seq={message.heartbeat.seq}"
            )
        elif body == "resync":
            click.echo("resync: reconnecting", err=True)

    async def mtls_stream(last: int) -> AsyncIterator[pb.RevocationMessage]:
        assert rotation is not None
        assert svid_dir is not None
        # Read again on each connection: the SVID in the folder may have been renewed. A lost
        # stream moves the rotation on: the next connection is to the next server.
        async with WorkloadClient.from_svid_dir(rotation, svid_dir, trust_bundle) as client:
            async for message in client.watch_revocations(last):
                yield message

    async def admin_stream(last: int) -> AsyncIterator[pb.RevocationMessage]:
        async with AdminClient(admin_socket) as admin_client:
            stream = admin_client.stub.WatchRevocations(pb.WatchRevocationsRequest(since=last))
            async for message in stream:
                yield message

    def shown(message: pb.RevocationMessage) -> None:
        try:
            show(message, watcher.seq)
        except BrokenPipeError:  # `authority watch | head`: the reader is gone, so are we
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None

    watcher = RevocationWatcher(
        mtls_stream if server else admin_stream,
        since=since,
        backoff_initial=backoff.DEFAULT_INITIAL,
        backoff_max=WATCH_BACKOFF_MAX,
        on_message=shown,
    )

    async def go() -> None:
        await watcher.run()

    with contextlib.suppress(KeyboardInterrupt):
        _run(go())


# --- audit -------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The tamper-evident audit chain."""


@audit.command("verify")
@click.option(
    "--file",
    "export_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Verify an export offline instead of the live chain.",
)
@click.option(
    "--jwks",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --file: the bundle's JWK Set to check checkpoints (default: the export's).",
)
@admin_socket_option
@command
def audit_verify(export_file: Path | None, jwks: Path | None, admin_socket: str) -> None:
    """Recompute the chain; name the first broken record and exit 1 on any tampering."""
    if export_file is not None:
        result = audit_cli.verify_file(export_file, jwks.read_bytes() if jwks else None)
    else:
        result = _admin_call(admin_socket, audit_cli.verify_live)
    code = audit_cli.report(result)
    if code:
        sys.exit(code)
    if export_file is not None and jwks is None:
        click.echo(
            "note: checkpoints were checked against the JWK Set the export carries: the file is "
            "intact, but not shown to come from your trust domain; pass --jwks (authority bundle "
            "show --format jwks) for that"
        )


@audit.command("trace")
@click.argument("task_id")
@format_option
@admin_socket_option
@command
def audit_trace(task_id: str, fmt: str, admin_socket: str) -> None:
    """A task's actions in order, with the tasks delegated from it."""
    records = _admin_call(admin_socket, lambda c: audit_cli.trace(c, task_id))
    if not records:
        raise CliError(f"no audit records for task {task_id}")
    for record in records:
        click.echo(json.dumps(record.as_json()) if fmt == "json" else audit_cli.record_line(record))


@audit.command("export")
@click.option("--since", help="An ISO time, or a duration ago (e.g. 1h).")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout.")
@admin_socket_option
@command
def audit_export(since: str | None, fmt: str, out: Path | None, admin_socket: str) -> None:
    """Export records, checkpoints and the JWK Set that checks them, as JSON lines."""
    since_us = audit_cli.parse_since(since) if since else 0

    async def go(client: AdminClient) -> int:
        if out is None:
            return await audit_cli.export_to(client, sys.stdout, since_time_us=since_us)
        with out.open("w") as fh:
            return await audit_cli.export_to(client, fh, since_time_us=since_us)

    count = _admin_call(admin_socket, go)
    click.echo(f"exported {count} records", err=True)


@audit.command("tail")
@click.option("--from-start", is_flag=True, help="Print the whole chain first.")
@format_option
@admin_socket_option
@command
def audit_tail(from_start: bool, fmt: str, admin_socket: str) -> None:
    """Follow the chain: print records as they are committed (Ctrl-C to stop)."""

    async def go(client: AdminClient) -> None:
        info = await client.stub.GetAuditInfo(pb.GetAuditInfoRequest())
        after = 0 if from_start else info.head_seq
        async for record in audit_cli.stream_records(client, after_seq=after, follow=True):
            line = json.dumps(record.as_json()) if fmt == "json" else audit_cli.record_line(record)
            click.echo(line)

    with contextlib.suppress(KeyboardInterrupt):
        _admin_call(admin_socket, go)


@audit.command("checkpoint")
@admin_socket_option
@command
def audit_checkpoint(admin_socket: str) -> None:
    """Sign the chain's head now."""
    checkpoint = _admin_call(
        admin_socket, lambda c: c.stub.CheckpointAudit(pb.CheckpointAuditRequest())
    )
    click.echo(f"checkpoint at {checkpoint.seq}: {checkpoint.hash}")


@audit.command("archive")
@click.option(
    "--through", "through_seq", type=int, required=True, help="The last record to archive."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@admin_socket_option
@command
def audit_archive(through_seq: int, out: Path, admin_socket: str) -> None:
    """Export records up to --through (checkpointed), then prune them from the store.

    What remains still verifies: it chains to a hash that the signed checkpoint vouches for.
    """
    if out.exists():
        raise CliError(f"{out} exists; archives are never overwritten")

    async def go(client: AdminClient) -> int:
        await client.stub.CheckpointAudit(pb.CheckpointAuditRequest(seq=through_seq))
        with out.open("w") as fh:
            count = await audit_cli.export_to(client, fh, through_seq=through_seq)
        audit_cli.fsync_file(out)
        result = audit_cli.verify_file(out, None)
        if not result.ok:
            raise CliError(f"the archive does not verify ({result.problem}); nothing pruned")
        await client.stub.PruneAudit(pb.PruneAuditRequest(through_seq=through_seq))
        return count

    count = _admin_call(admin_socket, go)
    click.echo(f"archived {count} records to {out} and pruned them", err=True)


# --- workload side -------------------------------------------------------------------------


def _attest_proof(
    join_token: str | None,
    x509pop_cert: Path | None,
    x509pop_key: Path | None,
    jwt_file: Path | None,
    attestor: str | None,
) -> AttestProof | None:
    """The one proof given (None when none is); ``attestor`` names the instance when it is not
    the plugin's own name."""
    chosen = [
        name
        for name, given in (
            ("join_token", join_token is not None),
            ("x509pop", x509pop_cert is not None or x509pop_key is not None),
            ("jwt", jwt_file is not None),
        )
        if given
    ]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise CliError(
            "give exactly one of --join-token, --x509pop-cert/--x509pop-key or --jwt-file"
        )
    from authority.agent import AttestProof  # the agent's imports are heavier

    plugin = chosen[0]
    if plugin == "join_token":
        assert join_token is not None
        if join_token == "-":  # noqa: S105 - the stdin marker, not a secret
            join_token = sys.stdin.readline().strip()
        return AttestProof(attestor or plugin, join_token.encode())
    if plugin == "x509pop":
        if x509pop_cert is None or x509pop_key is None:
            raise CliError("--x509pop-cert and --x509pop-key go together")
        return AttestProof(
            attestor or plugin,
            x509pop_cert.read_bytes(),
            x509pop_responder(x509pop_key.read_bytes()),
            reusable=True,
        )
    assert jwt_file is not None
    return AttestProof(attestor or plugin, jwt_file.read_bytes().strip(), reusable=True)


@main.group()
def workload() -> None:
    """Act as a workload: attest, fetch JWT-SVIDs, renew."""


server_option = click.option(
    "--server",
    type=SERVER,
    required=True,
    multiple=True,
    help="HOST:PORT of the server-TLS workload endpoint; repeat it for the authority's "
    "replicas, tried in turn when one cannot be reached.",
)


@workload.command("attest")
@click.option(
    "--server",
    type=SERVER,
    multiple=True,
    help="HOST:PORT of the server-TLS workload endpoint (not with --unix); repeat it for the "
    "authority's replicas.",
)
@click.option(
    "--trust-bundle",
    type=TRUST_BUNDLE,
    help="PEM roots that verify the authority (not with --unix).",
)
@click.option("--join-token", help="A join token (or '-' to read it from stdin).")
@click.option("--x509pop-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--x509pop-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--jwt-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A file holding a platform JWT (Kubernetes service-account token, CI OIDC token).",
)
@click.option("--unix", "use_unix", is_flag=True, help="Attest over the local socket (kernel).")
@click.option(
    "--socket",
    "local_socket",
    default=str(Config().local_socket_path),
    show_default=True,
    help="The authority's local socket, with --unix.",
)
@click.option("--attestor", help="The attestor instance name, when not the plugin's own.")
@click.option("--spiffe-id", "hint", default="", help="Pick one of several matching entries.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@command
def workload_attest(
    server: tuple[str, ...],
    trust_bundle: Path | None,
    join_token: str | None,
    x509pop_cert: Path | None,
    x509pop_key: Path | None,
    jwt_file: Path | None,
    use_unix: bool,
    local_socket: str,
    attestor: str | None,
    hint: str,
    out: Path,
) -> None:
    """Attest and write svid.pem, svid.key (0600) and bundle.pem to --out.

    Give exactly one proof: --join-token, --x509pop-cert with --x509pop-key, --jwt-file, or
    --unix. --out is created 0700; an existing one must be the user's own folder (not a
    symlink) and is tightened to 0700. Files are replaced atomically, never through a link.
    """
    if use_unix:
        if join_token is not None or x509pop_cert or x509pop_key or jwt_file:
            raise CliError(
                "give exactly one of --join-token, --x509pop-cert/--x509pop-key, --jwt-file "
                "or --unix"
            )
        plugin, evidence, respond = "unix", b"", None
    else:
        proof = _attest_proof(join_token, x509pop_cert, x509pop_key, jwt_file, None)
        if proof is None:
            raise CliError(
                "give exactly one of --join-token, --x509pop-cert/--x509pop-key, --jwt-file "
                "or --unix"
            )
        plugin, evidence, respond = proof.attestor, proof.evidence, proof.respond
    if plugin == "unix":
        target: str | tuple[str, ...] = f"unix:{local_socket}"
        bundle_pem = None
    else:
        if not server or trust_bundle is None:
            raise CliError("--server and --trust-bundle are required (except with --unix)")
        target, bundle_pem = server, read_trust_bundle(trust_bundle)

    check_private_folder(out)  # before a join token is spent

    async def go() -> pb.AttestResult:
        async with WorkloadClient(target, bundle_pem) as client:
            return await client.attest_to_folder(
                attestor or plugin, evidence, out, respond=respond, spiffe_id_hint=hint
            )

    result = _run(go(), () if plugin == "unix" else server)
    for svid in result.svids[:1]:
        click.echo(f"attested as {svid.spiffe_id}; SVID written to {out}", err=True)
    for svid in result.svids[1:]:
        click.echo(f"also matched {svid.spiffe_id} (pick it with --spiffe-id)", err=True)


@workload.command("jwt")
@server_option
@click.option(
    "--svid-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option("--audience", "audiences", required=True, multiple=True)
@click.option("--ttl", type=DURATION)
@click.option("--trust-bundle", type=TRUST_BUNDLE)
@command
def workload_jwt(
    server: tuple[str, ...],
    svid_dir: Path,
    audiences: tuple[str, ...],
    ttl: dt.timedelta | None,
    trust_bundle: Path | None,
) -> None:
    """Fetch a JWT-SVID for an audience; prints the token alone on stdout."""

    async def go() -> pb.FetchJWTSVIDResponse:
        async with WorkloadClient.from_svid_dir(server, svid_dir, trust_bundle) as client:
            return await client.fetch_jwt(list(audiences), int(ttl.total_seconds()) if ttl else 0)

    click.echo(_run(go(), server).token)


socket_option = click.option(
    "--socket",
    default=None,
    help="The Workload API socket (path or unix:///path); default: $SPIFFE_ENDPOINT_SOCKET.",
)


@workload.command("fetch")
@socket_option
@click.option("--spiffe-id", default="", help="Which of the caller's identities (default: first).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@command
def workload_fetch(socket: str | None, spiffe_id: str, out: Path) -> None:
    """Fetch an X.509-SVID from a SPIFFE Workload API (the authority's or a node agent's) and
    write svid.pem, svid.key (0600) and bundle.pem to --out. The kernel identifies the caller."""
    check_private_folder(out)

    async def go() -> FetchedX509Svid:
        async with WorkloadApiClient(socket) as client:
            svids = await client.fetch_x509_svids()
        chosen = [s for s in svids if not spiffe_id or s.spiffe_id == spiffe_id]
        if not chosen:
            raise CliError(f"no X.509-SVID for {spiffe_id}")
        return chosen[0]

    svid = _run(go())
    SvidFiles(out).write(svid.chain_pem, svid.key, svid.bundle_pem)
    click.echo(f"fetched {svid.spiffe_id}; SVID written to {out}", err=True)


@workload.command("fetch-jwt")
@socket_option
@click.option("--audience", "audiences", required=True, multiple=True)
@click.option("--spiffe-id", default="", help="Which of the caller's identities (default: first).")
@command
def workload_fetch_jwt(socket: str | None, audiences: tuple[str, ...], spiffe_id: str) -> None:
    """Fetch a JWT-SVID from a SPIFFE Workload API; prints the token alone on stdout."""

    async def go() -> tuple[str, str]:
        async with WorkloadApiClient(socket) as client:
            return await client.fetch_jwt_svid(list(audiences), spiffe_id)

    click.echo(_run(go())[1])


# --- MCP gateway ---------------------------------------------------------------------------


@main.command("gateway")
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The gateway's TOML file (README: Tool calls through the MCP gateway).",
)
@click.option(
    "--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])
)
@click.option("--log-format", default="text", type=click.Choice(LOG_FORMATS))
@command
def gateway(config_file: Path, log_level: str, log_format: str) -> None:
    """Run the MCP gateway: tool calls admitted only with a task token for that exact call."""
    from authority.gateway.config import load
    from authority.gateway.run import run_gateway

    config = load(config_file)
    logs.configure(log_level, log_format)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_gateway(config, stop)

    _run(main_loop(), config.authority)


# --- node agent ----------------------------------------------------------------------------


@main.command("agent")
@click.option(
    "--server",
    type=SERVER,
    required=True,
    multiple=True,
    help="HOST:PORT of the authority's server-TLS workload endpoint; repeat it for the "
    "authority's replicas: the agent moves to the next when one cannot be reached, and its "
    "streams resume there.",
)
@click.option(
    "--trust-bundle",
    required=True,
    type=TRUST_BUNDLE,
    help=(
        "PEM roots that verify the authority at first contact only: afterwards the agent "
        "trusts the latest bundle it received, kept in --data-dir (agent/bundle.pem), so it "
        "starts again after CA rotations with the file it was first given."
    ),
)
@click.option(
    "--data-dir",
    default="authority-agent",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the agent keeps its own SVID (key mode 0600) between runs.",
)
@click.option(
    "--workload-api-socket",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve the SPIFFE Workload API here (keep the path short: 107 bytes at most).",
)
@click.option("--join-token", help="A join token (or '-' to read it from stdin).")
@click.option("--x509pop-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--x509pop-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--jwt-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--attestor", help="The attestor instance name, when not the plugin's own.")
@click.option("--spiffe-id", "hint", default="", help="Pick one of several matching entries.")
@click.option(
    "--workload-attestor",
    default="unix",
    show_default=True,
    help="The selector type of local callers in this agent's node entries.",
)
@click.option(
    "--fail-closed",
    is_flag=True,
    help="Serve nothing (UNAVAILABLE) while the revocation feed is silent past --stale-after "
    "(default: keep serving what is held until it expires).",
)
@click.option(
    "--stale-after",
    type=DURATION,
    default="15s",
    show_default=True,
    help="How long a silent revocation feed counts as fresh.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(LOG_FORMATS),
    help="json: one JSON object a line, for log shippers.",
)
@click.option(
    "--metrics-listen",
    help="HOST:PORT: the agent's Prometheus metrics at http://HOST:PORT/metrics "
    "(loopback unless --metrics-allow-remote).",
)
@click.option(
    "--metrics-allow-remote", is_flag=True, help="Let --metrics-listen bind a non-loopback address."
)
@command
def agent(
    server: tuple[str, ...],
    trust_bundle: Path,
    data_dir: Path,
    workload_api_socket: Path,
    join_token: str | None,
    x509pop_cert: Path | None,
    x509pop_key: Path | None,
    jwt_file: Path | None,
    attestor: str | None,
    hint: str,
    workload_attestor: str,
    fail_closed: bool,
    stale_after: dt.timedelta,
    log_level: str,
    log_format: str,
    metrics_listen: str | None,
    metrics_allow_remote: bool,
) -> None:
    """Run a node agent: attest this machine to the authority, then serve the SPIFFE Workload
    API to its local workloads (the node entries whose --parent-id is the agent's SPIFFE ID).

    The first start needs a proof (--join-token, --x509pop-cert/--x509pop-key or --jwt-file);
    later starts reuse the SVID kept in --data-dir while it is valid.
    """
    from authority.agent import AgentConfig, run_agent

    if metrics_listen:
        check_metrics_listen(metrics_listen, allow_remote=metrics_allow_remote)
    config = AgentConfig(
        server=server,
        trust_bundle_pem=read_trust_bundle(trust_bundle),
        data_dir=data_dir,
        socket=workload_api_socket,
        proof=_attest_proof(join_token, x509pop_cert, x509pop_key, jwt_file, attestor),
        workload_attestor=workload_attestor,
        spiffe_id_hint=hint,
        fail_closed=fail_closed,
        stale_after=stale_after,
    )
    logs.configure(log_level, log_format)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if metrics_listen:
            from authority.prom import run_agent_with_metrics

            await run_agent_with_metrics(config, stop, metrics_listen)
        else:
            await run_agent(config, stop)

    _run(main_loop(), server)


EXIT_PENDING = 3


def _context(
    prompt_sha256: str,
    tool: str,
    tool_args_sha256: str,
    model: str,
    prompt_file: Path | None = None,
) -> pb.AuditContext:
    return pb.AuditContext(
        prompt_sha256=prompt_sha256,
        tool_name=tool,
        tool_args_sha256=tool_args_sha256,
        model=model,
        prompt=prompt_file.read_text() if prompt_file else "",
    )


context_options = [
    click.option("--prompt-sha256", default="", help="SHA-256 of the prompt, for the audit."),
    click.option(
        "--prompt-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="The prompt: its digest is audited, its text only if the entry records prompts.",
    ),
    click.option("--tool", default="", help="The tool call's name, for the audit."),
    click.option("--tool-args-sha256", default="", help="SHA-256 of the tool call's arguments."),
    click.option("--model", default="", help="The model acting, for the audit."),
]


def _with_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(context_options):
        fn = option(fn)
    return fn


@workload.command("exchange")
@server_option
@click.option(
    "--svid-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option("--action", required=True, help="Exactly one action: read, write, deploy, ...")
@click.option("--resource", required=True)
@click.option("--audience", required=True, help="The one relying service the token is for.")
@click.option("--purpose", required=True)
@click.option("--task", "task_id", default="", help="The task id (default: a new task).")
@click.option("--ttl", type=DURATION)
@click.option(
    "--environment",
    default="",
    help="Optional: the authority derives it from the resource name and refuses another.",
)
@click.option("--param", "params", multiple=True, help="KEY=VALUE intent parameters.")
@click.option("--approval", "approval_id", default="", help="Collect an approved elevation.")
@_with_context
@command
def workload_exchange(
    server: tuple[str, ...],
    svid_dir: Path,
    action: str,
    resource: str,
    audience: str,
    purpose: str,
    task_id: str,
    ttl: dt.timedelta | None,
    environment: str,
    params: tuple[str, ...],
    approval_id: str,
    prompt_sha256: str,
    prompt_file: Path | None,
    tool: str,
    tool_args_sha256: str,
    model: str,
) -> None:
    """Trade the SVID for a task token; prints the token alone on stdout.

    Exit 3 when an operator must approve (the approval id is printed on stdout; run again with
    --approval ID to collect the token); exit 1 with the policy's reasons on a denial.
    """
    parameters = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--param {item!r} must be KEY=VALUE")
        parameters[key] = value
    request = pb.ExchangeRequest(
        intent=pb.Intent(
            action=action,
            resource=resource,
            purpose=purpose,
            environment=environment,
            parameters=parameters,
        ),
        audience=audience,
        ttl_seconds=int(ttl.total_seconds()) if ttl else 0,
        task_id=task_id,
        approval_id=approval_id,
        context=_context(prompt_sha256, tool, tool_args_sha256, model, prompt_file),
    )

    async def go() -> pb.ExchangeResponse:
        async with WorkloadClient.from_svid_dir(server, svid_dir) as client:
            return await client.exchange(request)

    response = _run(go(), server)
    if response.WhichOneof("result") == "pending":
        pending = response.pending
        click.echo(pending.id)
        click.echo(
            f"approval required: {pending.id} (task {pending.task_id}); ask an operator to run "
            f"'authority approve {pending.id}', then exchange again with --approval {pending.id}",
            err=True,
        )
        sys.exit(EXIT_PENDING)
    issued = response.token
    click.echo(issued.token)
    until = dt.datetime.fromtimestamp(issued.expires_at, dt.UTC).isoformat(timespec="seconds")
    click.echo(f"task {issued.task_id}: {' '.join(issued.scopes)} until {until}", err=True)


@workload.command("delegate")
@server_option
@click.option(
    "--svid-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option("--token", "token_text", default="", help="The parent task token ('-': stdin).")
@click.option(
    "--to-svid",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The new holder's X.509-SVID (PEM, leaf first).",
)
@click.option("--action", default="", help="Narrower action (default: the parent's).")
@click.option("--resource", default="", help="Narrower resource (default: the parent's).")
@click.option("--ttl", type=DURATION)
@command
def workload_delegate(
    server: tuple[str, ...],
    svid_dir: Path,
    token_text: str,
    to_svid: Path,
    action: str,
    resource: str,
    ttl: dt.timedelta | None,
) -> None:
    """Hand a narrower task token to another workload; prints the new token alone."""
    if not token_text or token_text == "-":  # noqa: S105 - the stdin marker
        token_text = sys.stdin.readline().strip()
    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = _x509.load_pem_x509_certificates(to_svid.read_bytes())[0]
    request = pb.DelegateRequest(
        parent_token=token_text,
        delegate_svid=leaf.public_bytes(Encoding.DER),
        action=action,
        resource=resource,
        ttl_seconds=int(ttl.total_seconds()) if ttl else 0,
    )

    async def go() -> pb.ExchangeResponse:
        async with WorkloadClient.from_svid_dir(server, svid_dir) as client:
            return await client.delegate(request)

    click.echo(_run(go(), server).token.token)


@workload.command("end-task")
@server_option
@click.option(
    "--svid-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@click.option("--task", "task_id", required=True)
@click.option("--reason", default="")
@command
def workload_end_task(server: tuple[str, ...], svid_dir: Path, task_id: str, reason: str) -> None:
    """End a task: its tokens are revoked and nothing more is issued for it."""

    async def go() -> pb.EndTaskResponse:
        async with WorkloadClient.from_svid_dir(server, svid_dir) as client:
            return await client.end_task(pb.EndTaskRequest(task_id=task_id, reason=reason))

    ended = _run(go(), server)
    click.echo(f"task {task_id} ended; {len(ended.revoked_jtis)} tokens revoked", err=True)


@workload.command("renew")
@server_option
@click.option(
    "--svid-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path)
)
@command
def workload_renew(server: tuple[str, ...], svid_dir: Path) -> None:
    """Renew the X.509-SVID in --svid-dir with a fresh key, in place."""
    from authority.client import new_key

    files = SvidFiles(svid_dir)

    async def go() -> tuple[pb.X509SVID, pb.Bundle]:
        async with WorkloadClient.from_svid_dir(server, svid_dir) as client:
            key = new_key()
            renewed = await client.renew(key)
            bundle_msg = await client.get_bundle()
            files.write(
                der_chain_to_pem(list(renewed.cert_chain)),
                key,
                der_chain_to_pem(list(bundle_msg.x509_authorities)),
            )
            return renewed, bundle_msg

    svid, _ = _run(go(), server)
    until = dt.datetime.fromtimestamp(svid.expires_at, dt.UTC).isoformat()
    click.echo(f"renewed {svid.spiffe_id} until {until}", err=True)

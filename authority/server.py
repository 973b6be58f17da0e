"""The composition root: builds every part from a Config and serves it.

Two gRPC servers: the workload server on TCP (a server-TLS listener for attestation and a
mutual-TLS listener for SVID-authenticated calls; grpc Python only asks for a client certificate
when it requires one) and the admin server on a Unix socket whose file mode is the gate.
The workload listeners present the authority's own X.509-SVID, reloaded on rotation through
``dynamic_ssl_server_credentials``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import grpclib.server
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authority import __version__
from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api import listeners
from authority.api.admin import AdminService, RefuseAdminHandler
from authority.api.grpclib_server import UnixSocketServer
from authority.api.health import HealthServicer
from authority.api.local import LocalWorkloadService
from authority.api.revocations import RevocationFeed
from authority.api.workload import WorkloadService
from authority.api.workload_api import AuthoritySource, SpiffeWorkloadApi
from authority.attestation import AttestorHost
from authority.binding import address_in_use, check_free, lock_data_dir
from authority.ca import CertificateAuthority, Upstream
from authority.changes import ChangeNotifier
from authority.clock import Clock, SystemClock
from authority.config import Config, split_host_port
from authority.console.server import ConsoleServer, check_console_config
from authority.errors import AuthorityError
from authority.exchange import ExchangeService
from authority.files import write_atomic
from authority.ids import SpiffeId
from authority.keyvault import FileKeyVault, private_key_pem
from authority.notify import Notifier, load_webhooks
from authority.policy_admin import PolicyAdmin
from authority.prom import ServerMetrics
from authority.revocation import RevocationHub, RevocationService
from authority.service import Authority
from authority.store import sql
from authority.store.postgres import PostgresStore, redact
from authority.store.queries import SqlStore
from authority.store.sqlite import SqliteStore
from authority.supervisor import Sleep, Supervisor
from authority.svid import X509Svid
from authority.tool_calls import ToolGateways

log = logging.getLogger(__name__)

SERVER_SVID_TTL = dt.timedelta(hours=1)
MAINTENANCE_INTERVAL = 10.0
PRUNE_INTERVAL = 3600.0
# The scheduled jobs, each supervised alone and named so in the admin socket's health service.
# While a critical one fails, the overall health ("") is NOT_SERVING too.
POLICY_JOB = "policy-reload"
CA_JOB = "ca-maintenance"
SERVER_CERT_JOB = "server-certificate"
PRUNE_JOB = "store-prune"
CHECKPOINT_JOB = "audit-checkpoints"
CHANGES_JOB = "workload-api-changes"
STORE_JOB = "store"
REPLICA_JOB = "replica-changes"
NOTIFY_JOB = "approval-webhooks"
STORE_PING_INTERVAL = 1.0
REPLICA_ID_FILE = "replica-id"


def replica_id(config: Config) -> str:
    """The configured replica name, else the one kept in the data directory (made on first
    start on a shared store)."""
    if config.store.replica:
        return config.store.replica
    path = config.data_dir / REPLICA_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = f"r-{secrets.token_hex(4)}"
        write_atomic(path, name.encode())
        return name


def server_spiffe_id(config: Config) -> SpiffeId:
    return SpiffeId.from_segments(config.trust_domain, "authority")


class _TlsIdentity:
    """The authority's own SVID, handed to gRPC's TLS listeners on every new handshake."""

    def __init__(self, ca: CertificateAuthority, config: Config) -> None:
        self._ca = ca
        self._config = config
        self._lock = threading.Lock()
        self._generation = 0
        self._seen: dict[str, int] = {}
        self._svid: X509Svid | None = None
        self._configs: tuple[grpc.ServerCertificateConfiguration, ...] = ()

    def _addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for address in (self._config.listen, self._config.listen_mtls):
            host, _ = split_host_port(address)
            try:
                ip = ipaddress.ip_address(host or "0.0.0.0")  # noqa: S104 - parsing, not binding
            except ValueError:
                continue
            ip = ipaddress.ip_address("127.0.0.1") if ip.is_unspecified else ip
            if ip not in found:
                found.append(ip)
        return found

    def refresh(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        svid = self._ca.issue_x509_svid(
            server_spiffe_id(self._config),
            key.public_key(),
            SERVER_SVID_TTL,
            dns_names=self._config.server_dns_names,
            ip_addresses=self._addresses(),
        )
        key_pem = private_key_pem(key)
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
        roots = self._ca.bundle().pem()
        with self._lock:
            self._svid = svid
            self._generation += 1
            self._configs = (
                grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)], roots),
            )
        log.info("server SVID issued: serial=%s expires=%s", svid.serial_hex, svid.expires_at)

    def due(self, now: dt.datetime) -> bool:
        svid = self._svid
        if svid is None:
            return True
        cert = svid.certificate
        half = (
            cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2
        )
        return now >= half

    def current(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            return self._configs[0]

    def fetcher(self, listener: str) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if self._seen.get(listener) == self._generation:
                    return None
                self._seen[listener] = self._generation
                return self._configs[0]

        return fetch

    def credentials(self, listener: str, *, require_client_auth: bool) -> grpc.ServerCredentials:
        with self._lock:
            self._seen[listener] = self._generation
            initial = self._configs[0]
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self.fetcher(listener),  # type: ignore[arg-type]  # None means "no change"
            require_client_authentication=require_client_auth,
        )


def _prepare_unix_socket(path: Path, key: str) -> None:
    """Remove a stale socket file; refuse if another server is listening on it (``key``: the
    configuration key that names it, for the message)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise address_in_use(path, key)


def _add_secure_port(
    server: grpc.aio.Server, address: str, key: str, credentials: grpc.ServerCredentials
) -> int:
    """Bind ``address``; taken since the start-up check, it is the same one-line error."""
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises when no address could be bound (older ones return 0)
        port = 0
    if port == 0:
        raise address_in_use(address, key)
    return port


async def _start_unix_server(server: UnixSocketServer, path: Path, key: str) -> None:
    """Serve on ``path`` under the owner-only umask (the caller then sets the mode it means)."""
    old_umask = os.umask(0o177)
    try:
        await server.start(path=str(path))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise address_in_use(path, key) from None
        raise
    finally:
        os.umask(old_umask)


class AuthorityServer:
    """Everything, wired. ``start`` binds and serves; ``stop`` drains and closes."""

    def __init__(
        self, config: Config, clock: Clock | None = None, *, sleep: Sleep = asyncio.sleep
    ) -> None:
        """``sleep``: how the scheduled jobs wait between runs (tests shorten it)."""
        self.config = config
        self.clock = clock or SystemClock()
        self.port = 0
        self.mtls_port = 0
        self.supervisor = Supervisor(
            sleep=sleep, expected=(AuthorityError, OSError), on_change=self._job_changed
        )
        self._sleep = sleep
        self.notifier: Notifier | None = None  # pending approvals to the webhooks, when any
        self._admin_health: HealthServicer | None = None
        self._health_updates: set[asyncio.Task[None]] = set()
        self._servers: list[grpc.aio.Server] = []
        self._admin_bound = False  # the admin socket file is ours to remove
        self._data_dir_lock: int | None = None  # held while serving (binding.lock_data_dir)
        self._store: SqlStore | None = None
        self._remote_topics: asyncio.Queue[set[str]] = asyncio.Queue()
        self._local: grpclib.server.Server | None = None
        self._workload_api: grpclib.server.Server | None = None
        self._changes: ChangeNotifier | None = None
        self._checkpointed = 0
        self._local_connections = 0  # each Unix socket's connection cap, fitted at start
        self.authority: Authority | None = None
        self.console: ConsoleServer | None = None  # the operators' console (console_listen)
        # Prometheus metrics (config.metrics_listen): None when off, and then no interceptor.
        self.metrics: ServerMetrics | None = None

    @property
    def admin_socket(self) -> Path:
        return self.config.admin_socket_path

    async def start(self) -> None:
        config = self.config
        # Before anything is created: a second authority on the same addresses, or a port
        # taken by another program, is one line, and leaves no CA or database behind.
        check_free(
            [
                (config.listen, "listen"),
                (config.listen_mtls, "listen_mtls"),
                *([(config.metrics_listen, "metrics_listen")] if config.metrics_listen else []),
            ],
            [
                (config.admin_socket_path, "admin_socket"),
                (config.local_socket_path, "local_socket"),
                *(
                    [(config.workload_api_socket, "workload_api_socket")]
                    if config.workload_api_socket is not None
                    else []
                ),
            ],
        )
        check_console_config(config)  # plain HTTP beyond loopback is refused before anything
        self._data_dir_lock = lock_data_dir(config.data_dir)  # created here, 0700
        # The attest socket, and the Workload API's when it is served.
        local_sockets = 1 + (config.workload_api_socket is not None)
        fds = listeners.ensure_fd_limit(config.limits, local_sockets)
        self._local_connections = fds.per_local_socket
        data_dir = config.data_dir
        os.chmod(data_dir, 0o700)
        store: SqlStore
        if config.store.url:
            replica = replica_id(config)
            store = await PostgresStore.open(config.store.url, replica)
            await store.register_replica(socket.gethostname(), self.clock.now())
            log.info("store: replica %s on %s", replica, redact(config.store.url))
        else:
            store = await SqliteStore.open(data_dir / "authority.db")
        self._store = store
        upstream = None
        if config.ca.upstream_cert is not None and config.ca.upstream_key is not None:
            upstream = Upstream.load(
                config.ca.upstream_cert, config.ca.upstream_key, config.ca.upstream_bundle
            )
        ca = CertificateAuthority(
            trust_domain=config.trust_domain,
            config=config.ca,
            limits=config.limits,
            clock=self.clock,
            store=store,
            vault=FileKeyVault(data_dir / "keys"),
            upstream=upstream,
            replica=store.replica,
        )
        await ca.start()
        attestors = AttestorHost(store=store, clock=self.clock, limits=config.limits)
        await attestors.load()
        self.revocations = revocations = RevocationService(
            store=store,
            ca=ca,
            hub=RevocationHub(store),
            clock=self.clock,
            limits=config.limits,
        )
        await revocations.start()
        self.authority = authority = Authority(
            ca=ca,
            revocations=revocations,
            store=store,
            attestors=attestors,
            clock=self.clock,
            limits=config.limits,
            reserved_dns_names=config.server_dns_names,
            reserved_ids=(server_spiffe_id(config),),
            workload_api_attestor=config.workload_api_attestor,
        )
        await authority.start()
        self.policy = policy = PolicyAdmin.start(
            configured=[Path(p) for p in config.policy_files],
            folder=data_dir / "policy",
            store=store,
            clock=self.clock,
        )
        if config.webhooks:
            self.notifier = Notifier(
                load_webhooks(config),
                console_url=config.console_url,
                clock=self.clock,
                queue_size=config.limits.notify_queue,
                sleep=self._sleep,
            )
        metrics = self.metrics = ServerMetrics(self.clock) if config.metrics_listen else None
        # Exchange's decisions (and Delegate's) counted by effect and timed, when metrics are on.
        decisions = metrics.policy(policy) if metrics is not None else policy
        self.exchange = exchange = ExchangeService(
            authority=authority,
            ca=ca,
            store=store,
            policy=decisions,
            clock=self.clock,
            limits=config.limits,
            on_approval=self.notifier.approval_requested if self.notifier else None,
        )
        tool_gateways = ToolGateways(  # its tools/list filter: not decisions the metrics count
            authority=authority,
            store=store,
            policy=policy,
            clock=self.clock,
            limits=config.limits,
            gateways=[SpiffeId.parse(g) for g in config.gateways],
            risk=exchange,
        )
        feed = RevocationFeed(revocations, store, self.clock, config.revocation_heartbeat)
        if metrics is not None:
            feed.on_sent = metrics.revocation_sent
            metrics.bind(
                store=store,
                backend="postgresql" if config.store.url else "sqlite",
                ca=ca,
                hub=revocations.hub,
                supervisor=self.supervisor,
            )
        outermost = [metrics.interceptor] if metrics is not None else []
        self._tls = tls = _TlsIdentity(ca, config)
        tls.refresh()
        ca.add_listener(tls.refresh)

        workload = grpc.aio.server(
            options=listeners.workload_options(config.limits, fds.per_listener),
            interceptors=[
                *outermost,
                listeners.RequestGuard(config.limits.max_calls_per_peer),
            ],
        )
        self.port = _add_secure_port(
            workload, config.listen, "listen", tls.credentials("tls", require_client_auth=False)
        )
        self.mtls_port = _add_secure_port(
            workload,
            config.listen_mtls,
            "listen_mtls",
            tls.credentials("mtls", require_client_auth=True),
        )
        mtls_address = config.advertise_mtls or f":{self.mtls_port}"
        changes = ChangeNotifier(authority)
        changes.start(self.supervisor, CHANGES_JOB)
        self._changes = changes
        pb_grpc.add_WorkloadServicer_to_server(
            WorkloadService(
                authority,
                exchange,
                feed,
                changes,
                mtls_address,
                server_spiffe_id(config).uri,
                tool_gateways=tool_gateways,
            ),
            workload,
        )
        workload.add_generic_rpc_handlers((RefuseAdminHandler(),))
        await self._add_health_and_reflection(
            workload, "authority.v1.Workload", with_reflection=config.reflection_on_public
        )

        admin = grpc.aio.server(
            options=listeners.admin_options(config.limits),
            interceptors=[*outermost, listeners.RequestGuard()],
        )
        socket_path = config.admin_socket_path
        _prepare_unix_socket(socket_path, "admin_socket")
        old_umask = os.umask(0o177 if config.admin_socket_mode == 0o600 else 0o117)
        try:
            admin.add_insecure_port(f"unix:{socket_path}")
            self._admin_bound = True
        except RuntimeError:  # grpc's word for a bind that failed
            raise address_in_use(socket_path, "admin_socket") from None
        finally:
            os.umask(old_umask)
        if config.console_listen:
            self.console = ConsoleServer(
                config,
                authority=authority,
                exchange=exchange,
                policy=policy,
                store=store,
                clock=self.clock,
            )
            await self.console.start()
            if self.notifier is not None and not config.console_url:
                self.notifier.console_url = self.console.url  # links to where it is served
        pb_grpc.add_AdminServicer_to_server(
            AdminService(authority, exchange, policy, feed, console=self.console), admin
        )
        self._admin_health = await self._add_health_and_reflection(admin, "authority.v1.Admin")

        await workload.start()
        await admin.start()
        os.chmod(socket_path, config.admin_socket_mode)
        self._servers = [workload, admin]

        local_path = config.local_socket_path
        _prepare_unix_socket(local_path, "local_socket")
        info = pb.ServerInfo(
            trust_domain=config.trust_domain.name,
            spiffe_id=server_spiffe_id(config).uri,
            mtls_address=mtls_address,
            version=__version__,
        )
        self._local = UnixSocketServer(
            [LocalWorkloadService(authority, info)],
            config.limits,
            max_connections=self._local_connections,
        )
        await _start_unix_server(self._local, local_path, "local_socket")
        os.chmod(local_path, config.local_socket_mode)
        if config.workload_api_socket is not None:
            await self._start_workload_api(config.workload_api_socket, authority, changes)
        await self._schedule()
        if metrics is not None:
            try:
                await metrics.start(config.metrics_listen)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise address_in_use(config.metrics_listen, "metrics_listen") from None
                raise
        log.info(
            "authority serving: trust_domain=%s replica=%s tls=%s mtls=%s admin=%s local=%s",
            config.trust_domain,
            store.replica or "-",
            self.port,
            self.mtls_port,
            socket_path,
            local_path,
        )

    async def _start_workload_api(
        self, path: Path, authority: Authority, changes: ChangeNotifier
    ) -> None:
        """The SPIFFE Workload API on a Unix socket anyone local may connect to (mode 0666):
        the kernel identifies the caller, the registration entries decide what it gets."""
        _prepare_unix_socket(path, "workload_api_socket")
        service = SpiffeWorkloadApi(
            AuthoritySource(authority, changes, self.config.workload_api_attestor)
        )
        self._workload_api = UnixSocketServer(
            [service], self.config.limits, max_connections=self._local_connections
        )
        await _start_unix_server(self._workload_api, path, "workload_api_socket")
        os.chmod(path, 0o666)  # noqa: S103 - any local process may ask; the kernel is the gate
        log.info("SPIFFE Workload API serving: socket=%s", path)

    @staticmethod
    async def _add_health_and_reflection(
        server: grpc.aio.Server, service: str, *, with_reflection: bool = True
    ) -> HealthServicer:
        servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        for name in ("", service):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not with_reflection:
            return servicer
        names = (
            service,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        return servicer

    # --- scheduled jobs: each fails alone, is logged once per change, and shows in health ------

    async def _schedule(self) -> None:
        """Start the scheduled jobs, each under the supervisor, each SERVING to begin with."""
        if self._admin_health is not None:
            for name in (
                POLICY_JOB,
                CA_JOB,
                SERVER_CERT_JOB,
                PRUNE_JOB,
                CHECKPOINT_JOB,
                STORE_JOB,
            ):
                await self._admin_health.set(name, health_pb2.HealthCheckResponse.SERVING)
        supervisor = self.supervisor
        assert self._store is not None
        # While the database cannot be reached the whole server is NOT_SERVING; writes fail
        # UNAVAILABLE meanwhile, and the store reconnects by itself.
        supervisor.every(
            STORE_JOB, STORE_PING_INTERVAL, self._store.ping, backoff_cap=STORE_PING_INTERVAL
        )
        if isinstance(self._store, PostgresStore):
            self._store.add_listener(self._remote_topics.put_nowait, remote_only=True)
            supervisor.start(REPLICA_JOB, self._follow_replicas)
        checkpoints = self.config.audit_checkpoint_interval.total_seconds()
        supervisor.every(POLICY_JOB, MAINTENANCE_INTERVAL, self._reload_policy, critical=False)
        supervisor.every(CA_JOB, MAINTENANCE_INTERVAL, self._maintain_ca)
        supervisor.every(SERVER_CERT_JOB, MAINTENANCE_INTERVAL, self._refresh_server_certificate)
        supervisor.every(PRUNE_JOB, PRUNE_INTERVAL, self._prune_once, critical=False)
        supervisor.every(CHECKPOINT_JOB, checkpoints, self._checkpoint_once, critical=False)
        if self.notifier is not None:
            supervisor.start(NOTIFY_JOB, self.notifier.run, critical=False)

    def _job_changed(self, name: str, up: bool) -> None:
        """A job failing or recovered: its health, and the whole server's when it is critical."""
        servicer = self._admin_health
        if servicer is None:
            return
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.supervisor.healthy() else not_serving

        async def update() -> None:
            await servicer.set(name, serving if up else not_serving)
            await servicer.set("", overall)

        task = asyncio.get_running_loop().create_task(update())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _follow_replicas(self) -> None:
        """Bring this replica's views up to date with what the others committed: entries,
        attestor instances, the other replicas' keys (the bundle), revocations."""
        authority = self.authority
        assert authority is not None
        while True:
            topics = await self._remote_topics.get()
            while not self._remote_topics.empty():
                topics |= self._remote_topics.get_nowait()
            if sql.KEYS in topics:
                await authority.ca.reload_peers()
            if sql.ENTRIES in topics:
                await authority.reload_entries()
            if sql.ATTESTORS in topics:
                await authority.attestors.load()
            if sql.REVOCATIONS in topics:
                await authority.revocations.catch_up()

    async def _reload_policy(self) -> None:
        await self.policy.reload_if_changed()

    async def _maintain_ca(self) -> None:
        assert self.authority is not None
        await self.authority.ca.maintain()  # a change re-issues the server SVID (a listener)

    async def _refresh_server_certificate(self) -> None:
        if self._tls.due(self.clock.now()):
            self._tls.refresh()
        if self.console is not None:
            await self.console.maintain()

    async def _checkpoint_once(self) -> None:
        assert self.authority is not None
        assert self._store is not None
        # A window of suppressed refusals that closed with nothing after it is summarised now,
        # not at the next refusal (the summary is then what moves the head).
        await self.authority.flush_refusals()
        head, _ = await self._store.audit_head()
        if head > self._checkpointed:
            checkpoint = await self.authority.checkpoint()
            if checkpoint is not None:
                self._checkpointed = checkpoint.seq
                log.info("audit checkpoint: seq=%d hash=%s", checkpoint.seq, checkpoint.hash[:16])

    async def _prune_once(self) -> None:
        assert self._store is not None
        await self._store.prune(self.clock.now())

    async def stop(self, grace: float = 5.0) -> None:
        if self._store is None and not self._servers:
            self._unlock_data_dir()
            return  # nothing was started (a start refused before it opened the store)
        if self.metrics is not None:
            await self.metrics.stop()
        await self.supervisor.stop()
        if self.console is not None:
            await self.console.stop()
        if self.notifier is not None:
            await self.notifier.aclose()
        await asyncio.gather(*self._health_updates, return_exceptions=True)
        if self._store is not None and self.authority is not None:
            try:
                await self._checkpoint_once()
            except Exception:
                log.exception("final audit checkpoint failed")
        if self._local is not None:
            self._local.close()
            await self._local.wait_closed()
            self._local = None
            self.config.local_socket_path.unlink(missing_ok=True)
        if self._workload_api is not None:
            self._workload_api.close()
            await self._workload_api.wait_closed()
            self._workload_api = None
            if self.config.workload_api_socket is not None:
                self.config.workload_api_socket.unlink(missing_ok=True)
        if self._changes is not None:
            await self._changes.close()
            self._changes = None
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        self._servers = []
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._admin_bound:  # never another authority's (a start refused as in use)
            self.config.admin_socket_path.unlink(missing_ok=True)
            self._admin_bound = False
        self._unlock_data_dir()
        log.info("authority stopped")

    def _unlock_data_dir(self) -> None:
        if self._data_dir_lock is not None:
            os.close(self._data_dir_lock)
            self._data_dir_lock = None


async def serve(config: Config, stop: asyncio.Event) -> None:
    server = AuthorityServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)  # what started before the failure (a bind lost in a race)
        raise
    try:
        await stop.wait()
    finally:
        await server.stop()


__all__ = ["AuthorityServer", "serve"]

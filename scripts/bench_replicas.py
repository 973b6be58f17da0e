#!/usr/bin/env python3
"""Authority replicas on one PostgreSQL database: the pieces the replica benchmark stands on.

``python scripts/bench_replicas.py [--replicas 1] [--store URL | --embedded-postgres]
[--seconds 2] [--json out.json]``

Starts ``--replicas`` ``authority serve`` processes (each its own data directory, loopback ports
and admin socket; with a store URL, ``[store] url`` and a replica name ``rN`` in each one's TOML
config), sends ``GetBundle`` back to back on every replica's admin socket for ``--seconds``, and
reports the CPU each replica (utime + stime from /proc/<pid>/stat) and PostgreSQL (the postmaster,
its live backends and those it reaped) used over that run, in % of one core.

``--embedded-postgres`` starts a throwaway PostgreSQL server (tests/pg.py: the test extra's
embedded-postgres binaries) and gives the replicas a fresh database on it; ``--store URL`` names
a server of yours (put the password in PGPASSFILE, not the URL). Without either, one replica on
SQLite: the run checks the plumbing. Nothing printed holds a password, token or key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _benchlib as bl
import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.pg: the throwaway PostgreSQL server of the tests

from tests.pg import PgServer, child_pids  # noqa: E402

MAX_REPLICAS = 32


# --- the replicas ----------------------------------------------------------------------------


def replica_config(index: int, store_url: str | None, config: str = "") -> str:
    """TOML for replica ``index``: ``config``, then ``[store]`` with ``store_url`` and the replica
    name ``r<index>`` when there is a store URL."""
    if not store_url:
        return config
    store = f"[store]\nurl = {json.dumps(store_url)}\nreplica = {json.dumps(f'r{index}')}\n"
    return f"{config.rstrip()}\n{store}" if config.strip() else store


def start_replicas(
    count: int,
    work: Path,
    socket_dir: Path,
    *,
    store_url: str | None = None,
    config: str = "",
    log_level: str = "WARNING",
) -> list[bl.AuthorityServer]:
    """``count`` ``authority serve`` processes started at once, each ready (answering its health
    check): replica i works in ``work/ri`` with its sockets in ``socket_dir/ri``. If one fails
    to start, the others are stopped and the error raised."""
    folders = []
    for i in range(count):
        folders.append((work / f"r{i}", socket_dir / f"r{i}"))
        for folder in folders[-1]:
            folder.mkdir()

    def start(i: int) -> bl.AuthorityServer:
        replica_work, replica_sockets = folders[i]
        return bl.start_authority(
            replica_work,
            replica_sockets,
            log_level=log_level,
            config=replica_config(i, store_url, config),
        )

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start, i) for i in range(count)]
    errors = [error for f in futures if (error := f.exception()) is not None]
    started = [f.result() for f in futures if f.exception() is None]
    if errors:
        stop_replicas(started)
        raise errors[0]
    return started


def stop_replicas(servers: Sequence[bl.AuthorityServer]) -> None:
    """Stop every replica (SIGTERM, then SIGKILL), warning about those that exited in error."""
    for server in servers:
        bl.stop_and_report(server)


# --- CPU from /proc --------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, of the children it has reaped (cutime + cstime) and of its live
    children: all of PostgreSQL when ``pid`` is the postmaster. 0.0 when it is gone."""
    total = bl.cpu_seconds(pid, missing_ok=True) + _reaped_cpu_seconds(pid)
    for child in child_pids(pid):
        total += bl.cpu_seconds(child, missing_ok=True) + _reaped_cpu_seconds(child)
    return total


def _reaped_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far of each replica and of PostgreSQL (0.0 without one), and the time."""

    wall: float
    replicas: tuple[float, ...]
    postgres: float

    @classmethod
    def take(cls, servers: Sequence[bl.AuthorityServer], postgres_pid: int | None) -> CpuSnapshot:
        return cls(
            wall=time.monotonic(),
            replicas=tuple(bl.cpu_seconds(s.pid, missing_ok=True) for s in servers),
            postgres=0.0 if postgres_pid is None else tree_cpu_seconds(postgres_pid),
        )


def cpu_report(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """The CPU used between two snapshots, in % of one core: per replica, all replicas, and
    PostgreSQL (its backends that came and went included)."""
    span = after.wall - before.wall
    used = [b - a for a, b in zip(before.replicas, after.replicas, strict=True)]
    return {
        "seconds": round(span, 2),
        "replicas_pct": [bl.cpu_percent(u, span) for u in used],
        "replicas_total_pct": bl.cpu_percent(sum(used), span),
        "postgres_pct": bl.cpu_percent(after.postgres - before.postgres, span),
    }


# --- a light load: GetBundle on the admin sockets --------------------------------------------


async def bundle_load(servers: Sequence[bl.AuthorityServer], seconds: float) -> bl.LoadRun:
    """``GetBundle`` back to back on every replica's admin socket (one caller each)."""
    channels = [
        grpc.aio.insecure_channel(f"unix:{s.admin_socket}", options=bl.CHANNEL_OPTIONS)
        for s in servers
    ]
    try:
        stubs = [pb_grpc.AdminStub(c) for c in channels]

        def sender(i: int) -> Callable[[], Awaitable[bool]]:
            async def send() -> bool:
                await stubs[i].GetBundle(pb.GetBundleRequest(), timeout=bl.RPC_TIMEOUT)
                return True

            return send

        return await bl.drive(sender, len(stubs), seconds)
    finally:
        for channel in channels:
            await channel.close(None)


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def store_for(args: argparse.Namespace) -> Iterator[tuple[str | None, int | None]]:
    """(store URL or None for SQLite, the postmaster's pid when it runs here)."""
    if not args.embedded_postgres:
        yield args.store, None
        return
    with PgServer() as server:
        os.environ.update(server.env)  # the replicas find the password in PGPASSFILE
        yield server.create_database(), server.pid


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with (
        bl.bench_dirs("bench-replicas-", "br-") as (work, socket_dir),
        store_for(args) as (store_url, postgres_pid),
    ):
        servers = await asyncio.to_thread(
            start_replicas,
            args.replicas,
            work,
            socket_dir,
            store_url=store_url,
            log_level=args.log_level,
        )
        try:
            before = CpuSnapshot.take(servers, postgres_pid)
            run = await bundle_load(servers, args.seconds)
            after = CpuSnapshot.take(servers, postgres_pid)
        finally:
            stop_replicas(servers)
    return {
        "replicas": args.replicas,
        "store": "postgresql" if store_url else "sqlite",
        "calls": len(run.latencies),
        "errors": run.errors,
        "p50_ms": round(1000 * bl.percentile(run.latencies, 0.5), 2),
        "p99_ms": round(1000 * bl.percentile(run.latencies, 0.99), 2),
        "cpu": cpu_report(before, after),
        "environment": bl.short_environment(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=1)
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", help="postgresql:// URL of a database (password in PGPASSFILE)")
    store.add_argument(
        "--embedded-postgres",
        action="store_true",
        help="a throwaway PostgreSQL server (embedded-postgres, the test extra)",
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    bl.require_range(parser, "--replicas", args.replicas, 1, MAX_REPLICAS)
    bl.require_range(parser, "--seconds", args.seconds, 0.1, 3600)
    if args.replicas > 1 and not (args.store or args.embedded_postgres):
        parser.error("more than one replica needs a shared store: --store or --embedded-postgres")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bl.run_bench(bench(args), failed="bench_replicas failed")
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

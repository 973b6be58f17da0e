#!/usr/bin/env python3
"""The grpclib Unix sockets under a stream storm and oversized messages (issue 11).

``python scripts/bench_wire.py [--streams 2000] [--connections 20] [--json out.json]
[--pythonpath DIR]``

Starts ``authority serve`` (temporary data directory, loopback ports, the attest socket and the
SPIFFE Workload API socket in a short /tmp folder) and creates one registration entry selecting
this uid, then:

* **stall**: a probe process calls ``Ping`` on the server-TLS port and ``GetBundle`` on the attest
  socket back to back (``--probe-interval`` apart), first for ``--idle`` seconds, then while this
  process opens ``--streams`` ``FetchX509SVID`` streams at once on the Workload API socket over
  ``--connections`` connections (grpclib's client; each stream gets an SVID of its own: a key
  generated and a certificate signed by the authority). Reported: the time until every stream
  has its first SVID, and the probes' latency (p50, p99, max) idle and during the storm: how
  long the storm stalls the authority's other endpoints.
* **memory**: the server's VmRSS before and its peak (VmHWM, reset first) while ``--huge``
  connections at once each send one 64 MiB message (an ``Attest`` on the attest socket, then a
  ``ValidateJWTSVID`` on the Workload API socket), and the status each got.

``--pythonpath DIR`` runs the server from another checkout (``git archive`` of an older commit)
to compare before and after. Traffic stays on 127.0.0.1 and Unix sockets; nothing printed holds
a token or key. Exits 0 when the run completes (a benchmark is not a test), 1 when setup fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing.connection
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _benchlib as bl
import grpc
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from authority._pb import authority_v1_authority_grpc as apb_grpclib
from authority._pb import authority_v1_authority_pb2 as apb
from authority._pb import authority_v1_authority_pb2_grpc as apb_grpc
from authority._pb import spiffe_workload_grpc as wpb_grpclib
from authority._pb import spiffe_workload_pb2 as wpb

HEADER = {"workload.spiffe.io": "true"}
HUGE = 64 * 1024 * 1024


# --- the probe process ---------------------------------------------------------------------------


async def probe_loop(conn: multiprocessing.connection.Connection, init: dict[str, Any]) -> None:
    """Ping (TLS) and GetBundle (attest socket) back to back between "begin" and "end"; "end"
    answers with [(kind, monotonic start, latency seconds or -1 on error)]."""
    creds = grpc.ssl_channel_credentials(root_certificates=init["roots"])
    tls = grpc.aio.secure_channel(init["tls"], creds, options=bl.CHANNEL_OPTIONS)
    local = grpc.aio.insecure_channel(f"unix:{init['attest']}", options=bl.CHANNEL_OPTIONS)
    ping = apb_grpc.WorkloadStub(tls).Ping
    bundle = apb_grpc.WorkloadStub(local).GetBundle
    samples: list[tuple[str, float, float]] = []
    interval = float(init["interval"])

    async def probe() -> None:
        while True:
            for kind, call, request in (
                ("ping", ping, apb.PingRequest()),
                ("bundle", bundle, apb.GetBundleRequest()),
            ):
                t0 = time.monotonic()
                try:
                    await call(request, timeout=60)
                    samples.append((kind, t0, time.monotonic() - t0))
                except grpc.aio.AioRpcError:
                    samples.append((kind, t0, -1.0))
            await asyncio.sleep(interval)

    task: asyncio.Task[None] | None = None

    def begin(_: object) -> None:
        nonlocal task
        task = asyncio.create_task(probe())

    async def end(_: object) -> list[tuple[str, float, float]]:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return samples

    try:
        await bl.serve_commands(conn, {"begin": ("begun", begin), "end": ("samples", end)})
    finally:
        await tls.close()
        await local.close()


# --- the storm -----------------------------------------------------------------------------------


async def storm(socket: Path, streams: int, connections: int) -> dict[str, Any]:
    """``streams`` FetchX509SVID streams opened at once; when each had its first SVID."""
    channels = [Channel(path=str(socket)) for _ in range(connections)]
    stubs = [wpb_grpclib.SpiffeWorkloadAPIStub(c) for c in channels]
    got: list[float] = []
    errors: dict[str, int] = {}
    everyone = asyncio.Event()

    async def one(stub: wpb_grpclib.SpiffeWorkloadAPIStub) -> None:
        try:
            async with stub.FetchX509SVID.open(metadata=HEADER, timeout=120) as stream:
                await stream.send_message(wpb.X509SVIDRequest(), end=True)
                reply = await stream.recv_message()
                if reply is None or not reply.svids:
                    errors["no SVID"] = errors.get("no SVID", 0) + 1
                else:
                    got.append(time.monotonic())
                if len(got) + sum(errors.values()) == streams:
                    everyone.set()
                await everyone.wait()
                await stream.cancel()
        except (GRPCError, StreamTerminatedError, OSError, TimeoutError) as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            if len(got) + sum(errors.values()) == streams:
                everyone.set()

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(stubs[i % connections]) for i in range(streams)))
    finally:
        for channel in channels:
            channel.close()
    return {
        "started": started,
        "ended": max(got, default=started),
        "ok": len(got),
        "errors": errors,
    }


def latency_summary(samples: list[tuple[str, float, float]], start: float, end: float) -> Any:
    out: dict[str, Any] = {}
    for kind in ("ping", "bundle"):
        for phase, inside in (
            ("idle", lambda t: t < start),
            ("storm", lambda t: start <= t <= end),
        ):
            values = [lat for k, t, lat in samples if k == kind and inside(t) and lat >= 0]
            failed = sum(1 for k, t, lat in samples if k == kind and inside(t) and lat < 0)
            out[f"{kind}_{phase}"] = {
                "calls": len(values),
                "failed": failed,
                "p50_ms": round(1000 * bl.percentile(values, 0.5), 1),
                "p99_ms": round(1000 * bl.percentile(values, 0.99), 1),
                "max_ms": round(1000 * max(values, default=float("nan")), 1),
            }
    return out


# --- oversized messages --------------------------------------------------------------------------


async def huge_messages(attest: Path, workload: Path, count: int, pid: int) -> dict[str, Any]:
    """``count`` connections at once each sending one 64 MiB message, per socket."""
    out: dict[str, Any] = {}
    attack = {
        "attest": (
            attest,
            lambda channel: apb_grpclib.WorkloadStub(channel).Attest,
            apb.AttestRequest(params=apb.AttestParams(evidence=bytes(HUGE))),
        ),
        "workload_api": (
            workload,
            lambda channel: wpb_grpclib.SpiffeWorkloadAPIStub(channel).ValidateJWTSVID,
            wpb.ValidateJWTSVIDRequest(audience="x", svid="a" * HUGE),
        ),
    }
    for name, (socket, method, request) in attack.items():
        reset_peak(pid)
        before = bl.rss_kib(pid)
        statuses = await asyncio.gather(*(send_once(socket, method, request) for _ in range(count)))
        out[name] = {
            "rss_before_mib": round(before / 1024, 1),
            "rss_peak_mib": round(peak_kib(pid) / 1024, 1),
            "statuses": sorted(set(statuses)),
        }
    return out


async def send_once(socket: Path, method: Callable[[Channel], Any], request: Any) -> str:
    """One call of ``method`` on a connection of its own; its status's name."""
    channel = Channel(path=str(socket))
    try:
        async with method(channel).open(metadata=HEADER, timeout=120) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_message()
        return "OK"
    except GRPCError as exc:
        return exc.status.name
    except (StreamTerminatedError, OSError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        channel.close()


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def peak_kib(pid: int) -> int:
    """VmHWM: the most resident memory since the last reset (a message read whole and freed
    at once leaves VmRSS as it was)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise bl.BenchError(f"no VmHWM for pid {pid}")


# --- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    command = None
    if args.pythonpath:  # first on sys.path (``-m`` would put the working directory first)
        boot = (
            f"import sys; sys.path.insert(0, {args.pythonpath!r}); from authority.cli import main"
        )
        command = [sys.executable, "-c", f"{boot}; sys.exit(main())"]
    with bl.bench_dirs("bench-wire-", "bw-") as (work, socket_dir):
        workload = socket_dir / "wl.sock"
        server = bl.start_authority(
            work,
            socket_dir,
            log_level=args.log_level,
            local_socket=True,
            config=f"workload_api_socket = {json.dumps(str(workload))}\n",
            command=command,
        )
        probe: bl.PipeWorker | None = None
        try:
            assert server.local_socket is not None
            async with grpc.aio.insecure_channel(f"unix:{server.admin_socket}") as channel:
                admin = apb_grpc.AdminStub(channel)
                roots = await bl.bundle_pem(admin)
                await admin.CreateEntry(
                    apb.CreateEntryRequest(
                        spiffe_id=f"spiffe://{bl.TRUST_DOMAIN}/bench-wire",
                        selectors=[apb.Selector(type="unix", value=f"uid:{os.getuid()}")],
                    ),
                    timeout=bl.RPC_TIMEOUT,
                )
            init = {
                "tls": server.tls_address,
                "roots": roots,
                "attest": str(server.local_socket),
                "interval": args.probe_interval,
            }
            probe = bl.PipeWorker(probe_loop, init, "probe")
            probe.expect("ready", bl.READY_TIMEOUT)
            await probe.ask("begin", None, "begun")
            await asyncio.sleep(args.idle)
            cpu0 = server.cpu_seconds()
            stormed = await storm(workload, args.streams, args.connections)
            cpu = server.cpu_seconds() - cpu0
            await asyncio.sleep(0.2)
            samples = await probe.ask("end", None, "samples")
            result: dict[str, Any] = {
                "server": args.pythonpath or "this checkout",
                "streams": args.streams,
                "connections": args.connections,
                "storm_seconds": round(stormed["ended"] - stormed["started"], 2),
                "streams_with_svid": stormed["ok"],
                "stream_errors": stormed["errors"],
                "server_cpu_seconds": round(cpu, 2),
                "latency": latency_summary(samples, stormed["started"], stormed["ended"]),
            }
            if args.huge:
                result["huge_messages"] = await huge_messages(
                    server.local_socket, workload, args.huge, server.pid
                )
            result["environment"] = bl.short_environment()
            return result
        finally:
            if probe is not None:
                probe.close()
            bl.stop_and_report(server)
            if args.server_log is not None:
                shutil.copyfile(server.log_path, args.server_log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--idle", type=float, default=1.0, help="probe seconds before the storm")
    parser.add_argument("--probe-interval", type=float, default=0.02)
    parser.add_argument("--huge", type=int, default=4, help="64 MiB messages at once (0: none)")
    parser.add_argument("--pythonpath", default="", help="run the server from this checkout")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args()
    if args.pythonpath:
        args.pythonpath = os.path.abspath(args.pythonpath)
    bl.require_range(parser, "--streams", args.streams, 1, 100_000)
    bl.require_range(parser, "--connections", args.connections, 1, 1000)
    result = bl.run_bench(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The fuzz suite's longer run, before a release: the strategies of ``tests/fuzz`` on every RPC
of every endpoint, round after round with a new seed, for ``--minutes``.

``python scripts/fuzz.py --minutes 30 [--seed 1] [--endpoint admin] [--rpc Exchange]``
``python scripts/fuzz.py --show fuzz-failures.jsonl``  (decode saved failing requests)

Starts one ``authority serve`` subprocess (temporary folders, 127.0.0.1 ports) with all five
endpoints, attests an SVID for the mutual-TLS port, then runs rounds: round ``r`` gives each RPC
``--messages`` hostile messages and ``--raw`` malformed requests drawn with seed ``seed + r``
(the same seed and round reproduce the same requests). At the end it prints, per endpoint and
RPC: cases run, statuses seen (counts per code), the server's RSS before and after, tracebacks
found in the server's log, and the digests of the first failing requests; the failing requests
themselves go to ``--save`` (JSON lines, hex; the inputs are random, they hold no secret).
Exit status 1 when any failure was found: an INTERNAL or UNKNOWN status, a call never answered,
a traceback, memory past the bound, or an endpoint no longer answering.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz.harness import (
    ENDPOINTS,
    MEMORY_BOUND_MB,
    RpcReport,
    all_rpcs,
    describe,
    fuzz_rpc,
    fuzz_server,
    save_bad_cases,
    still_answers,
)
from tests.fuzz.wire import Connection


def show(path: Path) -> int:
    for line in path.read_text().splitlines():
        case = json.loads(line)
        frames = [bytes.fromhex(f) for f in case["frames"]]
        print(f"{case['rpc']} [{case['kind']}] -> {case['status']} {case['message'][:160]!r}")
        print(f"    request {case['digest']} headers={case['headers']}")
        print(f"    {describe(case['rpc'], case['kind'], frames)[:1000]}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--messages", type=int, default=50, help="hostile messages per RPC/round")
    parser.add_argument("--raw", type=int, default=50, help="malformed requests per RPC/round")
    parser.add_argument("--endpoint", action="append", choices=ENDPOINTS, help="repeatable")
    parser.add_argument("--rpc", action="append", help="only RPCs whose name holds this")
    parser.add_argument("--save", type=Path, default=Path("fuzz-failures.jsonl"))
    parser.add_argument("--show", type=Path, help="decode a saved failures file and exit")
    args = parser.parse_args()
    if args.show:
        return show(args.show)

    rpcs = [
        rpc
        for rpc in all_rpcs()
        if (not args.endpoint or rpc.endpoint in args.endpoint)
        and (not args.rpc or any(part in rpc.name for part in args.rpc))
    ]
    if not rpcs:
        parser.error("no RPC matches")
    reports = {rpc.name: RpcReport(rpc.name, rpc.endpoint) for rpc in rpcs}
    unanswered: dict[str, set[str]] = {}
    deadline = time.monotonic() + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder, fuzz_server(Path(folder)) as server:
        rss_start = server.rss_kb()
        connections: dict[str, Connection] = {}
        round_ = 0
        try:
            while time.monotonic() < deadline and server.alive():
                # The admin RPCs may have rotated the CA or revoked the SVID: a fresh one, and
                # the current bundle to verify the server against.
                if (reason := server.reattest()) is not None:
                    print(f"no fresh SVID for the mutual-TLS port this round: {reason}")
                for connection in connections.values():
                    connection.close()
                connections = {e: Connection(server.targets[e]) for e in ENDPOINTS}
                for rpc in rpcs:
                    if time.monotonic() >= deadline or not server.alive():
                        break
                    streaming = rpc.method.server_streaming
                    fuzz_rpc(
                        server,
                        connections[rpc.endpoint],
                        rpc,
                        messages=args.messages // (4 if streaming else 1),
                        raw=args.raw // (4 if streaming else 1),
                        seed=args.seed + round_,
                        report=reports[rpc.name],
                        unanswered=unanswered.setdefault(rpc.endpoint, set()),
                    )
                round_ += 1
                print(f"round {round_} done (seed {args.seed + round_ - 1})", flush=True)
        finally:
            for connection in connections.values():
                connection.close()
        alive = server.alive()
        problems = still_answers(server) if alive else ["the server exited"]
        rss_end = server.rss_kb() if alive else 0

    failures = 0
    for endpoint in ENDPOINTS:
        rows = [r for r in reports.values() if r.endpoint == endpoint and r.cases]
        if rows:
            print(f"\n== {endpoint}")
        for report in rows:
            print(report.line())
            for case in report.bad[:5]:
                print(f"    {case.summary()}")
            for traceback in report.tracebacks[:1]:
                print("    first traceback:\n      " + traceback.replace("\n", "\n      "))
            failures += len(report.bad) + len(report.tracebacks)
    growth_mb = (rss_end - rss_start) / 1024
    total = sum(r.cases for r in reports.values())
    print(f"\n{round_} rounds, {total} cases, seeds {args.seed}..{args.seed + max(round_ - 1, 0)}")
    print(
        f"server RSS {rss_start // 1024} MB -> {rss_end // 1024} MB (bound +{MEMORY_BOUND_MB} MB)"
    )
    for problem in problems:
        print(f"NOT ANSWERING: {problem}")
    save_bad_cases(list(reports.values()), args.save)
    if failures:
        print(f"{failures} failures; failing requests saved to {args.save}")
    bad = failures or problems or growth_mb > MEMORY_BOUND_MB
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

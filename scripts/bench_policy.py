#!/usr/bin/env python3
"""Per-decision time of each policy backend, over the shared corpus inputs.

``python scripts/bench_policy.py [--rounds 200] [--json out.json]``

Loads ``examples/policies/agents.cedar`` and ``agents.rego`` (Rego only when regorus is installed),
warms each engine up, then times ``PolicyEngine.decide`` for every corpus input, ``--rounds``
times, one call at a time with ``time.perf_counter_ns``. A call is the whole decision as Exchange
will make it: deriving the facts, evaluating, resolving annotations/caps, and building the Decision
(with its fresh uuid4). It prints the median, p99, mean and max per decision and the decisions per
second of one thread, with the target (median < 0.5 ms) marked PASS or BELOW; also the load time
of each policy set and, for Rego, the first decision on a new thread (which parses the policies
once for that thread). It always exits 0 when the run completes: a benchmark is not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _benchlib import percentile  # noqa: E402

from authority.policy import PolicyEngine, PolicyInput, load_policy_set  # noqa: E402
from authority.policy.loader import load_policy_tests  # noqa: E402
from authority.policy.rego import rego_available  # noqa: E402

EXAMPLES = ROOT / "examples" / "policies"
CORPUS = ROOT / "tests" / "policy_corpus" / "corpus.json"
TARGET_MEDIAN_MS = 0.5


def _first_decision_on_new_thread_ms(engine: PolicyEngine, inp: PolicyInput) -> float:
    elapsed: list[int] = []

    def run() -> None:
        start = time.perf_counter_ns()
        engine.decide(inp)
        elapsed.append(time.perf_counter_ns() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return elapsed[0] / 1e6


def bench(policy: Path, inputs: list[PolicyInput], rounds: int) -> dict[str, object]:
    start = time.perf_counter_ns()
    engine = load_policy_set([policy])
    load_ms = (time.perf_counter_ns() - start) / 1e6
    for inp in inputs * 5:  # warm up
        engine.decide(inp)
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for inp in inputs:
            t0 = clock()
            engine.decide(inp)
            samples.append(clock() - t0)
    samples.sort()
    total_s = sum(samples) / 1e9
    median_ms = statistics.median(samples) / 1e6
    return {
        "backend": engine.backend,
        "policy": policy.name,
        "decisions": len(samples),
        "median_ms": round(median_ms, 4),
        "p99_ms": round(percentile(samples, 0.99) / 1e6, 4),
        "mean_ms": round(statistics.fmean(samples) / 1e6, 4),
        "max_ms": round(samples[-1] / 1e6, 4),
        "decisions_per_s": round(len(samples) / total_s),
        "load_ms": round(load_ms, 2),
        "first_decision_new_thread_ms": round(
            _first_decision_on_new_thread_ms(engine, inputs[0]), 3
        ),
        "target": "PASS" if median_ms < TARGET_MEDIAN_MS else "BELOW",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    inputs = [case.input for case in load_policy_tests(CORPUS)]
    policies = [EXAMPLES / "agents.cedar"]
    if rego_available():
        policies.append(EXAMPLES / "agents.rego")
    else:
        print("regorus is not installed: the Rego backend is skipped", file=sys.stderr)
    results = [bench(policy, inputs, args.rounds) for policy in policies]
    print(
        f"policy decisions: {len(inputs)} corpus inputs x {args.rounds} rounds, one thread, "
        f"Python {platform.python_version()} on {platform.machine()}"
    )
    header = (
        f"{'backend':8} {'median ms':>10} {'p99 ms':>8} {'mean ms':>8} {'max ms':>8} "
        f"{'decisions/s':>12} {'load ms':>8} {'new thread ms':>14}  target (median < 0.5 ms)"
    )
    print(header)
    for r in results:
        print(
            f"{r['backend']!s:8} {r['median_ms']:>10} {r['p99_ms']:>8} {r['mean_ms']:>8} "
            f"{r['max_ms']:>8} {r['decisions_per_s']:>12} {r['load_ms']:>8} "
            f"{r['first_decision_new_thread_ms']:>14}  {r['target']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fuzzing that stays: hostile requests on every RPC of every endpoint of a real authority.

One ``authority serve`` subprocess (so its log and its memory can be read) with all five
endpoints: the server-TLS port, the mutual-TLS port (with an attested SVID), the local attest
socket, the SPIFFE Workload API socket and the admin socket. Each RPC gets a deterministic batch
of well-typed hostile messages generated from its descriptor and of malformed requests
(``tests/fuzz/strategies.py``); after each batch: no INTERNAL or UNKNOWN status, every call
answered, no traceback in the server's log and less than ``LOG_BOUND_BYTES`` of it, the
server's memory within ``MEMORY_BOUND_MB`` of where it started. At the end every endpoint
still answers.

``FUZZ_REPORT_ONLY=1`` records the failures without failing (to watch fixes land);
``FUZZ_SUMMARY=PATH`` writes the per-RPC table and the failing requests (``PATH.jsonl``).
``FUZZ_ANSWER_WITHIN=S`` (default 5) is how long a call may go unanswered.
The longer run before a release is ``scripts/fuzz.py --minutes N``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fuzz.harness import (
    LOG_BOUND_BYTES,
    MEMORY_BOUND_MB,
    Rpc,
    all_rpcs,
    fuzz_rpc,
    save_bad_cases,
    still_answers,
)

if TYPE_CHECKING:
    from tests.fuzz.conftest import Fuzzing

pytestmark = pytest.mark.fuzz

REPORT_ONLY = os.environ.get("FUZZ_REPORT_ONLY") == "1"

# Cases per RPC, tuned to keep the suite near a minute and a half on two busy cores: hostile
# messages, then malformed requests. Server streams wait out a quiet subscription on each
# case, so they get fewer; Admin on the TCP ports is refused before its body is read; the two
# 0666 Unix sockets (grpclib, no TLS: their cases cost little) get twice as many.
MESSAGES, RAW = 16, 16
STREAM_MESSAGES, STREAM_RAW = 6, 6
REFUSED_MESSAGES, REFUSED_RAW = 2, 2
LOCAL_FACTOR = 2


def budget(rpc: Rpc) -> tuple[int, int]:
    if rpc.refused_service:
        return REFUSED_MESSAGES, REFUSED_RAW
    factor = LOCAL_FACTOR if rpc.endpoint in ("attest", "workload-api") else 1
    if rpc.method.server_streaming:
        return STREAM_MESSAGES * factor, STREAM_RAW * factor
    return MESSAGES * factor, RAW * factor


RPCS = all_rpcs()


def _fail_or_note(problems: list[str]) -> None:
    if problems and not REPORT_ONLY:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("rpc", RPCS, ids=[rpc.name for rpc in RPCS])
def test_hostile_requests(fuzzing: Fuzzing, rpc: Rpc) -> None:
    """No INTERNAL/UNKNOWN, every call answered, no traceback, memory bounded."""
    messages, raw = budget(rpc)
    report = fuzz_rpc(
        fuzzing.server,
        fuzzing.connection(rpc.endpoint),
        rpc,
        messages=messages,
        raw=raw,
        unanswered=fuzzing.unanswered.setdefault(rpc.endpoint, set()),
    )
    fuzzing.reports.append(report)
    # Hypothesis stops early once a small input space is exhausted (an empty request type).
    assert 0 < report.cases <= messages + raw
    problems = report.failures()
    if report.log_bytes > LOG_BOUND_BYTES:
        problems.append(f"{rpc.name}: the server logged {report.log_bytes} bytes for one batch")
    growth_mb = (report.rss_after_kb - fuzzing.rss_start_kb) / 1024
    if growth_mb > MEMORY_BOUND_MB:
        problems.append(f"{rpc.name}: server RSS grew {growth_mb:.0f} MB (bound {MEMORY_BOUND_MB})")
    if not fuzzing.server.alive():
        pytest.fail(f"the server exited during {rpc.name}:\n{fuzzing.server.log_since(0)[-4000:]}")
    _fail_or_note(problems)


def test_still_answering_after_the_fuzzing(fuzzing: Fuzzing) -> None:
    """Runs last (file order): every endpoint answers, memory stayed within the bound."""
    fuzzing.close()
    assert fuzzing.server.alive()
    problems = still_answers(fuzzing.server)
    rss_end_kb = fuzzing.server.rss_kb()
    growth_mb = (rss_end_kb - fuzzing.rss_start_kb) / 1024
    lines = [report.line() for report in fuzzing.reports]
    lines.append(
        f"server RSS {fuzzing.rss_start_kb // 1024} MB -> {rss_end_kb // 1024} MB "
        f"(bound +{MEMORY_BOUND_MB} MB); cases {sum(r.cases for r in fuzzing.reports)}"
    )
    summary = os.environ.get("FUZZ_SUMMARY")
    if summary:
        failures = [f for report in fuzzing.reports for f in report.failures()]
        Path(summary).write_text("\n".join([*lines, "", *failures, *problems]) + "\n")
        save_bad_cases(fuzzing.reports, Path(summary + ".jsonl"))
    # The table belongs in the output even when everything passed.
    print("\n".join(lines))
    if growth_mb > MEMORY_BOUND_MB:
        problems.append(f"server RSS grew {growth_mb:.0f} MB (bound {MEMORY_BOUND_MB})")
    assert fuzzing.reports, "no fuzz batch ran before the final check"
    _fail_or_note(problems)

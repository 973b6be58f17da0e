"""The soak (scripts/soak.py) for three minutes: one authority, two node agents, 28 workloads on
30-second SVIDs (4 through the client library's reconnecting stream), an Exchange load, five
watchers, CA rotations, revocations and every kind of fault. The script checks continuously and
exits non-zero on any violation; this test runs it as an operator would and holds its report's
figures to the bounds the report states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SOAK = ROOT / "scripts" / "soak.py"

pytestmark = pytest.mark.slow


def _run_soak(report_path: Path, minutes: int) -> tuple[subprocess.CompletedProcess[str], Any]:
    command = [sys.executable, str(SOAK), "--minutes", str(minutes), "--seed", "1"]
    result = subprocess.run(
        [*command, "--report", str(report_path)],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=ROOT,
    )
    assert report_path.exists(), f"no report (exit {result.returncode}):\n{result.stderr[-3000:]}"
    return result, json.loads(report_path.read_text())


@pytest.mark.timeout(420)
def test_soak_three_minutes_without_violations(tmp_path: Path) -> None:
    result, report = _run_soak(tmp_path / "soak.json", 3)
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert report["violations"] == [], summary
    assert report["violation_count"] == 0
    bounds = report["bounds"]

    # Every kind of fault was injected, and the run recovered from each.
    assert len(report["fault_kinds"]) == 7  # authority and agents SIGKILL and SIGTERM, ...
    assert set(report["faults"]) == set(report["fault_kinds"]), report["faults"]
    assert report["fault_count"] >= len(report["fault_kinds"])
    assert report["longest_without_valid_svid_s"] <= bounds["outage_bound_s"], summary
    recoveries = [f["recovered_s"] for f in report["fault_recoveries"]]
    assert None not in recoveries, report["fault_recoveries"]
    assert max(recoveries) <= bounds["recovery_deadline_s"]

    # Revocations reached every watcher, and left the workloads' streams.
    assert report["revocations"] >= 8
    assert report["revocations_missed"] == 0
    assert report["watch_latency_s"]["n"] == report["revocations"] * 5
    assert report["watch_latency_s"]["p99"] <= bounds["watch_deadline_s"]

    # The CA rotated (prepare, activate) and the new key reached every workload in time.
    steps = report["ca_rotations"]
    assert [s["step"] for s in steps][:2] == ["prepare", "activate"], steps
    activations = [s for s in steps if s["step"] == "activate"]
    assert all(s.get("propagated_s") is not None for s in activations), steps
    assert max(s["propagated_s"] for s in activations) <= bounds["ca_deadline_s"]

    # The Exchange load ran through the faults.
    assert report["exchanges"].get("OK", 0) >= 100, report["exchanges"]
    assert report["longest_without_exchange_s"] <= bounds["exchange_outage_bound_s"]

    assert report["audit_verify"]["exit"] == 0, report["audit_verify"]

    # Memory, open files and threads flat; logs bounded.
    factor, plus = bounds["rss_tolerance"]["factor"], bounds["rss_tolerance"]["plus_kib"]
    for role, figures in report["resources"].items():
        start, end = figures["start"], figures["end"]
        assert end["rss_kib"] <= start["rss_kib"] * factor + plus, (role, figures)
        assert end["fds"] <= start["fds"] + bounds["fd_tolerance"], (role, figures)
        assert end["threads"] <= start["threads"] + bounds["thread_tolerance"], (role, figures)
    assert {"authority", "agent-a", "agent-b", "soak"} <= set(report["resources"])
    for role, lines in report["log_lines"].items():
        assert bounds["log_lines_per_minute"] <= lines["bound_per_minute"] <= 600
        assert lines["max_in_60s"] <= lines["bound_per_minute"], (role, lines)

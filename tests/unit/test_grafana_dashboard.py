"""examples/grafana/authority.json is a dashboard Grafana imports: a uid, a title, panels that
query Prometheus through the datasource variable. (Every metric it queries exists: see
tests/integration/test_metrics.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "authority.json"
METRIC = re.compile(r"\b(authority_[a-z0-9_]+)\b")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queried_metrics() -> set[str]:
    """Every metric name a panel's PromQL names."""
    names: set[str] = set()
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            names.update(METRIC.findall(target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        names.update(METRIC.findall(variable.get("definition", "")))
    return names


def test_the_dashboard_has_what_grafana_needs_to_import_it() -> None:
    board = dashboard()
    assert board["uid"] == "agent-authority"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    graphs = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])
            assert target["refId"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_panels_cover_the_issue() -> None:
    names = queried_metrics()
    for wanted in (
        "authority_grpc_server_handled_total",
        "authority_grpc_server_handling_seconds_bucket",
        "authority_credentials_issued_total",
        "authority_policy_decisions_total",
        "authority_approvals_pending",
        "authority_revocation_feed_lag_seconds_bucket",
        "authority_signing_key_expiry_seconds",
        "authority_agent_svid_expiry_seconds",
        "authority_store_commit_seconds_bucket",
    ):
        assert wanted in names

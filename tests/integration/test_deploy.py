"""What deploy/ ships for operating the control plane: the Prometheus alerting rules
(checked and unit-tested with promtool) and the Grafana dashboard; both may name only
metrics the servers and the agents export, so that neither drifts from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agents._client_state import Metrics as AgentMetrics
from controlplane.metrics import ServerMetrics
from tests.helpers.debian_tools import unpacked

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "controlplane.json"
METRIC = re.compile(r"\bcontrolplane_[a-z0-9_]+")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$service": ".*"}
"""What Grafana puts in place of its variables, for promtool to parse an expression."""


def promtool() -> str:
    """promtool's path; the test fails, saying how to get it, when it is missing."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        # Debian's prometheus package, unpacked (not installed) into the tests' cache.
        binary = unpacked("prometheus", "promtool")
        found = str(binary) if binary is not None else None
    if not found:
        pytest.fail(
            "promtool is missing: it checks deploy/prometheus/. Install Debian's prometheus "
            "package (apt-get install -y --no-install-recommends prometheus), or unpack "
            "promtool from it as .ci/run does, and put it on PATH (or name it in PROMTOOL)"
        )
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def exported_metrics() -> set[str]:
    """Every sample name the control server and an agent (cp-agent's /metrics) export."""
    registry = CollectorRegistry()
    ServerMetrics(registry)
    AgentMetrics(registry, "checkout")
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(title of the panel or variable, expression) of every query in the dashboard:
    panels (nested in rows too) and template variables."""
    if isinstance(node, dict):
        where = str(node.get("title") or node.get("name") or where)
        if isinstance(node.get("expr"), str):
            yield where, node["expr"]
        query = node.get("query")
        if isinstance(query, dict) and isinstance(query.get("query"), str):
            yield where, query["query"]
        for value in node.values():
            yield from dashboard_queries(value, where)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item, where)


def test_the_alert_rules_are_valid() -> None:
    checked = run_promtool("check", "rules", str(ALERTS), cwd=ALERTS.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    tested = run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_says_what_to_do_and_names_exported_metrics() -> None:
    exported = exported_metrics()
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert name in tested, f"{name}: no test in {ALERTS_TEST.name} expects it to fire"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert "cpctl" in annotations.get("description", ""), (
            f"{name}: its description must say which cpctl command to run"
        )
        named = set(METRIC.findall(rule["expr"]))
        assert named, f"{name}: names no controlplane_* metric"
        assert named <= exported, f"{name}: {sorted(named - exported)} are not exported"


def test_the_dashboard_takes_its_prometheus_as_an_input_and_names_exported_metrics(
    tmp_path: Path,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["schemaVersion"] >= 39
    exported = exported_metrics()
    queries = list(dashboard_queries(dashboard["panels"])) + list(
        dashboard_queries(dashboard["templating"])
    )
    assert len(queries) > 20
    for where, expr in queries:
        named = set(METRIC.findall(expr))
        assert named, f"{where}: {expr!r} names no controlplane_* metric"
        assert named <= exported, f"{where}: {sorted(named - exported)} are not exported"
    panels = [p for p in _all_panels(dashboard["panels"]) if p.get("type") != "row"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

    # Every panel query is PromQL that parses (as a recording rule, once Grafana's
    # variables are replaced the way Grafana does).
    rules = []
    for index, (_, expr) in enumerate(queries):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable the test does not know in {expr!r}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    parsed = tmp_path / "dashboard-queries.yml"
    parsed.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(parsed), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))

"""What deploy/ ships for operating the control plane: the Prometheus alerting rules,
checked and unit-tested with promtool; they may name only metrics the servers and the
agents export, so that they cannot drift from the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agents._client_state import Metrics as AgentMetrics
from controlplane.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
METRIC = re.compile(r"\bcontrolplane_[a-z0-9_]+")


def promtool() -> str:
    """promtool's path; the test fails, saying how to get it, when it is missing."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
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

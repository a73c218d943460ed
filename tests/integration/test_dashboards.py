"""deploy/grafana/voxd.json and deploy/prometheus/voxd-rules.yml: well-formed, every metric and
label value they query exists on a running voxd's /metrics, and (where promtool can be had)
the rules pass `promtool check rules`, the dashboard's queries parse as PromQL, and each alert
fires on what it is for (tests/integration/voxd-rules.test.yml)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.system_tools import missing_after_apt
from tests.integration.test_metrics_start import fresh_voxd

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "voxd.json"
RULES = ROOT / "deploy" / "prometheus" / "voxd-rules.yml"
RULE_TESTS = Path(__file__).with_name("voxd-rules.test.yml")

METRIC = re.compile(r"\b((?:voxd|process)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b((?:voxd|process)_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|=)\s*"([^"]*)"')
HISTOGRAM_PART = re.compile(r"_(bucket|sum|count)$")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "voxd", "$instance": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in panels(dashboard()) for target in panel.get("targets", [])]


def every_expr() -> list[str]:
    return dashboard_exprs() + [rule["expr"] for rule in rules()]


def test_the_dashboard_is_a_grafana_dashboard():
    board = dashboard()
    assert board["title"] and board["uid"] == "voxd"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in panels(board) if p["type"] != "row"]
    assert len(graphs) >= 10
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in graphs:
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), panel["title"]
        # the datasource is the variable, so the dashboard imports into any Grafana
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    titles = " / ".join(p["title"].lower() for p in graphs)
    for subject in ("active calls", "turn latency", "barge-ins", "errors", "refused connections",
                    "cpu per active call", "memory (rss) per active call", "outbound",
                    "instances up"):
        assert subject in titles, f"no panel about {subject}"
    latency = next(p for p in graphs if p["title"].startswith("Turn latency"))
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_the_rules_are_alerting_rules_with_what_an_operator_needs():
    document = yaml.safe_load(RULES.read_text())
    assert document["groups"] and all(g["name"] and g["rules"] for g in document["groups"])
    names = set()
    for rule in rules():
        names.add(rule["alert"])
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert names == {"VoxdDown", "VoxdTargetMissing", "VoxdDrainingTooLong",
                     "VoxdCallErrorRate", "VoxdTurnLatencyHigh", "VoxdAssistantFailing",
                     "VoxdAtCapacity"}
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    assert "> 1.5" in by_name["VoxdTurnLatencyHigh"]  # the README's stated threshold
    assert "> 0.05" in by_name["VoxdCallErrorRate"]


def exported(text: str) -> tuple[set[str], dict[str, dict[str, set[str]]]]:
    """Sample names on a /metrics page, and each metric's label values."""
    names: set[str] = set()
    labels: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            for key, value in sample.labels.items():
                for name in (sample.name, family.name):
                    labels.setdefault(name, {}).setdefault(key, set()).add(value)
    return names, labels


@pytest.mark.parametrize("workers", [1, 2])
def test_every_metric_and_label_value_queried_exists_on_a_running_voxd(tmp_path, workers):
    """What the dashboard and the alerts name, against a fresh voxd's /metrics (no call made:
    every labelled series and the histograms' buckets exist from the start). `process_*`
    exist with one worker only, so neither file may rely on them."""
    with fresh_voxd(tmp_path, workers) as origin:
        names, labels = exported(httpx.get(origin + "/metrics", timeout=5).text)
    families = {HISTOGRAM_PART.sub("", name) for name in names}
    used = {name for expr in every_expr() for name in METRIC.findall(expr)}
    assert any(name.endswith("_bucket") for name in used)  # the regex sees histograms
    missing = sorted(name for name in used if name not in names)
    assert missing == [], f"queried but not on /metrics with {workers} worker(s): {missing}"
    assert {HISTOGRAM_PART.sub("", name) for name in used} <= families
    checked = 0
    for expr in every_expr():
        for metric, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if label in ("job", "instance"):  # Prometheus's target labels
                    continue
                wanted = value.split("|") if op == "=~" else [value]
                have = labels.get(metric, {}).get(label, set())
                absent = [v for v in wanted if v not in have]
                assert absent == [], f"{metric}{{{label}}}: no series for {absent} in {expr}"
                checked += 1
    assert checked >= 5  # the label checks ran


def promtool() -> str:
    missing = missing_after_apt(("promtool",), ("prometheus",))
    if missing:
        pytest.skip("promtool not found (Debian's prometheus package; installed here only as "
                    "root with apt-get): install it and run `promtool check rules "
                    "deploy/prometheus/voxd-rules.yml`, or this test")
    path = shutil.which("promtool")
    assert path is not None
    return path


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def test_promtool_checks_the_rules():
    result = run([promtool(), "check", "rules", str(RULES)], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_dashboards_queries_are_valid_promql(tmp_path):
    """Each query (Grafana's variables given values) as a recording rule: promtool parses it."""
    exprs = []
    for expr in dashboard_exprs():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        exprs.append(expr)
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"voxd_dashboard:query{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(recording))
    result = run([promtool(), "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_what_it_is_for(tmp_path):
    """promtool's rule unit tests (tests/integration/voxd-rules.test.yml), on a copy of the
    rules without annotations: promtool would otherwise compare every alert's whole text."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "voxd-rules.yml").write_text(yaml.safe_dump(document))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {rule["alert"] for rule in rules()}, "an alert never seen firing"
    result = run([promtool(), "test", "rules", RULE_TESTS.name], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

"""deploy/grafana/voxd.json and deploy/prometheus/voxd-rules.yml: well-formed, every metric and
label value they query exists on a running voxd's /metrics, and (where promtool can be had)
the rules pass `promtool check rules`, the dashboard's queries parse as PromQL, and each alert
fires on what it is for (tests/integration/voxd-rules.test.yml)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
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
                    "instances up", "capacity in use", "workers ready"):
        assert subject in titles, f"no panel about {subject}"
    exprs = " ".join(dashboard_exprs())
    for name in ("voxd_calls_started_total", "voxd_calls_max", "voxd_ready", "voxd_workers"):
        assert name in exprs, f"no panel shows {name}"
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
                     "VoxdAtCapacity", "VoxdRefusingCallsAtCapacity", "VoxdNotReady"}
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    assert "> 1.5" in by_name["VoxdTurnLatencyHigh"]  # the README's stated threshold
    assert "> 0.05" in by_name["VoxdCallErrorRate"]
    assert "> 0.9" in by_name["VoxdAtCapacity"] and "voxd_calls_max" in by_name["VoxdAtCapacity"]
    assert "voxd_ready" in by_name["VoxdNotReady"]
    # a restart's drain ([drain] timeout_seconds, 120 s by default) must not page
    assert {rule["alert"]: rule["for"] for rule in rules()}["VoxdNotReady"] == "10m"


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_real_prometheus_fills_every_panel_and_alerts_when_the_assistant_is_down(tmp_path):
    """Issue 17's "Done when", with a real Prometheus (1 s scrapes, the shipped rules): a
    `voxd loadtest` through voxd to an echoing assistant gives every dashboard query a result
    (turn latency and the per-call figures real numbers); the assistant gone, three failed
    `voxd call`s raise VoxdAssistantFailing (pending: its `for:` is a minute)."""
    missing = missing_after_apt(("prometheus",), ("prometheus",))
    if missing:
        pytest.skip("prometheus not found (Debian's prometheus package; installed here only "
                    "as root with apt-get)")
    echo_port, prometheus_port = free_port(), free_port()
    # the echo answers each caller turn 400 ms after it ends, as `voxd loadtest --turns` has
    # it (voxd measures those turns; with 200 ms it measured none)
    echo = subprocess.Popen([sys.executable, "-m", "voxd", "echo-upstream", "--listen",
                             f"127.0.0.1:{echo_port}", "--reply-after-ms", "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    extra = ('[assistant]\nprovider = "websocket"\naudio = "mulaw"\n'
             f'[websocket]\nurl = "ws://127.0.0.1:{echo_port}/"\n[logging]\nlevel = "warning"\n')
    prometheus = None
    try:
        with fresh_voxd(tmp_path, 1, extra) as origin:
            config = tmp_path / "prometheus.yml"
            config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "voxd", "static_configs": [
                    {"targets": [origin.removeprefix("http://")]}]}]}))
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            api = f"http://127.0.0.1:{prometheus_port}/api/v1"

            def query(expr: str) -> list[dict[str, Any]]:
                response = httpx.get(api + "/query", params={"query": expr}, timeout=5)
                response.raise_for_status()  # 503 while Prometheus starts: wait_for waits
                answer = response.json()
                assert answer["status"] == "success", (expr, answer)
                return list(answer["data"]["result"])

            def wait_for(what: str, check: Any, seconds: float = 30) -> None:
                deadline = time.monotonic() + seconds
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if check():
                            return
                    assert prometheus.poll() is None, prometheus.communicate()[1][-2000:]
                    assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
                    time.sleep(0.5)

            wait_for("Prometheus scrapes voxd", lambda: query('up{job="voxd"} == 1'))

            def call(*options: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "voxd", "call",
                                       origin + "/twilio/voice", *options],
                                      capture_output=True, text=True, timeout=60, check=False)

            load = subprocess.run([sys.executable, "-m", "voxd", "loadtest",
                                   origin + "/twilio/voice", "--calls", "3", "--seconds", "8"],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert load.returncode == 0, load.stdout[-1000:] + load.stderr[-1000:]
            wait_for("Prometheus scrapes the load test's ended calls",
                     lambda: query('sum(voxd_calls_total{job="voxd"}) >= 3'))
            window = "[60s:1s]"
            empty, values = [], {}
            for panel in panels(dashboard()):
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$__rate_interval", "10s")
                    expr = expr.replace("$job", "voxd").replace("$instance", ".*")
                    result = query(f"max_over_time(({expr}){window})")
                    if not result:
                        empty.append(f"{panel['title']}: {target['legendFormat']}")
                    values[(panel["title"], target["legendFormat"])] = max(
                        (float(r["value"][1]) for r in result), default=float("nan"))
            assert empty == [], f"panels with no data after a load test: {empty}"
            for (title, legend), value in values.items():
                if (title.startswith(("Active calls", "Turn latency", "CPU per active call",
                                     "Memory (RSS) per active call", "Media frames",
                                     "Capacity in use", "Workers ready")) and \
                        not legend.startswith("dropped")) or legend == "started":
                    assert value > 0, f"{title} {legend}: {value}"

            echo.terminate()
            echo.wait(10)
            failed = [call("--seconds", "2") for _ in range(3)]
            assert all("unavailable" in c.stdout for c in failed), failed[0].stdout[-500:]

            def assistant_alert() -> bool:
                alerts = httpx.get(api + "/alerts", timeout=5).json()["data"]["alerts"]
                return any(a["labels"]["alertname"] == "VoxdAssistantFailing" for a in alerts)

            wait_for("VoxdAssistantFailing raised", assistant_alert)
    finally:
        for process in (prometheus, echo):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

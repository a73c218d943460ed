"""What /metrics shows before anything happened: every labelled series at 0 (so alerts read 0,
not "no data") and no `_created` samples. The label tables in voxd.observability.metrics are
held here to every label value the code counts."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

import voxd
from voxd.call.ending import POLICY
from voxd.observability import metrics
from voxd.outbound import STATUSES
from voxd.providers.base import ANSWERED_BY, STAGES

SOURCE = Path(voxd.__file__).parent
LABELS_CALL = re.compile(r"\b(?:metrics\.)?([A-Z_]+)\.labels\(([^()]*)\)")
LITERAL = re.compile(r'^(\w+)="([^"]*)"$')

DYNAMIC = {
    # (module, metric, the argument's text): where its values come from, and which they are
    ("call/session.py", "CALLS_TOTAL", "outcome=row.outcome"):
        {row.outcome for row in POLICY.values()} | {"error"},
    ("call/session.py", "ASSISTANT_STAGE_SECONDS", "stage=event.stage"): set(STAGES),
    ("call/session.py", "BARGE_INS", "source=source"):
        set(re.findall(r'self\._barge_in\(playback, "(\w+)"',
                       (SOURCE / "call/session.py").read_text())),
    ("routes.py", "OUTBOUND_CALLS", "status=status"): set(STATUSES),
    ("routes.py", "OUTBOUND_CALLS", "status=counted"):
        set(re.findall(r'api_error\(\d+, "([\w-]+)"', (SOURCE / "routes.py").read_text())),
    ("routes.py", "MACHINE_DETECTION", "answered_by=answered_by"): set(ANSWERED_BY),
    ("net/front.py", "CONNECTIONS_REJECTED", "reason=reason"):
        {a or b for a, b in re.findall(r'_refuse\(\s*"(\w+)"|reason, key = "(\w+)"',
                                       (SOURCE / "net/front.py").read_text())},
}
"""Label values the code passes in a variable, found where the variable gets them."""


def counted() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Every label set the code counts, by metric attribute name."""
    found: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    dynamic_seen = set()
    for path in sorted(SOURCE.rglob("*.py")):
        module = path.relative_to(SOURCE).as_posix()
        if module == "observability/metrics.py" or module.startswith("sim/"):
            continue
        for name, arguments in LABELS_CALL.findall(path.read_text()):
            parts = [part.strip() for part in arguments.replace("\n", " ").split(",")
                     if part.strip()]
            if all(LITERAL.match(part) for part in parts):
                pairs = tuple(sorted(LITERAL.match(p).groups() for p in parts))  # type: ignore[union-attr]
                found.setdefault(name, set()).add(pairs)
                continue
            assert len(parts) == 1, f"{module}: {name}.labels({arguments}): a mix; teach this test"
            key = (module, name, parts[0])
            assert key in DYNAMIC, (f"{module}: {name}.labels({parts[0]}) counts values this "
                                    "test does not know: add where they come from to DYNAMIC")
            dynamic_seen.add(key)
            label = parts[0].split("=")[0]
            assert DYNAMIC[key], f"no values found for {key}"
            found.setdefault(name, set()).update(((label, v),) for v in DYNAMIC[key])
    assert dynamic_seen == set(DYNAMIC), f"no longer in the code: {set(DYNAMIC) - dynamic_seen}"
    return found


def initialised() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    names = {id(value): name for name, value in vars(metrics).items() if name.isupper()}
    return {names[id(metric)]: {tuple(sorted(labels.items())) for labels in label_sets}
            for metric, label_sets in metrics.LABELS.items()}


def test_every_label_value_the_code_counts_starts_at_zero():
    code, tables = counted(), initialised()
    for name, label_sets in code.items():
        missing = label_sets - tables.get(name, set())
        assert not missing, f"metrics.{name}: counted but not in metrics.LABELS: {missing}"


def test_every_labelled_metric_has_its_label_values():
    """A labelled metric left out of LABELS would show nothing until its first event."""
    for metric in vars(metrics).values():
        if isinstance(metric, (metrics.Counter, metrics.Histogram)) and metric._labelnames:
            assert metrics.LABELS.get(metric), f"{metric._name}: no label values in LABELS"


def test_the_exposition_has_every_series_at_zero_and_no_created_samples():
    text = generate_latest(metrics.REGISTRY).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [s for s in samples if re.match(r"\w+_created[{ ]", s)]
    for metric, label_sets in metrics.LABELS.items():
        suffix = "_count" if isinstance(metric, metrics.Histogram) else "_total"
        for labels in label_sets:
            value = metrics.REGISTRY.get_sample_value(metric._name + suffix, labels)
            assert value is not None, (metric._name, labels)


def test_documented_label_values_are_initialised():
    """The label values the README's Metrics section and interface.md name (spot checks of
    each kind of table: the end-of-call table, Twilio's statuses, the front door's refusals)."""
    tables = initialised()
    assert {v for ((_, v),) in tables["CALLS_TOTAL"]} == {
        "completed", "transferred", "machine", "error"}
    assert (("status", "no-answer"),) in tables["OUTBOUND_CALLS"]
    assert (("status", "rate-limited"),) in tables["OUTBOUND_CALLS"]
    assert (("answered_by", "machine_end_beep"),) in tables["MACHINE_DETECTION"]
    assert (("reason", "handshake_timeout"),) in tables["CONNECTIONS_REJECTED"]
    assert (("kind", "upstream"),) in tables["ERRORS"]


def test_every_gauge_adds_up_over_the_workers():
    """With server.workers > 1, /metrics reads each gauge summed over the live workers
    (voxd_ready N when all N workers are ready, voxd_calls_max N x the limit); a dead worker's
    values leave with it. prometheus-client's default ("all") would show one series per pid."""
    gauges = {metric._name: metric._multiprocess_mode for metric in vars(metrics).values()
              if isinstance(metric, metrics.Gauge)}
    assert {"voxd_ready", "voxd_calls_max", "voxd_workers", "voxd_calls_active"} <= set(gauges)
    assert {name for name, mode in gauges.items() if mode != "livesum"} == set()


def test_calls_started_is_a_plain_counter_from_zero():
    text = generate_latest(metrics.REGISTRY).decode()
    assert "# TYPE voxd_calls_started_total counter" in text
    assert metrics.REGISTRY.get_sample_value("voxd_calls_started_total") is not None

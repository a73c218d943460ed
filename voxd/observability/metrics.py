"""Process-wide Prometheus metrics (names are part of the public surface: interface.md).

Per-frame counts are kept in plain integers by each call and added here in batches, so the
per-frame path never takes prometheus-client's locks.

With `server.workers > 1` every worker process writes its values to files in
$PROMETHEUS_MULTIPROC_DIR (set by the supervising process) and /metrics, served by whichever
worker takes the request, adds up all of them: one view of the whole service.

What an operator could misread is left out or filled in, in every process that imports this
module (each worker too):
- no `_created` samples (prometheus-client's creation timestamps: `voxd_calls_created
  1.8e+09` reads as 1.8 billion calls); the multiprocess collector never exports them;
- every labelled series starts at 0 for each label value the code can count (`LABELS`), so an
  alert's `rate()` or `increase()` reads 0 before the first event instead of "no data".
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from voxd.call.ending import POLICY, policy
from voxd.outbound import STATUSES
from voxd.providers.base import ANSWERED_BY, STAGES

disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

CALLS_ACTIVE = Gauge("voxd_calls_active", "Calls bridged right now", registry=REGISTRY,
                     multiprocess_mode="livesum")
CALLS_TOTAL = Counter(
    "voxd_calls_total", "Calls ended, by outcome", ["outcome"], registry=REGISTRY
)
CALLS_STARTED = Counter(
    "voxd_calls_started_total", "Calls begun: a media stream's start message accepted (token "
    "checked), once per phone call; webhook retries and refused streams are not counted",
    registry=REGISTRY,
)
CALLS_MAX = Gauge(
    "voxd_calls_max", "Calls this voxd takes at once: call.max_concurrent_calls of each worker, "
    "added up (the service's capacity)", registry=REGISTRY, multiprocess_mode="livesum",
)
READY = Gauge(
    "voxd_ready", "Workers taking new calls (/readyz 200: not draining, not at capacity), "
    "added up: N when all N are", registry=REGISTRY, multiprocess_mode="livesum",
)
WORKERS = Gauge(
    "voxd_workers", "voxd processes serving (workers alive, ready or not)", registry=REGISTRY,
    multiprocess_mode="livesum",
)
CALLS_REJECTED = Counter(
    "voxd_calls_rejected_total", "Calls refused, by reason", ["reason"], registry=REGISTRY
)
MEDIA_FRAMES = Counter(
    "voxd_media_frames_total", "Media frames moved, by direction", ["direction"],
    registry=REGISTRY,
)
MEDIA_FRAMES_DROPPED = Counter(
    "voxd_media_frames_dropped_total", "Media frames dropped, by direction and reason",
    ["direction", "reason"], registry=REGISTRY,
)
UPSTREAM_CONNECT_SECONDS = Histogram(
    "voxd_upstream_connect_seconds", "Time to open the assistant's connection",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
TURN_LATENCY_SECONDS = Histogram(
    "voxd_turn_latency_seconds", "End of caller speech to first assistant audio sent",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5), registry=REGISTRY,
)
BARGE_INS = Counter(
    "voxd_barge_ins_total", "Assistant playback interrupted, by source", ["source"],
    registry=REGISTRY,
)
TRANSFERS = Counter(
    "voxd_transfers_total", "Transfers an assistant asked for, by result (completed, refused, "
    "failed)", ["result"], registry=REGISTRY,
)
OUTBOUND_CALLS = Counter(
    "voxd_outbound_calls_total", "Outbound calls: requests voxd refused (unauthorized, "
    "refused, rate-limited), creations (created, create-failed), and every status Twilio "
    "reported (initiated, ringing, in-progress, completed, busy, no-answer, failed, canceled)",
    ["status"], registry=REGISTRY,
)
ASSISTANT_STAGE_SECONDS = Histogram(
    "voxd_assistant_stage_seconds", "Stages of the assistant's turns, as its platform reports "
    "them or voxd times them from its events (transcript, first_token, first_audio, total)",
    ["stage"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5), registry=REGISTRY,
)
MACHINE_DETECTION = Counter(
    "voxd_machine_detection_total", "Answering-machine detection results, by Twilio's "
    "AnsweredBy", ["answered_by"], registry=REGISTRY,
)
KEYPAD = Counter(
    "voxd_keypad_presses_total", "Keypad keys, by direction (in: the caller pressed; out: "
    "played for the assistant)", ["direction"], registry=REGISTRY,
)
CONNECTIONS_OPEN = Gauge("voxd_connections_open", "TCP connections open (all kinds)",
                         registry=REGISTRY, multiprocess_mode="livesum")
CONNECTIONS_REJECTED = Counter(
    "voxd_connections_rejected_total",
    "Connections closed by the front door before any work, by reason", ["reason"],
    registry=REGISTRY,
)
ERRORS = Counter("voxd_errors_total", "Errors, by kind", ["kind"], registry=REGISTRY)
TRIO_TASKS = Gauge("voxd_trio_tasks", "Trio tasks alive in the event loop (leak check)",
                   registry=REGISTRY, multiprocess_mode="livesum")
PROCESS_CPU = Gauge("voxd_process_cpu_seconds", "CPU time used by voxd (all workers)",
                    registry=REGISTRY, multiprocess_mode="livesum")
PROCESS_RSS = Gauge("voxd_process_resident_memory_bytes", "Resident memory of voxd (all "
                    "workers)", registry=REGISTRY, multiprocess_mode="livesum")


OUTBOUND_ANSWERS = ("created", "unauthorized", "refused", "rate-limited", "create-failed")
"""voxd's own answers to `POST /calls`, counted in voxd_outbound_calls_total{status} beside
Twilio's CallStatus values."""

LABELS: dict[Counter | Histogram, tuple[dict[str, str], ...]] = {
    CALLS_TOTAL: tuple({"outcome": outcome} for outcome in sorted(
        {row.outcome for row in POLICY.values()} | {policy("").outcome})),
    CALLS_REJECTED: tuple({"reason": reason} for reason in (
        "signature", "token", "malformed", "capacity", "draining")),
    MEDIA_FRAMES: ({"direction": "inbound"}, {"direction": "outbound"}),
    MEDIA_FRAMES_DROPPED: ({"direction": "outbound", "reason": "barge_in"},
                           {"direction": "inbound", "reason": "preconnect"},
                           {"direction": "inbound", "reason": "upstream_stalled"}),
    BARGE_INS: ({"source": "assistant"}, {"source": "vad"}),
    TRANSFERS: tuple({"result": result} for result in (
        "placed", "refused", "failed", "answered", "unanswered")),
    OUTBOUND_CALLS: tuple({"status": status}
                          for status in (*OUTBOUND_ANSWERS, *sorted(STATUSES))),
    ASSISTANT_STAGE_SECONDS: tuple({"stage": stage} for stage in STAGES),
    MACHINE_DETECTION: tuple({"answered_by": answer} for answer in ANSWERED_BY),
    KEYPAD: ({"direction": "in"}, {"direction": "out"}),
    CONNECTIONS_REJECTED: tuple({"reason": reason} for reason in (
        "max_connections", "per_address", "handshake_timeout", "head_too_big", "not_http",
        "bad_upgrade", "upgrade", "websocket_path", "body")),
    ERRORS: tuple({"kind": kind} for kind in (
        "upstream", "upstream_stalled", "keepalive", "protocol", "twilio_silent",
        "twilio_stalled", "internal", "background", "connection", "accept", "state", "keypad")),
}
"""Every label value each labelled metric can be counted with: the series start at 0.
tests/unit/test_metrics_init.py holds this to every value the code counts."""


def start_labelled_series() -> None:
    """Create every series of LABELS at 0 (in this process; with several workers each one
    writes its own zeros, which add up to 0)."""
    for metric, label_sets in LABELS.items():
        for labels in label_sets:
            metric.labels(**labels)


start_labelled_series()


class SelfProcessCollector:
    """The standard `process_*` metrics of this process, from /proc/self only.

    prometheus-client's ProcessCollector needs /proc/stat (the boot time) and exports nothing at
    all without it, and the unit's `ProcSubset=pid` hides /proc/stat. Here the boot time comes
    from the clocks instead: `CLOCK_BOOTTIME` is the clock /proc/self/stat's start time counts
    on, so now - boottime is when the machine booted."""

    def __init__(self, proc: str = "/proc") -> None:
        self._self = os.path.join(proc, "self")
        self._ticks = os.sysconf("SC_CLK_TCK")

    def collect(self) -> Iterable[Metric]:
        result: list[Metric] = []
        try:
            with open(os.path.join(self._self, "stat"), "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            times = os.times()  # no /proc at all: CPU time is still known
            result.append(CounterMetricFamily(
                "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                value=times.user + times.system))
        else:
            # fields[0] is the state, the 3rd field of /proc/PID/stat (proc(5))
            booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
            result += [
                GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                  value=float(fields[20])),
                GaugeMetricFamily("process_resident_memory_bytes",
                                  "Resident memory size in bytes.",
                                  value=float(fields[21]) * PAGE_BYTES),
                GaugeMetricFamily("process_start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.",
                                  value=booted + int(fields[19]) / self._ticks),
                CounterMetricFamily("process_cpu_seconds_total",
                                    "Total user and system CPU time spent in seconds.",
                                    value=(int(fields[11]) + int(fields[12])) / self._ticks),
            ]
        with contextlib.suppress(OSError):
            result.append(GaugeMetricFamily(
                "process_open_fds", "Number of open file descriptors.",
                value=float(len(os.listdir(os.path.join(self._self, "fd"))))))
        try:
            with open(os.path.join(self._self, "limits"), "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open files"):
                        soft = line.split()[3]
                        result.append(GaugeMetricFamily(
                            "process_max_fds", "Maximum number of open file descriptors.",
                            value=float("inf") if soft == b"unlimited" else float(soft)))
                        break
        except OSError:
            pass
        return result


if not MULTIPROCESS:  # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total
    REGISTRY.register(SelfProcessCollector())


def count_tasks() -> int:
    """Tasks alive in the running trio loop (all of them, from the root down)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None  # called from inside trio.run
    count, nurseries = 0, list(root.child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count + 1


def render() -> bytes:
    """The Prometheus text exposition of every voxd metric (of every worker, with several).
    Call it from the event loop (it counts the loop's tasks)."""
    sample_process()
    return generate_latest(_registry())


def sample_process() -> None:
    """Set this process's CPU, RSS and task count (each worker does it every second, so the
    sums over workers stay current whichever worker answers the scrape)."""
    times = os.times()
    PROCESS_CPU.set(times.user + times.system)
    with open("/proc/self/statm", "rb") as statm:
        PROCESS_RSS.set(int(statm.read().split()[1]) * PAGE_BYTES)
    TRIO_TASKS.set(count_tasks())


async def sample_process_forever() -> None:
    """With several workers: keep this worker's process figures current."""
    while True:
        sample_process()
        await trio.sleep(1.0)


def _registry() -> CollectorRegistry:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY

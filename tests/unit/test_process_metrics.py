"""process_* metrics come from /proc/self alone, so they survive the unit's ProcSubset=pid."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from voxd.observability import metrics
from voxd.observability.metrics import SelfProcessCollector

NAMES = {"process_virtual_memory_bytes", "process_resident_memory_bytes",
         "process_start_time_seconds", "process_cpu_seconds_total", "process_open_fds",
         "process_max_fds"}


@pytest.fixture
def pid_only_proc(tmp_path):
    """A /proc as `ProcSubset=pid` leaves it: this process's directory, no /proc/stat."""
    (tmp_path / "self").symlink_to(f"/proc/{os.getpid()}")
    return str(tmp_path)


def values(collector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {sample.name: sample.value
            for family in registry.collect() for sample in family.samples}


def test_prometheus_client_exports_nothing_without_proc_stat(pid_only_proc):
    # Why voxd has its own collector: this one goes silent, without an error.
    assert values(ProcessCollector(proc=pid_only_proc, registry=None)) == {}


def test_every_process_metric_without_proc_stat(pid_only_proc):
    got = values(SelfProcessCollector(pid_only_proc))
    assert set(got) == NAMES
    assert got["process_open_fds"] == len(os.listdir("/proc/self/fd"))  # each counts its own
    assert 0 < got["process_resident_memory_bytes"] < got["process_virtual_memory_bytes"]
    times = os.times()
    assert abs(got["process_cpu_seconds_total"] - (times.user + times.system)) < 0.1
    assert got["process_max_fds"] > 0


@pytest.mark.skipif(not os.access("/proc/stat", os.R_OK), reason="needs a full /proc to compare")
def test_same_figures_as_prometheus_client_where_it_works(pid_only_proc):
    ours = values(SelfProcessCollector(pid_only_proc))
    theirs = values(ProcessCollector(registry=None))
    assert set(theirs) == NAMES
    # /proc/stat's btime is whole seconds; the clocks give the same instant to the tick
    assert abs(ours["process_start_time_seconds"] - theirs["process_start_time_seconds"]) < 1.5
    assert ours["process_start_time_seconds"] <= time.time()
    assert ours["process_max_fds"] == theirs["process_max_fds"]


def test_without_proc_at_all_cpu_time_is_still_exported(tmp_path):
    assert set(values(SelfProcessCollector(str(tmp_path)))) == {"process_cpu_seconds_total"}


@pytest.mark.skipif(metrics.MULTIPROCESS, reason="process_* are exported with one worker only")
def test_metrics_page_has_them():
    text = generate_latest(metrics.REGISTRY).decode()
    for name in NAMES:
        assert f"\n{name} " in text

"""A fresh voxd's /metrics, as an operator's first scrape sees it (one worker and two): every
labelled series already at 0 and no `_created` samples; /healthz and /readyz are plain text."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.audio import silence
from voxd.config import load_settings
from voxd.observability import metrics
from voxd.observability.systemd import Notifier
from voxd.server import Server, bound_origin, open_listener
from voxd.sim.caller import TwilioSimulator


@contextlib.contextmanager
def fresh_voxd(tmp_path: Path, workers: int, extra: str = "") -> Iterator[str]:
    """`voxd serve` as its own process (the built-in echo assistant, or `extra`'s TOML
    tables), ready: its origin."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "voxd.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n'
                      f'public_url = "http://127.0.0.1:{port}"\nworkers = {workers}\n'
                      "[twilio]\nvalidate_signatures = false\nrest_call_control = false\n"
                      + extra)
    origin = f"http://127.0.0.1:{port}"
    daemon = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if daemon.poll() is not None:
                raise AssertionError(f"voxd serve exited ({daemon.returncode}): "
                                     f"{daemon.communicate()[1]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(origin + "/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "voxd serve not ready within 20 s"
            time.sleep(0.05)
        yield origin
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


LIMIT = 7
"""call.max_concurrent_calls of the fresh voxds here (each worker's)."""


def all_workers_serving(origin: str, workers: int) -> str:
    """/metrics once every worker is serving (/readyz 200 says only that one worker is)."""
    deadline = time.monotonic() + 20
    while True:
        response = httpx.get(origin + "/metrics", timeout=5)
        assert response.status_code == 200
        if samples(response.text).get(("voxd_workers", ())) == workers:
            return response.text
        assert time.monotonic() < deadline, f"voxd_workers not {workers} within 20 s"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_fresh_voxd_shows_every_labelled_series_at_zero(tmp_path, workers):
    with fresh_voxd(tmp_path, workers, f"[call]\nmax_concurrent_calls = {LIMIT}\n") as origin:
        found = samples(all_workers_serving(origin, workers))
    # readiness and capacity, added up over the workers
    assert found.get(("voxd_ready", ())) == workers
    assert found.get(("voxd_calls_max", ())) == workers * LIMIT
    assert found.get(("voxd_calls_started_total", ())) == 0.0
    # each worker count is the mode it claims: process_* come from the one process only
    assert (("process_cpu_seconds_total", ()) in found) == (workers == 1)
    created = sorted({name for name, _ in found if name.endswith("_created")})
    assert created == [], f"_created samples exported: {created}"
    absent = []
    for metric, label_sets in metrics.LABELS.items():
        suffix = "_count" if isinstance(metric, metrics.Histogram) else "_total"
        for labels in label_sets:
            key = (metric._name + suffix, tuple(sorted(labels.items())))
            if found.get(key) != 0.0:
                absent.append((key, found.get(key)))
    assert absent == [], f"labelled series not at 0 on a fresh voxd: {absent}"
    for name in ("voxd_turn_latency_seconds_count", "voxd_upstream_connect_seconds_count",
                 "voxd_calls_active", "voxd_recording_errors_total"):
        assert found.get((name, ())) == 0.0, name


async def test_health_and_readiness_are_plain_text(start_voxd):
    voxd = await start_voxd(call={"max_concurrent_calls": 1})

    async def get(path: str) -> tuple[int, str, str]:
        async with httpx.AsyncClient() as client:
            r = await client.get(voxd.origin + path)
        return r.status_code, r.headers["content-type"], r.text

    plain = "text/plain; charset=utf-8"
    assert await get("/healthz") == (200, plain, "ok\n")
    assert await get("/readyz") == (200, plain, "ready\n")
    voxd.runtime.call_started(object())  # one call in progress: at capacity
    assert await get("/readyz") == (503, plain, "at capacity\n")
    voxd.runtime.live.draining = True
    assert await get("/readyz") == (503, plain, "draining\n")
    assert await get("/healthz") == (200, plain, "ok\n")  # alive while draining


async def test_healthz_on_the_metrics_address_is_plain_text(start_voxd):
    from voxd.server import bound_origin, open_listener

    probe = open_listener("127.0.0.1:0")
    metrics_origin = bound_origin(probe)
    probe.close()
    await start_voxd(server={"metrics_listen": metrics_origin.removeprefix("http://")})
    async with httpx.AsyncClient() as client:
        r = await client.get(metrics_origin + "/healthz")
    assert (r.status_code, r.headers["content-type"], r.text) == (
        200, "text/plain; charset=utf-8", "ok\n")


def gauge(name: str) -> float | None:
    """A voxd metric's value in this (single-process) test process."""
    return metrics.REGISTRY.get_sample_value(name)


async def test_voxd_ready_follows_readyz_through_capacity_drain_and_reload(nursery, tmp_path):
    sock = open_listener("127.0.0.1:0")
    origin = bound_origin(sock)
    path = tmp_path / "voxd.toml"
    head = f'[server]\nlisten = "127.0.0.1:0"\npublic_url = "{origin}"\n' \
           "[twilio]\nvalidate_signatures = false\nrest_call_control = false\n"
    path.write_text(head + "[call]\nmax_concurrent_calls = 2\n")
    server = Server(load_settings(path, {}), sock, Notifier({}))
    nursery.start_soon(server.run, trio.Event())
    await trio.testing.wait_all_tasks_blocked()

    async def readyz() -> int:
        async with httpx.AsyncClient() as client:
            return (await client.get(origin + "/readyz")).status_code

    assert (gauge("voxd_ready"), gauge("voxd_calls_max"), gauge("voxd_workers")) == (1, 2, 1)
    first, second = object(), object()
    server.runtime.call_started(first)  # type: ignore[arg-type]
    assert gauge("voxd_ready") == 1 and await readyz() == 200
    server.runtime.call_started(second)  # type: ignore[arg-type]
    assert gauge("voxd_ready") == 0 and await readyz() == 503  # at capacity
    server.runtime.call_ended(second)  # type: ignore[arg-type]
    assert gauge("voxd_ready") == 1 and await readyz() == 200

    path.write_text(head + "[call]\nmax_concurrent_calls = 1\n")
    server.reload()  # the one call left now fills the new limit
    assert gauge("voxd_calls_max") == 1 and gauge("voxd_ready") == 0 and await readyz() == 503
    path.write_text(head + "[call]\nmax_concurrent_calls = 3\n")
    server.reload()
    assert gauge("voxd_calls_max") == 3 and gauge("voxd_ready") == 1

    async with trio.open_nursery() as draining:
        draining.start_soon(server.drain)  # waits for the call in progress
        await trio.testing.wait_all_tasks_blocked()
        assert server.live.draining and not server._stop.is_set()
        assert gauge("voxd_ready") == 0 and await readyz() == 503
        server.runtime.call_ended(first)  # type: ignore[arg-type]
    assert gauge("voxd_ready") == 0  # drained: still not taking calls
    await trio.testing.wait_all_tasks_blocked()
    assert gauge("voxd_workers") == 0  # stopped


async def test_calls_started_counts_each_phone_call_once(start_voxd):
    voxd = await start_voxd(signed=False)
    before = gauge("voxd_calls_started_total") or 0.0
    form = {"CallSid": "CA" + "2" * 32, "From": "+1", "To": "+2"}
    async with httpx.AsyncClient() as client:  # a webhook Twilio retried: no stream follows
        assert (await client.post(voxd.webhook, data=form)).status_code == 200
    assert gauge("voxd_calls_started_total") == before
    report = await TwilioSimulator(voxd.webhook).call(silence(0.5))
    assert report.closed_by == "caller"
    assert gauge("voxd_calls_started_total") == before + 1

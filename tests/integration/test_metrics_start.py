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
from prometheus_client.parser import text_string_to_metric_families

from voxd.observability import metrics


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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_fresh_voxd_shows_every_labelled_series_at_zero(tmp_path, workers):
    with fresh_voxd(tmp_path, workers) as origin:
        response = httpx.get(origin + "/metrics", timeout=5)
    assert response.status_code == 200
    found = samples(response.text)
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

"""The bridges bench/calls_per_core.py measures voxd against carry calls the way voxd does:
each frame comes back through them, so their CPU figures are for the same work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from voxd.sim.load import free_port, proc_sampler, run_load, start_echo, stop_processes

BENCH = Path(__file__).resolve().parents[2] / "bench"


def start(script: str) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    """An echo upstream and the bridge (their ports and processes, bridge last)."""
    echo_port, echo = start_echo()
    port = free_port()
    return [echo_port, port], [
        echo,
        subprocess.Popen([sys.executable, str(BENCH / script), "--port", str(port),
                          "--upstream", f"ws://127.0.0.1:{echo_port}/"]),
    ]


async def carry_calls(script: str) -> None:
    ports, processes = start(script)
    port = ports[-1]
    try:
        for listening in ports:  # until both listen
            for _ in range(100):
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", listening)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.1)
        report = await run_load(f"http://127.0.0.1:{port}/twilio/voice", 3, 5,
                                sampler=proc_sampler(processes[1].pid))
    finally:
        stop_processes(processes)
    assert report.errors == []
    assert report.sent == 3 * 250 and report.lost == 0
    assert report.cpu_cores is not None and report.cpu_cores > 0


async def test_the_trio_floor_bridge_carries_calls():
    await carry_calls("floor_bridge.py")


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None,
                    reason="the asyncio peer needs uvicorn: pip install -e '.[bench]'")
async def test_the_asyncio_peer_bridge_carries_calls():
    await carry_calls("peer_bridge.py")

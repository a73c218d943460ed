"""Stopping a `server.workers = 2` voxd: each worker drains exactly once however the stop
arrives (systemd's KillMode=mixed or control-group, a terminal's Ctrl-C), the exit code is 0
and nothing prints a traceback; a supervisor killed with SIGKILL leaves no worker serving."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tests.integration.audio import burst, silence
from tests.integration.test_cli import free_port, write_config
from tests.integration.test_operator_logs import wait_for
from voxd.sim.caller import TwilioSimulator
from voxd.sim.report import CallReport

DATA = Path(__file__).parents[2] / "voxd" / "data"
CALL_SECONDS = 3.0


def start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path, list[int]]:
    """A 2-worker voxd in a process group of its own (as a shell's foreground job is), once
    both workers are ready: the process, its port, its log and the workers' pids."""
    port = free_port()
    config = write_config(tmp_path / "voxd.toml", port,
                          "workers = 2\n[twilio]\nvalidate_signatures = false\n")
    log = tmp_path / "voxd.log"
    with log.open("w") as err:
        daemon = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", str(config)],
                                  stderr=err, stdout=subprocess.DEVNULL, start_new_session=True)
    text = wait_for(log, lambda t: "ready: 2 workers" in t or daemon.poll() is not None,
                    "the supervisor's ready line")
    assert "ready: 2 workers" in text, text
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", text)]
    assert len(pids) == 2, text
    return daemon, port, log, pids


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's parent may not reap it at once)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return re.search(r"^State:\s+Z", status, re.MULTILINE) is None


def stop(mode: str, daemon: subprocess.Popen[bytes], workers: list[int]) -> None:
    if mode == "mixed":  # KillMode=mixed (the units): SIGTERM to the main process only
        daemon.send_signal(signal.SIGTERM)
    elif mode == "control-group":  # systemd's default: SIGTERM to every process of the unit
        for pid in (daemon.pid, *workers):
            os.kill(pid, signal.SIGTERM)
    else:  # a terminal's Ctrl-C: SIGINT to the foreground process group
        os.killpg(daemon.pid, signal.SIGINT)


@pytest.mark.parametrize("mode", ["mixed", "control-group", "ctrl-c"])
def test_a_stop_drains_a_live_call_once_and_exits_0(tmp_path, mode):
    daemon, port, log, workers = start(tmp_path)
    try:
        assert all(os.getpgid(pid) != daemon.pid for pid in workers)  # sessions of their own

        async def call_and_stop() -> CallReport:
            reports: list[CallReport] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:

                    async def one() -> None:
                        caller = np.concatenate([burst(0.4), silence(CALL_SECONDS - 0.4)])
                        simulator = TwilioSimulator(f"http://127.0.0.1:{port}/twilio/voice")
                        reports.append(await simulator.call(caller))

                    nursery.start_soon(one)
                    await trio.to_thread.run_sync(wait_for, log, lambda t: "call started:" in t,
                                                  "the call's start")
                    stop(mode, daemon, workers)
            return reports[0]

        report = trio.run(call_and_stop)
        code = daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text and "stopping now" not in text, text
    assert report.errors == [] and report.closed_by == "caller", (report.render(), text)
    assert "reason=caller-hangup" in text, text  # it ended on its own, not by the stop
    assert text.count("draining: ") == 2, text  # each worker drained, once
    assert re.findall(r"worker \d stopped \((.*)\)", text) == ["exit 0", "exit 0"], text
    assert "all 2 workers stopped" in text, text
    # With control-group the workers had systemd's SIGTERM; the supervisor did not add its own.
    assert ("got the signal directly" in text) == (mode == "control-group"), text


def test_a_killed_supervisor_leaves_no_worker_serving_the_port(tmp_path):
    daemon, port, log, workers = start(tmp_path)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in workers if alive(pid)]
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert left == [], text
    assert text.count("the supervisor (voxd serve) is gone: draining") == 2, text
    assert "Traceback" not in text, text
    with socket.socket() as again:  # the port is free for the next voxd
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


@pytest.mark.parametrize("unit", ["voxd.service", "voxd@.service"])
def test_the_units_stop_the_supervisor_alone(unit):
    # KillMode=mixed: SIGTERM to the main process only, which passes one to each worker (a
    # worker given two stops at once); the final SIGKILL still reaches every process.
    lines = (DATA / unit).read_text().splitlines()
    assert [line for line in lines if line.startswith("KillMode=")] == ["KillMode=mixed"]

"""`server.workers = 2`: two worker processes on one socket, one systemd face, summed metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import trio

from tests.integration.audio import burst, silence
from tests.integration.test_cli import free_port, write_config
from voxd.sim.caller import TwilioSimulator


def test_two_workers_serve_calls_and_drain_together(tmp_path):
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path / "voxd.toml", port,
                          "workers = 2\n[twilio]\nvalidate_signatures = false\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def collect() -> None:  # read continuously, as systemd does (a datagram queue is short)
        while not done.is_set():
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the test
                return

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    daemon = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", str(config)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not messages and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.05)
        if not messages:  # say why (it once did not start within the deadline in a full run)
            daemon.kill()
            raise AssertionError(f"no READY=1 (exit {daemon.poll()}): {daemon.communicate()[1]}")
        assert messages[0] == "READY=1\nSTATUS=ready, 0 active calls (2 workers)"  # after both

        async def calls() -> list:
            reports = []

            async def one(i: int) -> None:
                caller = np.concatenate([burst(0.4, seed=i), silence(1.2)])
                reports.append(await TwilioSimulator(origin + "/twilio/voice").call(caller))

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
            return reports

        reports = trio.run(calls)
        assert all(r.errors == [] and r.turns()[0].latency is not None for r in reports)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the workers write their counts at call end
            text = httpx.get(origin + "/metrics").text
            if 'voxd_calls_total{outcome="completed"} 6.0' in text:
                break
            time.sleep(0.1)
        assert 'voxd_calls_total{outcome="completed"} 6.0' in text  # summed over workers
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        stderr = daemon.stderr.read()
        assert daemon.returncode == 0, stderr
        assert stderr.count("listening on") == 2  # two workers, one socket
        assert stderr.count("draining:") == 2  # each drained its own calls
        time.sleep(0.3)
        done.set()
        reader.join()
        assert "WATCHDOG=1" in messages
        assert any(m.startswith("STATUS=ready, 6 active calls") for m in messages)
        assert messages[-1] == "STOPPING=1\nSTATUS=stopped"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()


def test_with_two_workers_every_goodbye_hangs_up_whichever_worker_gets_the_action():
    """Without REST, the stream's worker leaves `<Hangup/>` for Twilio's action request, which
    the shared socket hands to either worker: each of 8 calls must get it (a worker answering
    from its own memory only would give about half of them the fallback apology)."""
    from tests.fakes.ws_assistant import FakeAssistant
    from voxd.sim.load import VoxdProcess

    async def main() -> list:
        async with trio.open_nursery() as nursery:
            assistant = FakeAssistant(loopback=False, end_after=0.4)
            url = await nursery.start(assistant.serve)
            daemon = VoxdProcess({"server": {"workers": 2},
                                  "twilio": {"validate_signatures": False},
                                  "assistant": {"provider": "websocket", "audio": "mulaw"},
                                  "websocket": {"url": url}}, quiet=True)
            try:
                await daemon.ready()
                reports: list = []

                async def one() -> None:
                    simulator = TwilioSimulator(daemon.webhook_url)
                    reports.append(await simulator.call(silence(0.2), 3))

                async with trio.open_nursery() as calls:
                    for _ in range(8):
                        calls.start_soon(one)
                return reports
            finally:
                daemon.stop()
                nursery.cancel_scope.cancel()

    reports = trio.run(main)
    assert len(reports) == 8
    assert [r.next_twiml for r in reports] == ["<Hangup/>"] * 8, \
        [r.render() for r in reports if r.next_twiml != "<Hangup/>"][:1]

"""voxd as a service: systemd notify and watchdog, drain on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import trio
import trio.testing

from tests.integration.audio import burst, silence
from tests.integration.test_cli import free_port, write_config, write_wav
from tests.integration.waiting import call_streaming, wait_until, wait_until_sync
from voxd.config import load_settings
from voxd.observability.systemd import Notifier
from voxd.server import Server, bound_origin, open_listener
from voxd.sim.caller import TwilioSimulator

FORM = {"CallSid": "CA" + "1" * 32, "From": "+1", "To": "+2"}


def test_notifier_speaks_the_sd_notify_protocol(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        notifier.ready("ready, 0 active calls")
        notifier.stopping("draining, 2 active calls")
        assert listener.recv(4096) == b"READY=1\nSTATUS=ready, 0 active calls"
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=draining, 2 active calls"
    assert notifier.watchdog_interval == 1.5
    assert Notifier({}).enabled is False  # not under systemd: every call is a no-op
    Notifier({}).ready("x")
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None  # the watchdog is someone else's


@pytest.fixture
def server(nursery, tmp_path):
    """`await server(config_text)` -> (Server, origin), from a config file like the daemon."""
    async def start(text: str = "") -> tuple[Server, str]:
        sock = open_listener("127.0.0.1:0")
        origin = bound_origin(sock)
        path = tmp_path / "voxd.toml"
        path.write_text(f'[server]\nlisten = "127.0.0.1:0"\npublic_url = "{origin}"\n'
                        f'[twilio]\nvalidate_signatures = false\n{text}')
        instance = Server(load_settings(path, {}), sock, Notifier({}))
        nursery.start_soon(instance.run, trio.Event())
        await trio.testing.wait_all_tasks_blocked()
        return instance, origin

    return start


async def test_drain_lets_live_calls_finish_and_turns_new_ones_away(server, caplog):
    caplog.set_level(logging.INFO)
    instance, origin = await server()
    result = {}

    async def call() -> None:
        caller = np.concatenate([burst(0.5), silence(1.5)])
        result["report"] = await TwilioSimulator(origin + "/twilio/voice").call(caller)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await wait_until(call_streaming(lambda: instance.live.sessions), 5,
                         "the call streams caller audio")
        nursery.start_soon(instance.drain)
        await wait_until(lambda: instance.live.draining, 2, "the drain begins")
        async with httpx.AsyncClient() as client:
            ready = await client.get(origin + "/readyz")
            webhook = await client.post(origin + "/twilio/voice", data=FORM)
        assert ready.status_code == 503 and ready.text.startswith("draining")
        assert [v.tag for v in ET.fromstring(webhook.text)] == ["Say"]  # no Stream
    report = result["report"]
    assert report.closed_by == "caller" and report.turns()[0].latency is not None
    assert any("reason=caller-hangup" in r.getMessage() for r in caplog.records)


async def test_drain_timeout_ends_calls_cleanly(server, caplog):
    caplog.set_level(logging.INFO)
    instance, origin = await server("[drain]\ntimeout_seconds = 0.5\n")
    result = {}

    async def call() -> None:
        result["report"] = await TwilioSimulator(origin + "/twilio/voice").call(silence(5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await wait_until(call_streaming(lambda: instance.live.sessions), 5,
                         "the call streams caller audio")
        with trio.fail_after(3):
            await instance.drain()
    report = result["report"]
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert any("reason=drain-timeout" in r.getMessage() for r in caplog.records)


async def test_reload_applies_to_new_calls_and_refuses_bad_files(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    instance, origin = await server('[call]\nfallback_twiml = "<Say>one</Say>"\n')
    path = tmp_path / "voxd.toml"

    async def fallback() -> str:  # what a call that ended in a failure hears next
        async with httpx.AsyncClient() as client:
            body = (await client.post(origin + "/twilio/stream-ended", data=FORM)).text
        return ET.fromstring(body).find("Say").text

    assert await fallback() == "one"
    path.write_text(path.read_text().replace("<Say>one</Say>", "<Say>two</Say>"))
    instance.reload()
    assert await fallback() == "two"
    path.write_text(path.read_text() + "\n[nonsense]\n")
    instance.reload()
    assert await fallback() == "two"  # the running config stays
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("reload refused" in e and "nonsense: unknown key" in e for e in errors)


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET, read all along by a thread (a datagram queue holds only
    /proc/sys/net/unix/max_dgram_qlen messages, often 10: left unread during a call, the
    watchdog pings fill it and voxd's later messages are dropped)."""

    def __init__(self, path: str) -> None:
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue

    def saw(self, text: str) -> bool:
        return any(text in message for message in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def test_a_call_survives_sighup_and_finishes_during_a_sigterm_drain(tmp_path):
    """The operator's view: `voxd serve` under signals, a call placed by `voxd call`."""
    port = free_port()
    config = write_config(tmp_path / "voxd.toml", port,
                          "[twilio]\nvalidate_signatures = false\n")
    notify_path = str(tmp_path / "notify")
    notify = NotifyListener(notify_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    daemon = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", str(config)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_sync(lambda: notify.messages, 10, "voxd notifies systemd",
                        seen=lambda: daemon.poll())
        assert notify.messages[0].startswith("READY=1\nSTATUS=ready, 0 active calls")
        wav = tmp_path / "caller.wav"
        write_wav(wav, np.concatenate([burst(0.6), silence(1.8)]))
        call = subprocess.Popen([sys.executable, "-m", "voxd", "call",
                                 f"http://127.0.0.1:{port}/twilio/voice", "--wav", str(wav)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items()
                                     if k != "VOXD_TWILIO_AUTH_TOKEN"})
        wait_until_sync(lambda: notify.saw("STATUS=ready, 1 active call"), 20,
                        "voxd reports the call active", seen=lambda: notify.messages[-5:])
        daemon.send_signal(signal.SIGHUP)
        daemon.send_signal(signal.SIGTERM)
        out, err = call.communicate(timeout=20)
        assert call.returncode == 0, err
        assert "ended by caller" in out and "no reply" not in out
        daemon.wait(timeout=15)
        assert daemon.returncode == 0
        wait_until_sync(lambda: notify.saw("STOPPING=1\nSTATUS=stopped"), 2,
                        "voxd's last notification, STOPPING=1 stopped",
                        seen=lambda: notify.messages[-5:])
        joined = "\n".join(notify.messages)
        assert "WATCHDOG=1" in joined
        assert "STOPPING=1\nSTATUS=draining, 1 active call" in joined
        stderr = daemon.stderr.read()
        assert "reloaded" in stderr and "reason=caller-hangup" in stderr
        assert "cannot notify systemd" not in stderr  # nothing was dropped
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()


def test_sigterm_ends_the_process_within_the_drain_timeout_whatever_peers_do(tmp_path):
    """SIGTERM with a call whose Twilio side stopped reading, a client dribbling a request
    body, and an idle half-open connection: the process exits within the drain timeout plus a
    few seconds (every shield has a deadline), with each call's summary line."""
    port = free_port()
    config = tmp_path / "voxd.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n'
                      f'public_url = "http://127.0.0.1:{port}"\nhandshake_timeout = 30\n'
                      "[twilio]\nvalidate_signatures = false\n"
                      "[call]\nstream_token = false\nsend_timeout = 60\nmedia_timeout = 60\n"
                      "[drain]\ntimeout_seconds = 1\n")
    daemon = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", str(config)],
                              stderr=subprocess.PIPE, text=True)
    peers: list[socket.socket] = []
    try:
        wait_until_sync(lambda: accepts(port), 15, f"voxd accepts connections on {port}",
                        seen=lambda: daemon.poll())
        # A media stream that starts, then never reads nor sends again.
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        for message in ('{"event":"connected","protocol":"Call","version":"1.0.0"}',
                        START):
            stalled.sendall(masked_text(message))
        # A webhook whose body never finishes, and a connection that never says anything.
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nx")
        idle = socket.create_connection(("127.0.0.1", port))
        peers += [stalled, slow, idle]
        def all_in() -> bool:  # the call started; its connection, the two others and /metrics's
            now = gauges(port)
            return now.get("voxd_calls_active") == 1 and now.get("voxd_connections_open", 0) >= 4

        wait_until_sync(all_in, 10, "the stalled call started and every peer's connection is open",
                        seen=lambda: gauges(port))
        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=1 + 5)
        assert time.monotonic() - began < 1 + 5
        stderr = daemon.stderr.read()
        assert "Traceback" not in stderr
        assert stderr.count("call ended:") == 1 and "reason=drain-timeout" in stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for peer in peers:
            peer.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def gauges(port: int) -> dict[str, float]:
    """voxd's unlabelled gauges, read from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("voxd_") and "{" not in name and value:
            values[name] = float(value)
    return values


START = ('{"event":"start","sequenceNumber":"1","streamSid":"MZ' + "1" * 32 + '","start":{'
         '"accountSid":"AC' + "1" * 32 + '","callSid":"CA' + "1" * 32 + '","streamSid":"MZ'
         + "1" * 32 + '","tracks":["inbound"],"customParameters":{},"mediaFormat":{"encoding":'
         '"audio/x-mulaw","sampleRate":8000,"channels":1}}}')


def masked_text(text: str) -> bytes:
    """One client-to-server WebSocket text frame (masked, as a client must)."""
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    length = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126
                              else bytes([0x80 | 126]) + length.to_bytes(2, "big"))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

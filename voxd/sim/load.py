"""`voxd loadtest`: many concurrent simulated calls, paced in real time like Twilio.

Each call POSTs the voice webhook (signed when a token is given), follows the TwiML to the
media stream, streams speech-like audio in 20 ms frames and echoes marks back at once. Against
an upstream that echoes audio (the `echo-upstream` process this module can start), every frame
a call sends comes back: the load test counts what is lost and times each frame's round trip.
voxd's own CPU and memory come from its /metrics (`voxd_process_*`, summed over workers).

Without a webhook URL the load test starts its own echo upstream and `voxd serve` (each in its
own process, so neither's cost is counted as the other's) and stops them at the end.

This module places and paces the calls; `rig` starts and measures the processes,
`load_report` holds the figures, `speech` makes the caller's audio and `messages` builds what
Twilio sends.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Awaitable, Callable

import httpx
import trio
from twilio.request_validator import RequestValidator

from voxd.errors import VoxdError
from voxd.net.websocket import ConnectionClosed, HandshakeError, WebSocket, connect
from voxd.sim import messages
from voxd.sim.load_report import TURN_HOLD_MS, CallResult, LoadReport
from voxd.sim.rig import (
    DaemonSample,
    LoadTestError,
    Processes,
    Sampler,
    VoxdProcess,
    free_port,
    proc_sampler,
    process_cpu_seconds,
    process_tree,
    sample_daemon,
    start_echo,
    start_vendor_echo,
    stop_processes,
)
from voxd.sim.speech import speech_frames, speech_ulaw
from voxd.sim.twiml import parse_twiml

__all__ = [  # moved to the modules by job (the benchmarks import them from here)
    "TURN_HOLD_MS", "CallResult", "DaemonSample", "LoadReport", "LoadTestError", "Processes",
    "Sampler", "VoxdProcess", "free_port", "proc_sampler", "process_cpu_seconds",
    "process_tree", "speech_frames", "speech_ulaw", "start_echo", "start_vendor_echo",
    "stop_processes",
]

FRAME = 0.020
SETTLE_SECONDS = 0.3
"""After its last frame a call waits this long for the echoes still on their way, then hangs
up (so a frame not back by then counts as lost)."""


class LoadCall:
    """One simulated call (webhook, stream, paced frames, marks echoed)."""

    def __init__(self, webhook_url: str, frames: list[bytes], auth_token: str | None) -> None:
        self.webhook_url = webhook_url
        self.payloads = [base64.b64encode(f).decode() for f in frames]
        self.account_sid = "AC" + "0" * 32
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.call_sid = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.result = CallResult()
        self.live = False
        self.closed = trio.Event()
        """voxd closed the stream."""

    def _sign(self, url: str, params: dict[str, str]) -> dict[str, str]:
        if self.validator is None:
            return {}
        return {"X-Twilio-Signature": self.validator.compute_signature(url, params)}

    async def run(self, client: httpx.AsyncClient) -> None:
        try:
            await self._run(client)
        except (ConnectionClosed, HandshakeError, OSError, httpx.HTTPError, VoxdError) as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.live = False

    async def _run(self, client: httpx.AsyncClient) -> None:
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid, "From": "+15005550006",
                "To": "+15005550001", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
                "Direction": "inbound"}
        response = await client.post(self.webhook_url, data=form,
                                     headers=self._sign(self.webhook_url, form))
        if response.status_code != 200:
            raise LoadTestError(f"webhook answered HTTP {response.status_code}")
        stream = parse_twiml(response.text)
        ws = await connect(stream.url, list(self._sign(stream.url, {}).items()))
        try:
            sid = self.stream_sid
            await ws.send(messages.encode(messages.connected()))
            await ws.send(messages.encode(messages.start(sid, self.call_sid, self.account_sid,
                                                         stream.parameters)))
            self.live = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, ws)
                await self._send_frames(ws)
                await trio.sleep(SETTLE_SECONDS)
                await ws.send(messages.encode(messages.stop(sid, self.call_sid,
                                                            self.account_sid)))
                stopped = trio.current_time()
                with trio.move_on_after(5):
                    await self.closed.wait()
                if self.closed.is_set():
                    self.result.teardown = trio.current_time() - stopped
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1):
                await ws.close()

    async def _send_frames(self, ws: WebSocket) -> None:
        media = messages.MediaFrames(self.stream_sid)
        sent_at = self.result.sent_at
        start = trio.current_time()
        for i, payload in enumerate(self.payloads):
            await trio.sleep_until(start + (i + 1) * FRAME)
            sent_at.append(trio.current_time())
            await ws.send(media.frame(i, payload))

    async def _receive(self, ws: WebSocket) -> None:
        received_at = self.result.received_at
        try:
            while True:
                message = await ws.receive()
                if '"media"' in message[:20]:
                    received_at.append(trio.current_time())
                elif '"mark"' in message[:20]:
                    mark = json.loads(message)
                    name = mark["mark"]["name"]
                    if found := re.search(r"latency_ms=(\d+)", name):
                        self.result.voxd_latencies.append(int(found.group(1)) / 1000)
                    await ws.send(messages.encode(messages.mark(self.stream_sid, name)))
        except ConnectionClosed:
            self.closed.set()


async def place_calls(calls: list[LoadCall], concurrency: int) -> None:
    """Run `calls`, at most `concurrency` at a time (soaks: many short calls in a row)."""
    limit = trio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
        for call in calls:
            await limit.acquire()

            async def one(call: LoadCall = call) -> None:
                try:
                    await call.run(client)
                finally:
                    limit.release()

            nursery.start_soon(one)


async def run_load(webhook_url: str, calls: int, seconds: float, *,
                   auth_token: str | None = None, ramp_seconds: float | None = None,
                   progress: Callable[[str], None] | None = None,
                   sampler: Sampler | None = None, turns: bool = False) -> LoadReport:
    """Place `calls` concurrent calls of `seconds` each (started evenly over `ramp_seconds`)
    and measure them, and the bridge (voxd's /metrics, or `sampler`) over the window when all
    of them are up."""
    origin = webhook_url.split("/twilio/")[0]
    metrics_url = origin + "/metrics"
    ramp = ramp_seconds if ramp_seconds is not None else min(5.0, calls * 0.05)
    if seconds < ramp + 4:
        raise LoadTestError(f"--seconds must be at least {ramp + 4:.0f} (the {ramp:.0f}s ramp "
                            "plus a steady window)")
    frames = speech_frames(seconds)
    load = [LoadCall(webhook_url, frames, auth_token) for _ in range(calls)]
    report = LoadReport(calls, seconds, [c.result for c in load], turns=turns)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        def default_sampler() -> Awaitable[DaemonSample | None]:
            return sample_daemon(client, metrics_url)

        sample_bridge = sampler or default_sampler
        idle = await sample_bridge()
        report.idle_rss = idle.rss_bytes if idle else None
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                steady_from = started + ramp + 1.0
                steady_to = started + ramp + seconds - 1.0
                first = last = None
                while trio.current_time() < started + ramp + seconds + 2:
                    await trio.sleep(1.0)
                    now = trio.current_time()
                    sample = await sample_bridge()
                    if sample is not None and steady_from <= now <= steady_to:
                        first = first or sample
                        last = sample
                    if progress is not None:
                        up = sum(c.live for c in load)
                        got = sum(len(c.result.received_at) for c in load)
                        sent = sum(len(c.result.sent_at) for c in load)
                        cpu = ""
                        if first is not None and last is not None and last.at > first.at:
                            cores = (last.cpu_seconds - first.cpu_seconds) / (last.at - first.at)
                            cpu = f", voxd {cores * 100:.0f}% of a core"
                        progress(f"[{now - started:5.1f}s] {up}/{calls} calls up, frames "
                                 f"sent {sent} back {got}, failed "
                                 f"{sum(bool(c.result.error) for c in load)}{cpu}")
                if first is not None and last is not None and last.at > first.at:
                    report.cpu_cores = ((last.cpu_seconds - first.cpu_seconds)
                                        / (last.at - first.at))
                    if idle is not None:
                        report.rss_per_call = (last.rss_bytes - idle.rss_bytes) / calls

            nursery.start_soon(watch)
            for i, call in enumerate(load):
                nursery.start_soon(call.run, client)
                await trio.sleep_until(started + ramp * (i + 1) / calls)
    return report

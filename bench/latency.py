"""Latency through voxd: added delay per direction, barge-in reaction, turn latency added.

Run: .venv/bin/python bench/latency.py            (about 2 minutes; prints tables)

voxd runs as its own process (`voxd serve`); the Twilio side and the assistant (fakes from
tests/fakes) run in this process, on one clock, so every figure is a difference of two times
taken here:
- added delay: a Twilio-side client sends real-time 20 ms frames; the assistant plays every
  frame straight back. Inbound = frame sent by "Twilio" -> received by the assistant; outbound
  = sent by the assistant -> received by "Twilio". Frames are matched by order (none may be
  lost: the lost count is printed).
- barge-in reaction: (local VAD) an assistant speaks; the caller starts talking at a known time
  -> `clear` received. (provider) the assistant sends its interruption message -> `clear`.
- turn latency added: voxd's own per-turn figure (from its marks) minus the assistant's own
  share (last voiced caller frame received -> first reply frame sent, measured in the fake).
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.vapi import FakeVapi, VapiScript  # noqa: E402
from tests.fakes.ws_assistant import FakeAssistant  # noqa: E402
from voxd.sim.load import VoxdProcess, process_cpu_seconds, speech_ulaw  # noqa: E402

FRAME = 0.020
SILENCE = b"\xff" * 160


def frames_of(ulaw: bytes) -> list[bytes]:
    ulaw += SILENCE[: (-len(ulaw)) % 160]
    return [ulaw[i:i + 160] for i in range(0, len(ulaw), 160)]


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) * 1000 if values else float("nan")


# -- voxd in its own process ------------------------------------------------------------------


def daemon(sections: dict[str, dict[str, object]], env: dict[str, str]) -> VoxdProcess:
    """`voxd serve` in its own process: unsigned, no stream tokens, warnings only."""
    return VoxdProcess({"twilio": {"validate_signatures": False},
                        "logging": {"level": "warning"}, **sections,
                        "call": {"stream_token": False, **sections.get("call", {})}},
                       env, quiet=True)


# -- a lean Twilio side that timestamps everything ------------------------------------------


@dataclass
class TwilioSide:
    """One call from Twilio's side: paced frames out, media/clear/marks in, all timestamped."""

    origin: str
    caller: list[bytes]
    call_sid: str = field(default_factory=lambda: "CA" + secrets.token_hex(16))
    sent_at: list[float] = field(default_factory=list)
    media_at: list[float] = field(default_factory=list)
    clear_at: list[float] = field(default_factory=list)
    voxd_latency: list[float] = field(default_factory=list)
    t0: float = 0.0

    async def run(self) -> None:
        form = {"CallSid": self.call_sid, "AccountSid": "AC" + "0" * 32, "From": "+1",
                "To": "+2", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
                "Direction": "inbound"}
        async with httpx.AsyncClient() as client:
            await client.post(self.origin + "/twilio/voice", data=form)
        sid = "MZ" + secrets.token_hex(16)
        url = self.origin.replace("http", "ws") + "/media-stream"
        async with trio_websocket.open_websocket_url(url, message_queue_size=256) as ws:
            await ws.send_message('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            await ws.send_message(json.dumps({"event": "start", "streamSid": sid, "start": {
                "streamSid": sid, "callSid": self.call_sid, "accountSid": "AC",
                "tracks": ["inbound"], "customParameters": {"from": "+1", "to": "+2"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                "channels": 1}}}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, ws, sid)
                self.t0 = trio.current_time()
                for i, frame in enumerate(self.caller):
                    await trio.sleep_until(self.t0 + (i + 1) * FRAME)  # once captured
                    payload = base64.b64encode(frame).decode()
                    self.sent_at.append(trio.current_time())
                    await ws.send_message(
                        f'{{"event":"media","streamSid":"{sid}","media":{{"track":"inbound",'
                        f'"chunk":"{i + 1}","timestamp":"{i * 20}","payload":"{payload}"}}}}')
                await ws.send_message(f'{{"event":"stop","streamSid":"{sid}"}}')
                nursery.cancel_scope.cancel()

    async def _receive(self, ws: trio_websocket.WebSocketConnection, sid: str) -> None:
        while True:
            message = json.loads(await ws.get_message())
            now = trio.current_time()
            if message["event"] == "media":
                self.media_at.append(now)
            elif message["event"] == "clear":
                self.clear_at.append(now)
            elif message["event"] == "mark":
                name = message["mark"]["name"]
                if name.startswith("voxd:turn="):
                    self.voxd_latency.append(int(name.rsplit("=", 1)[1]) / 1000)
                await ws.send_message(json.dumps(message))  # echo at once: nothing queued


async def place_calls(sections: dict[str, dict[str, object]], env: dict[str, str],
                      callers: list[list[bytes]], gap: float) -> list[TwilioSide]:
    """Start voxd with `sections`, place one call per caller `gap` seconds apart, stop it."""
    voxd = daemon(sections, env)
    try:
        await voxd.ready()
        sides = [TwilioSide(voxd.origin, caller) for caller in callers]
        async with trio.open_nursery() as nursery:
            for side in sides:
                nursery.start_soon(side.run)
                await trio.sleep(gap)
    finally:
        voxd.stop()
    return sides


# -- the three measurements ------------------------------------------------------------------


class TimedLoopback(FakeAssistant):
    """The loopback fake, timestamping each frame it receives (and so sends back)."""

    def __init__(self) -> None:
        super().__init__(loopback=True)
        self.times: dict[str, list[float]] = {}
        self.lost_shape = 0

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        start = json.loads(await ws.get_message())
        times = self.times.setdefault(start["callSid"], [])
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    times.append(trio.current_time())
                    await ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass


async def added_delay(audio: str, calls: int) -> tuple[list[float], list[float], int]:
    fake = TimedLoopback()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        voxd = daemon({"assistant": {"provider": "websocket", "audio": audio},
                       "websocket": {"url": fake.url}, "barge_in": {"local_vad": False}}, {})
        try:
            await voxd.ready()
            sides = [TwilioSide(voxd.origin, frames_of(speech_ulaw(8.0, i, pauses=False)))
                     for i in range(calls)]
            cpu = CpuMeter(voxd.proc.pid)
            async with trio.open_nursery() as calls_nursery:
                for side in sides:
                    calls_nursery.start_soon(side.run)
                    await trio.sleep(0.04)  # calls arrive one after another, as they do
                await trio.sleep(2.0)
                cpu.start()  # steady state: every call up and streaming
                await trio.sleep(3.0)
                cpu.stop()
        finally:
            voxd.stop()
        nursery.cancel_scope.cancel()
    LOAD[(audio, calls)] = cpu
    inbound: list[float] = []
    outbound: list[float] = []
    lost = 0
    for side in sides:
        at_assistant = fake.times.get(side.call_sid, [])
        # The last frames are still in flight when the caller hangs up: count loss up to
        # 0.5 s before the end only.
        settled = len(side.sent_at) - 25
        lost += max(0, settled - len(at_assistant)) + max(0, settled - len(side.media_at))
        n = min(len(side.sent_at), len(at_assistant), len(side.media_at))
        skip = 50  # the first second is call set-up, not the steady state
        inbound += [at_assistant[i] - side.sent_at[i] for i in range(skip, n)]
        outbound += [side.media_at[i] - at_assistant[i] for i in range(skip, n)]
    return inbound, outbound, lost


class CpuMeter:
    """CPU used by voxd's process and by this one (the Twilio side and the assistant)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.voxd = self.bench = 0.0

    def start(self) -> None:
        self._t = time.monotonic()
        self._v = process_cpu_seconds(self.pid)
        self._b = time.process_time()

    def stop(self) -> None:
        wall = time.monotonic() - self._t
        self.voxd = (process_cpu_seconds(self.pid) - self._v) / wall
        self.bench = (time.process_time() - self._b) / wall


LOAD: dict[tuple[str, int], CpuMeter] = {}


async def barge_in_reaction(source: str, calls: int = 20) -> list[float]:
    """Speech start (or the provider's interruption) -> clear received."""
    reply = speech_ulaw(3.0, 99, pauses=False)
    talk_at = 1.2
    fake = FakeAssistant(loopback=False, reply=reply, reply_at=0.3,
                         interrupt_after=talk_at if source == "provider" else None)
    sent_interrupt: dict[str, float] = {}
    if source == "provider":

        async def timed_later(ws, delay, message):  # timestamp the interruption we send
            await trio.sleep(delay)
            sent_interrupt[id(ws)] = trio.current_time()
            await ws.send_message(json.dumps(message))

        fake._later = timed_later  # type: ignore[method-assign]
    local = source == "vad"
    caller = frames_of(SILENCE * int(talk_at / FRAME) + speech_ulaw(0.8, 5, pauses=False)
                       + SILENCE * 50) if local else [SILENCE] * 150
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        sides = await place_calls(
            {"assistant": {"provider": "websocket", "audio": "mulaw"},
             "websocket": {"url": fake.url}, "barge_in": {"local_vad": local}}, {},
            [list(caller) for _ in range(calls)], gap=0.05)
        nursery.cancel_scope.cancel()
    if local:
        return [s.clear_at[0] - (s.t0 + talk_at) for s in sides if s.clear_at]
    # provider: match each call's interruption time (one per connection, same order)
    starts = sorted(sent_interrupt.values())
    clears = sorted(s.clear_at[0] for s in sides if s.clear_at)
    return [c - s for s, c in zip(starts, clears, strict=False)]


async def turn_latency_added(audio: str, calls: int = 10) -> tuple[list[float], list[float]]:
    fake = FakeVapi(VapiScript(response_delay=0.2))
    caller = frames_of(speech_ulaw(0.8, 7, pauses=False) + SILENCE * 100)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        sides = await place_calls(
            {"assistant": {"provider": "vapi", "audio": audio},
             "vapi": {"base_url": fake.base_url, "assistant_id": "a"}},
            {"VAPI_API_KEY": "vapi-test-key"}, [list(caller) for _ in range(calls)], gap=0.1)
        nursery.cancel_scope.cancel()
    # (a) voxd's own figure minus the assistant's share: its VAD hangover (300 ms) plus the
    #     scripted delay, counted from the last voiced frame's arrival;
    # (b) VAD-independent: how long the assistant's last voiced frame spent getting to it,
    #     plus how long the first reply frame spent getting to the caller.
    own = 0.3 + 0.2
    measured = [lat - own for s in sides for lat in s.voxd_latency]
    end_to_end = []
    for side, call in zip(sides, fake.calls.values(), strict=True):
        if not call.turn_ends or not call.reply_started:
            continue
        last = call.turn_ends[0]
        inbound = call.frame_arrivals[last] - side.sent_at[last]
        first_heard = next(t for t in side.media_at if t >= call.reply_started[0])
        end_to_end.append(inbound + first_heard - call.reply_started[0])
    return measured, end_to_end


async def main() -> None:
    print("added delay through voxd, per 20 ms frame (ms); CPU in cores (1.0 = one core)")
    print(f"{'mode':8}{'calls':>6}{'in p50':>9}{'in p99':>9}{'out p50':>9}{'out p99':>9}"
          f"{'lost':>6}{'voxd cpu':>10}{'bench cpu':>11}")
    for audio in ("pcm16", "mulaw"):
        for calls in (1, 50):
            inbound, outbound, lost = await added_delay(audio, calls)
            load = LOAD[(audio, calls)]
            print(f"{audio:8}{calls:6d}{pct(inbound, 50):9.2f}{pct(inbound, 99):9.2f}"
                  f"{pct(outbound, 50):9.2f}{pct(outbound, 99):9.2f}{lost:6d}"
                  f"{load.voxd:10.2f}{load.bench:11.2f}")
    print()
    print("barge-in reaction (ms)")
    print(f"{'source':34}{'calls':>6}{'p50':>8}{'p95':>8}{'max':>8}")
    for source, what in (("vad", "local VAD: speech start -> clear"),
                         ("provider", "provider event -> clear")):
        values = await barge_in_reaction(source)
        print(f"{what:34}{len(values):6d}{pct(values, 50):8.1f}{pct(values, 95):8.1f}"
              f"{max(values) * 1000:8.1f}")
    print()
    print("turn latency added by voxd (ms): (a) voxd's own per-turn figure minus the assistant's")
    print("scripted share; (b) last voiced frame's trip to the assistant + first reply frame's")
    print("trip to the caller")
    print(f"{'mode':8}{'turns':>6}{'(a) p50':>9}{'(a) p95':>9}{'(b) p50':>9}{'(b) p95':>9}")
    for audio in ("pcm16", "mulaw"):
        measured, end_to_end = await turn_latency_added(audio)
        print(f"{audio:8}{len(measured):6d}{pct(measured, 50):9.1f}{pct(measured, 95):9.1f}"
              f"{pct(end_to_end, 50):9.1f}{pct(end_to_end, 95):9.1f}")


if __name__ == "__main__":
    started = time.monotonic()
    trio.run(main)
    print(f"\n(took {time.monotonic() - started:.0f} s)")

"""Playback: fixed 160-byte frames to Twilio, and an exact idea of what is still queued there."""

from __future__ import annotations

import json

from voxd.call.playback import Playback
from voxd.twilio.protocol import MediaStream

START = json.dumps({"event": "start", "streamSid": "MZ1",
                    "start": {"streamSid": "MZ1", "callSid": "CA1"}})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Playback, list[dict], Clock]:
    stream = MediaStream()
    stream.receive(START)
    sent: list[dict] = []
    clock = Clock()

    async def send(text: str) -> None:
        sent.append(json.loads(text))

    return Playback(send, stream, clock), sent, clock


async def test_audio_is_recut_into_twenty_ms_frames():
    playback, sent, _ = make()
    assert await playback.play(b"\x01" * 100) == 0  # held until a whole frame is there
    assert await playback.play(b"\x02" * 300) == 2
    await playback.flush()
    import base64

    payloads = [base64.b64decode(m["media"]["payload"]) for m in sent]
    assert [len(p) for p in payloads] == [160, 160, 160]
    assert b"".join(payloads) == b"\x01" * 100 + b"\x02" * 300 + b"\xff" * 80


async def test_queued_time_follows_real_time_and_clear_drops_it():
    playback, sent, clock = make()
    await playback.play(b"\x00" * 160 * 50)  # one second of audio
    assert playback.playing and abs(playback.queued_seconds - 1.0) < 1e-9
    clock.now += 0.4
    assert abs(playback.queued_seconds - 0.6) < 1e-9
    dropped = await playback.interrupt()
    assert abs(dropped - 0.6) < 1e-9
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    assert not playback.playing
    assert await playback.interrupt() == 0.0 and playback.clears_sent == 1  # nothing new sent


async def test_a_burst_after_silence_starts_from_now():
    playback, _, clock = make()
    await playback.play(b"\x00" * 160)
    first = playback.first_frame_at
    clock.now += 5
    await playback.play(b"\x00" * 160)
    assert playback.first_frame_at == first + 5
    assert abs(playback.queued_seconds - 0.02) < 1e-9

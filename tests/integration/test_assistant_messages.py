"""Assistant messages and the two message limits: the assistant's socket takes a whole
utterance in one message (assistant.max_message_bytes, 1 MiB by default), Twilio's keeps its
own, smaller limit (call.max_message_bytes); a message over the assistant's limit ends that
call alone, with a line naming the setting."""

from __future__ import annotations

import logging

import numpy as np
import trio

from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import ulaw_decode
from voxd.audio.transcode import OutboundTranscoder
from voxd.sim.caller import TwilioSimulator

OVERSIZED_FROM = "+15005550100"


def utterance_pcm16(seconds: float) -> bytes:
    """Speech-like pcm16 at 16 kHz (noise with a syllable envelope: no two stretches alike)."""
    rng = np.random.default_rng(5)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    x = np.convolve(rng.standard_normal(n), np.hanning(15) / 7.5, mode="same")
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
    return (x / np.max(np.abs(x)) * 12000).astype("<i2").tobytes()


def summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]


async def test_a_30_s_utterance_in_one_message_plays_with_the_defaults(start_voxd, nursery,
                                                                        caplog):
    caplog.set_level(logging.INFO)
    reply = utterance_pcm16(30.0)  # 960000 bytes: 15 times Twilio's 64 KiB limit
    fake = FakeAssistant(loopback=False, reply=reply, reply_at=0.3, reply_in_one_message=True)
    await nursery.start(fake.serve)
    voxd = await start_voxd(assistant={"provider": "websocket", "audio": "pcm16"},
                            websocket={"url": fake.url})  # every limit at its default
    assert voxd.runtime.settings.config.call.max_message_bytes < len(reply)
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(silence(3.0))
    with trio.fail_after(2):
        await voxd.runtime.wait_idle()
    (summary,) = summaries(caplog)
    assert "reason=caller-hangup" in summary  # not upstream-error
    assert report.closed_by == "caller"
    # The caller heard the utterance from its start, in real time (the call lasted 3 s):
    # what voxd sent is the utterance's first seconds, transcoded.
    heard = ulaw_decode(np.frombuffer(bytes(report.received_audio), np.uint8))
    assert len(heard) >= 2.0 * 8000
    expected = ulaw_decode(np.frombuffer(OutboundTranscoder().process(reply), np.uint8))
    lag, correlation = best_alignment(heard[:8000], expected[:16000])
    assert correlation > 0.95 and lag < 80  # the start of the utterance, nothing lost before
    assert snr_db(expected[:len(heard)], heard) > 25


async def test_a_message_over_the_assistants_limit_ends_only_that_call(start_voxd, nursery,
                                                                        caplog):
    caplog.set_level(logging.INFO)
    limit = 64 * 1024
    fake = FakeAssistant(reply=bytes(limit + 1), reply_at=0.5, reply_in_one_message=True,
                         reply_if=lambda start: start["from"] == OVERSIZED_FROM)
    await nursery.start(fake.serve)
    voxd = await start_voxd(assistant={"provider": "websocket", "audio": "mulaw",
                                       "max_message_bytes": limit},
                            websocket={"url": fake.url}, barge_in={"local_vad": False})
    caller = np.concatenate([burst(1.0, seed=3), silence(1.0)])
    reports = {}

    async def call(from_number: str) -> None:
        sim = TwilioSimulator(voxd.webhook, auth_token=voxd.token, from_number=from_number)
        reports[from_number] = await sim.call(caller)

    async with trio.open_nursery() as calls:
        calls.start_soon(call, OVERSIZED_FROM)
        calls.start_soon(call, "+15005550006")
    with trio.fail_after(2):
        await voxd.runtime.wait_idle()
    oversized, other = reports[OVERSIZED_FROM], reports["+15005550006"]
    assert oversized.closed_by == "voxd"  # ended at the big message (0.5 s in), the caller
    assert other.closed_by == "caller"    # on the same assistant server went on to the end
    said = ulaw_decode(np.frombuffer(b"".join(other.caller_frames), np.uint8))[800:7200]
    heard = ulaw_decode(np.frombuffer(bytes(other.received_audio), np.uint8))
    assert best_alignment(said, heard)[1] > 0.99  # its loopback audio all came back
    assert sorted(s.rsplit("reason=", 1)[1] for s in summaries(caplog)) == [
        "caller-hangup", "upstream-error"]
    failures = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR and "size limit" in r.getMessage()]
    assert len(failures) == 1
    assert "assistant.max_message_bytes" in failures[0] and str(limit) in failures[0]

"""`assistant.provider = "websocket"`: a self-hosted assistant behind a plain WebSocket."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import trio

from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import ulaw_decode
from voxd.sim.caller import TwilioSimulator


@pytest.fixture
def ws_voxd(start_voxd, nursery):
    async def start(fake: FakeAssistant, audio: str = "mulaw", **sections):
        # The fake plays the caller straight back, talking while the caller talks: voxd's own
        # barge-in would rightly cut it off, so these transport tests turn it off.
        sections.setdefault("barge_in", {"local_vad": False})
        await nursery.start(fake.serve)
        voxd = await start_voxd(
            secrets={"websocket_auth": "Bearer sekrit"},
            assistant={"provider": "websocket", "audio": audio},
            websocket={"url": fake.url, "headers": {"X-Tenant": "acme"}}, **sections)
        return voxd

    return start


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_audio_goes_both_ways_in_the_configured_format(ws_voxd, audio):
    fake = FakeAssistant()
    voxd = await ws_voxd(fake, audio=audio)
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(
        np.concatenate([burst(0.8, seed=11), silence(0.6)]))
    said = pcm(report.caller_frames)[800:5600]
    # What voxd sent, in order (report.heard_frames would also show a late frame under CPU
    # load as a gap in the simulated playout, which is not what this test is about).
    heard = pcm([bytes(report.received_audio)])
    lag, correlation = best_alignment(said, heard)
    assert correlation > 0.95
    if audio == "mulaw":
        assert np.array_equal(heard[lag:lag + len(said)], said)
        assert bytes(fake.audio_in) == b"".join(report.caller_frames)
    else:
        assert snr_db(said, heard[lag:lag + len(said)]) > 25
    assert fake.start == {"type": "start", "callSid": report.call_sid,
                          "streamSid": report.stream_sid, "from": "+15005550006",
                          "to": "+15005550001",
                          "parameters": {"from": "+15005550006", "to": "+15005550001"},
                          "audio": audio}
    assert fake.headers["authorization"] == "Bearer sekrit"
    assert fake.headers["x-tenant"] == "acme"
    with trio.fail_after(1):
        await fake.closed.wait()
    assert fake.control_in == [{"type": "end"}]  # told when the caller hung up


async def test_the_assistant_can_end_the_call(ws_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await ws_voxd(FakeAssistant(end_after=0.5))
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(burst(0.2),
                                                                             seconds=3)
    assert report.closed_by == "voxd"
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    assert any("reason=assistant-ended:assistant:done" in r.getMessage()
               for r in caplog.records)


async def test_the_assistant_can_interrupt_its_own_audio(ws_voxd):
    voxd = await ws_voxd(FakeAssistant(interrupt_after=0.6))
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(burst(1.5),
                                                                             seconds=2)
    assert report.clears == 1


async def test_a_refused_connection_gives_the_fallback(ws_voxd, caplog):
    voxd = await ws_voxd(FakeAssistant(refuse_with=403))
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(burst(0.3),
                                                                             seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert any("the assistant refused the WebSocket (HTTP 403)" in r.getMessage()
               for r in caplog.records)
    assert "sekrit" not in caplog.text

"""voxd with `assistant.provider = "elevenlabs"` against a fake ElevenLabs that follows the
documented protocol (tests/fakes/elevenlabs.py): whole calls through the simulator in both
audio modes and with agent formats that need converting, the agent's interruptions, its client
tools, the keypad, and the ways a conversation fails."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import trio

from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.script import Script
from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import pcm16_to_ulaw, ulaw_decode
from voxd.providers import elevenlabs as elevenlabs_module
from voxd.sim.caller import CallReport, TwilioSimulator

TRANSFER = {"default": "support", "announce": "Connecting you now.",
            "to": {"sales": "+14155550100", "support": "sip:desk@pbx.example.com"}}


@pytest.fixture
def el_voxd(start_voxd, nursery):
    """`await el_voxd(fake, audio=..., **sections)` -> voxd talking to `fake`."""

    async def start(fake: FakeElevenLabs, audio: str = "mulaw", key: str | None = None,
                    **sections: Any):
        # The fake's echo talks while the caller talks: voxd's own barge-in would rightly cut
        # it off, so these tests leave barge-in to the agent's `interruption`.
        sections.setdefault("barge_in", {"local_vad": False})
        await nursery.start(fake.serve)
        elevenlabs = {**fake.sections()["elevenlabs"], **sections.pop("elevenlabs", {})}
        secrets = {"elevenlabs_api_key": key if key is not None else fake.api_key}
        return await start_voxd(secrets=secrets,
                                assistant={"provider": "elevenlabs", "audio": audio},
                                elevenlabs=elevenlabs, **sections)

    return start


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


async def place_call(voxd, caller: np.ndarray, seconds: float | None = None,
                     dtmf: list[tuple[str, float]] | None = None) -> CallReport:
    return await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(
        caller, seconds, dtmf=dtmf or [])


async def summary(voxd, caplog) -> str:
    with trio.fail_after(3):
        await voxd.runtime.wait_idle()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(lines) == 1, lines
    return lines[0]


def caller_audio_at_the_fake(fake: FakeElevenLabs) -> np.ndarray:
    """What the fake received, as 8 kHz samples (to compare with what the caller said)."""
    data = bytes(fake.audio_in)
    if fake.input_format == "ulaw_8000":
        return ulaw_decode(np.frombuffer(data, np.uint8))
    return np.frombuffer(data, "<i2")[::2]  # pcm_16000: every other sample


@pytest.mark.parametrize("audio", ["mulaw", "pcm16"])
async def test_a_call_talks_to_the_agent(el_voxd, caplog, audio):
    caplog.set_level(logging.INFO)
    elevenlabs_module._conversions_logged.clear()  # said once per process: say it here
    fake = FakeElevenLabs(ping_interval=0.3)
    fake.audio_format = audio  # the agent set to voxd's format: no conversion in the adapter
    voxd = await el_voxd(fake, audio, elevenlabs={
        "conversation_config_override": {"agent": {"first_message": "Hi {{caller_number}}"}}})
    report = await place_call(voxd, np.concatenate([burst(0.8, seed=11), silence(0.8)]))
    assert report.errors == [] and report.closed_by == "caller"

    said = pcm(report.caller_frames)[800:5600]
    heard = pcm([bytes(report.received_audio)])  # the agent's echo, as voxd sent it
    lag, correlation = best_alignment(said, heard)
    assert correlation > 0.95
    if audio == "mulaw":  # bytes untouched both ways
        assert np.array_equal(heard[lag:lag + len(said)], said)
        assert bytes(fake.audio_in) == b"".join(report.caller_frames)
    else:
        assert snr_db(said, heard[lag:lag + len(said)]) > 25
        assert len(fake.audio_in) == 4 * len(b"".join(report.caller_frames))

    assert fake.initiation == {
        "type": "conversation_initiation_client_data",
        "dynamic_variables": {"call_sid": report.call_sid, "caller_number": "+15005550006",
                              "called_number": "+15005550001"},
        "conversation_config_override": {"agent": {"first_message": "Hi {{caller_number}}"}}}
    assert fake.path == f"/v1/convai/conversation?agent_id={fake.agent_id}"
    # every ping answered with its pong, in order
    assert fake.pings_sent >= 2 and fake.pongs[:fake.pings_sent - 1] == \
        list(range(1, fake.pings_sent))
    with trio.fail_after(1):
        await fake.closed.wait()
    assert "reason=caller-hangup" in await summary(voxd, caplog)
    if audio == "mulaw":
        assert "ElevenLabs audio passes through untouched" in caplog.text
    assert fake.api_key not in caplog.text


@pytest.mark.parametrize("audio, agent_in, agent_out", [
    ("mulaw", "pcm_16000", "pcm_16000"),  # ElevenLabs' default agent, voxd in mu-law
    ("pcm16", "ulaw_8000", "ulaw_8000"),
    ("mulaw", "ulaw_8000", "pcm_24000"),
])
async def test_agent_formats_unlike_voxds_are_converted(el_voxd, caplog, audio, agent_in,
                                                        agent_out):
    caplog.set_level(logging.INFO)
    elevenlabs_module._conversions_logged.clear()
    fake = FakeElevenLabs(input_format=agent_in, output_format=agent_out)
    voxd = await el_voxd(fake, audio)
    report = await place_call(voxd, np.concatenate([burst(0.8, seed=5), silence(0.8)]))
    assert report.closed_by == "caller"
    said = pcm(report.caller_frames)[800:5600]
    _, correlation = best_alignment(said, caller_audio_at_the_fake(fake))
    assert correlation > 0.9  # the caller's audio reached the agent in its format
    _, correlation = best_alignment(said, pcm([bytes(report.received_audio)]))
    assert correlation > 0.9  # and the agent's came back in voxd's
    [line] = [r.getMessage() for r in caplog.records if "ElevenLabs audio:" in r.getMessage()]
    assert "set the agent's input and output audio formats to ulaw_8000" in line


async def test_a_private_agent_is_reached_through_a_signed_url(el_voxd, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeElevenLabs(signed=True, script=Script(fail_first=1))
    voxd = await el_voxd(fake)
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(0.8)]))
    assert report.closed_by == "caller" and len(report.received_audio) > 0
    assert [r["xi-api-key"] for r in fake.signed_url_requests] == [fake.api_key] * 2
    assert all(r["agent_id"] == fake.agent_id for r in fake.signed_url_requests)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1 and "HTTP 503" in retries[0]
    assert "conversation_signature" in fake.path
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("voxd"))
    assert "conversation_signature" not in logged and fake.api_key not in caplog.text


async def test_a_bad_api_key_ends_the_call_with_one_clear_line_and_the_fallback(el_voxd,
                                                                                caplog):
    fake = FakeElevenLabs(signed=True)
    voxd = await el_voxd(fake, key="wrong-key")
    report = await place_call(voxd, burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert len(fake.signed_url_requests) == 1  # no retries for a bad key
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e for e in errors if "ElevenLabs rejected the API key (HTTP 401" in e
            and "ELEVENLABS_API_KEY" in e], errors
    assert "wrong-key" not in caplog.text


async def test_a_refused_upgrade_ends_the_call_with_the_fallback(el_voxd, caplog):
    fake = FakeElevenLabs(script=Script(refuse_with=403))
    voxd = await el_voxd(fake)
    report = await place_call(voxd, burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert any("ElevenLabs refused the WebSocket (HTTP 403)" in r.getMessage()
               for r in caplog.records)
    assert fake.api_key not in caplog.text


async def test_the_agents_interruption_clears_playback_and_its_late_audio(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    words = (np.sin(np.arange(12000) / 6) * 9000).astype(np.int16)  # 1.5 s at 8 kHz
    fake = FakeElevenLabs(script=Script(echo=False, reply=pcm16_to_ulaw(words.tobytes()),
                                        reply_at=0.3, interrupt_at=0.9))
    voxd = await el_voxd(fake)
    report = await place_call(voxd, silence(0.1), seconds=2.5)
    assert report.clears >= 1
    clear_at = next(t for t, what in report.events if what.startswith("clear"))
    heard = pcm(report.heard_frames)
    after = heard[int((clear_at + 0.04) * 8000):]
    assert np.max(np.abs(after), initial=0) < 200  # the late audio event was dropped
    assert fake.audio_events_sent > 10 and fake.interrupted_event_id is not None
    line = await summary(voxd, caplog)
    assert "barge_ins=1" in line
    assert "assistant_first_audio_p50=" in line  # timed from the caller's transcript


async def test_transfer_to_a_configured_name(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    tool = (0.4, "transfer_call", {"destination": "sales", "announce": "One moment."})
    fake = FakeElevenLabs(script=Script(echo=False, tool_calls=[tool]))
    voxd = await el_voxd(fake, transfer=TRANSFER)
    report = await place_call(voxd, burst(0.3), seconds=5)
    assert report.closed_by == "voxd" and report.transferred_to == "+14155550100"
    assert "reason=transferred:sales" in await summary(voxd, caplog)


async def test_a_refused_transfer_is_the_tools_error_and_the_call_goes_on(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    tool = (0.4, "transfer_call", {"destination": "+19005550199"})
    fake = FakeElevenLabs(script=Script(echo=False, tool_calls=[tool]))
    voxd = await el_voxd(fake, transfer=TRANSFER)
    report = await place_call(voxd, burst(0.3), seconds=2)
    assert report.closed_by == "caller" and not report.transferred_to
    assert "reason=caller-hangup" in await summary(voxd, caplog)
    assert "tool_1" in fake.tool_errors
    assert "not a destination in [transfer.to]" in fake.tool_results["tool_1"]


async def test_the_agent_presses_keys(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeElevenLabs(script=Script(echo=False, tool_calls=[
        (0.3, "send_dtmf", {"digits": "1w23*#"}), (0.5, "book_flight", {})]))
    voxd = await el_voxd(fake, "pcm16")
    report = await place_call(voxd, silence(0.1), seconds=3)
    assert report.tones_heard == "123*#", report.render()
    assert set(fake.tool_results) == {"tool_1", "tool_2"}
    assert fake.tool_errors == {"tool_2"}  # not one of voxd's tools: answered, as an error
    await summary(voxd, caplog)


async def test_the_agents_end_call_tool_hangs_up(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeElevenLabs(script=Script(echo=False, tool_calls=[(0.4, "end_call", {})]))
    voxd = await el_voxd(fake)
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and report.next_twiml == "<Hangup/>"
    assert "reason=assistant-ended:elevenlabs:end-call-tool" in await summary(voxd, caplog)
    assert "tool_1" in fake.tool_results and not fake.tool_errors


async def test_elevenlabs_ending_the_conversation_hangs_up(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeElevenLabs(script=Script(echo=False, end_at=0.5))
    voxd = await el_voxd(fake)
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and report.next_twiml == "<Hangup/>"
    assert "reason=assistant-ended:elevenlabs:closed" in await summary(voxd, caplog)


async def test_keys_the_caller_presses_reach_the_agent_and_no_log(el_voxd, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeElevenLabs(script=Script(echo=False))
    voxd = await el_voxd(fake, keypad={"collect": True})
    presses = [(key, 0.4 + 0.15 * i) for i, key in enumerate("4711#")]
    report = await place_call(voxd, silence(0.1), seconds=2.0, dtmf=presses)
    assert report.keys_pressed == "4711#"
    await summary(voxd, caplog)
    assert {"type": "user_message", "text": "The caller pressed 4 7 1 1 # on the keypad."} \
        in fake.control_in
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("voxd."))
    assert "4711" not in logged and "4 7 1 1" not in logged


async def test_a_dropped_socket_ends_the_call(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await el_voxd(FakeElevenLabs(script=Script(drop_after=0.5)))
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert "reason=upstream-error" in await summary(voxd, caplog)
    assert any("ElevenLabs connection closed (no close frame)" in r.getMessage()
               for r in caplog.records)


async def test_a_silent_agent_is_declared_dead_by_the_keepalive(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeElevenLabs(script=Script(silent_after=0.3))
    voxd = await el_voxd(fake, call={"keepalive_interval": 0.3, "keepalive_timeout": 0.3})
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    assert "reason=upstream-keepalive-timeout" in await summary(voxd, caplog)


async def test_garbage_is_logged_a_little_and_skipped(el_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await el_voxd(FakeElevenLabs(script=Script(garbage_at=0.2)))
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(0.8)]))
    assert report.closed_by == "caller" and len(report.received_audio) > 0
    warnings = [r.getMessage() for r in caplog.records if "(ignored)" in r.getMessage()]
    assert len(warnings) == 1 and "not JSON" in warnings[0]


async def test_an_override_the_agent_refuses_ends_the_call_with_its_reason(el_voxd, caplog):
    """ElevenLabs closes with 1008 naming what it refused; the reason reaches the log."""
    fake = FakeElevenLabs()
    override = {"agent": {"prompt": {"llm": "gpt-4o"}}}
    voxd = await el_voxd(fake, elevenlabs={"conversation_config_override": override})
    report = await place_call(voxd, burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>")
    assert any("ElevenLabs connection closed (code 1008: Override for field "
               "'agent.prompt.llm' is not allowed" in r.getMessage()
               for r in caplog.records), caplog.text

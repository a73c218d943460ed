"""voxd with `assistant.provider = "openai"` against a fake OpenAI Realtime server that follows
the documented protocol: whole calls through the simulated Twilio, in both audio modes, the
barge-in and its truncate, the call-control tools, the keypad, and the failures."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import trio

from tests.fakes.openai import API_KEY, FakeOpenAI
from tests.fakes.script import Script
from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import pcm16_to_ulaw, ulaw_decode
from voxd.sim.caller import CallReport, TwilioSimulator
from voxd.sim.rest import SimulatedRest

TRANSFER = {"default": "support", "announce": "Connecting you now.",
            "to": {"sales": "+14155550100", "support": "sip:desk@pbx.example.com"}}
TONE_8K = (np.sin(np.arange(2 * 8000) * 2 * np.pi * 300 / 8000) * 6000).astype("<i2")
"""2 s of a 300 Hz tone at about -18 dBFS."""


def reply_in(audio: str) -> bytes:
    """The 2 s tone in voxd's format for `audio` (what Script.reply takes)."""
    if audio == "mulaw":
        return pcm16_to_ulaw(TONE_8K.tobytes())
    return np.repeat(TONE_8K, 2).astype("<i2").tobytes()  # crude 16 kHz: fine for a tone


class OpenAILine:
    """One voxd in front of one fake OpenAI (and, with `rest`, the simulated REST API)."""

    def __init__(self, voxd: Any, fake: FakeOpenAI, rest: SimulatedRest | None) -> None:
        self.voxd, self.fake, self.rest = voxd, fake, rest

    async def call(self, caller: np.ndarray, seconds: float | None = None,
                   dtmf: list[tuple[str, float]] | None = None) -> CallReport:
        simulator = TwilioSimulator(self.voxd.webhook, auth_token=self.voxd.token,
                                    rest=self.rest)
        return await simulator.call(caller, seconds, dtmf=dtmf or [])

    async def summary(self, caplog: pytest.LogCaptureFixture) -> str:
        with trio.fail_after(3):
            await self.voxd.runtime.wait_idle()
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("call ended")]
        assert len(lines) == 1, lines
        return lines[0]

    def told(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.fake.control_in if m.get("type") == kind]


@pytest.fixture
def openai_line(start_voxd, nursery):
    """`await openai_line(script, audio=..., rest=False, fake_options={}, **sections)`."""

    async def start(script: Script | None = None, *, audio: str = "mulaw", rest: bool = False,
                    key: str | None = None, fake_options: dict[str, Any] | None = None,
                    **sections: Any) -> OpenAILine:
        fake = FakeOpenAI(script, **(fake_options or {}))
        await nursery.start(fake.serve)
        simulated = None
        if rest:
            simulated = SimulatedRest()
            await nursery.start(simulated.serve)
            sections["twilio"] = {"rest_call_control": True, "api_base_url": simulated.base_url}
        sections.setdefault("transfer", TRANSFER)
        openai = {**fake.sections()["openai"], **sections.pop("openai", {})}
        secrets = {"openai_api_key": key} if key is not None else fake.secrets
        voxd = await start_voxd(secrets=secrets, assistant={"provider": "openai", "audio": audio},
                                openai=openai, **sections)
        if simulated is not None:
            simulated.auth_token = voxd.token
        return OpenAILine(voxd, fake, simulated)

    return start


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


def fractional_snr_db(reference: np.ndarray, heard: np.ndarray) -> float:
    """SNR of `heard` against `reference` (same rate) at their best alignment, to a tenth of
    a sample: resampling 16 <-> 24 kHz delays audio by fractions of a sample."""
    lag, _ = best_alignment(reference, heard)
    pad = 64
    start = max(lag - pad, 0)
    segment = heard[start:start + len(reference) + 2 * pad].astype(np.float64)
    spectrum = np.fft.rfft(segment)
    freqs = np.fft.rfftfreq(len(segment))
    best = -np.inf
    for fraction in np.linspace(-0.5, 0.5, 11):
        shifted = np.fft.irfft(spectrum * np.exp(2j * np.pi * freqs * fraction), len(segment))
        offset = lag - start
        part = shifted[offset:offset + len(reference)]
        best = max(best, snr_db(reference[pad:-pad], part[pad:-pad]))
    return best


@pytest.mark.parametrize("audio", ["mulaw", "pcm16"])
async def test_a_call_talks_to_openai(openai_line, audio, caplog):
    caplog.set_level(logging.DEBUG)
    # (voxd's own barge-in off: the caller talks over the echo of its own words)
    line = await openai_line(Script(echo=True), audio=audio, barge_in={"local_vad": False})
    fake = line.fake
    utterance = burst(0.6, seed=3)
    report = await line.call(np.concatenate([silence(0.2), utterance, silence(1.0)]))
    assert report.errors == [] and report.closed_by == "caller"
    assert fake.problems == []
    # connected as OpenAI documents: the model in the query, the key as a Bearer token
    assert fake.query["model"] == ["gpt-realtime"]
    assert fake.headers["authorization"] == f"Bearer {API_KEY}"
    session = fake.control_in[0]["session"]
    expected = {"type": "audio/pcmu"} if audio == "mulaw" else \
        {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["format"] == expected == \
        session["audio"]["output"]["format"]
    assert session["type"] == "realtime" and session["audio"]["output"]["voice"] == "alloy"
    assert {t["name"] for t in session["tools"]} == {"transfer_call", "send_dtmf", "end_call"}
    assert fake.control_in[1] == {"type": "response.create"}  # the greeting
    # the caller's audio reached OpenAI intact
    said = pcm(report.caller_frames)
    if audio == "mulaw":
        assert bytes(fake.audio_in) == b"".join(report.caller_frames)  # untouched bytes
    else:
        assert fake.audio_format == "pcm16"
        assert len(fake.audio_in_vendor) == 6 * len(report.caller_frames) * 160  # 24 kHz
        at_8k = np.frombuffer(bytes(fake.audio_in), "<i2")[::2]  # band-limited: exact
        part = said[1600:1600 + 4800]
        _, correlation = best_alignment(part, at_8k)
        assert correlation > 0.95
        assert fractional_snr_db(part, at_8k) > 25
    # and the caller heard OpenAI's audio (its echo) intact
    heard = pcm([bytes(report.received_audio)])
    part = said[1600:1600 + 4800]
    lag, correlation = best_alignment(part, heard)
    assert correlation > 0.95
    if audio == "mulaw":
        assert np.array_equal(heard[lag:lag + len(part)], part)
    else:
        assert fractional_snr_db(part, heard) > 25
    with trio.fail_after(2):
        await fake.closed.wait()
    assert "reason=caller-hangup" in await line.summary(caplog)
    assert API_KEY not in caplog.text


@pytest.mark.parametrize("audio", ["mulaw", "pcm16"])
async def test_openai_hearing_the_caller_clears_playback_and_truncates_the_item(
        openai_line, audio, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, reply=reply_in(audio), reply_at=0.3,
                                    interrupt_at=1.0), audio=audio)
    report = await line.call(silence(2.6))
    assert report.clears >= 1
    clear_at = next(t for t, what in report.events if what.startswith("clear"))
    heard = pcm(report.heard_frames)
    window = heard[int((clear_at + 0.06) * 8000):]
    assert np.max(np.abs(window), initial=0) < 200  # nothing of the reply after the clear
    # OpenAI was told how much of its reply the caller heard: about 0.7 s of the 2 s it sent
    assert line.fake.rejected_truncates == [] and line.fake.problems == []
    assert line.fake.heard, line.fake.control_in
    assert 400 <= line.fake.heard[-1] <= 900, line.fake.heard
    summary = await line.summary(caplog)
    assert "barge_ins=1" in summary


async def test_voxd_hearing_the_caller_first_cancels_and_truncates_what_was_heard(
        openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, reply=reply_in("mulaw"), reply_at=0.5))
    # the reply plays from ~0.5 s; the caller talks over it from 1.0 s (OpenAI's fake does not
    # notice: voxd's own VAD does)
    report = await line.call(np.concatenate([silence(1.0), burst(0.6, seed=21), silence(1.2)]))
    assert report.clears == 1
    fake = line.fake
    assert line.told("response.cancel") == [{"type": "response.cancel"}]
    [truncated] = line.told("conversation.item.truncate")
    assert fake.rejected_truncates == [] and truncated["content_index"] == 0
    [heard_ms] = fake.heard
    assert 300 <= heard_ms <= 800, heard_ms  # heard ~0.5 s of it, as voxd's playback says
    assert any("barge-in (vad)" in r.getMessage() for r in caplog.records)


async def test_stage_latency_and_transcripts_reach_the_summary(openai_line, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=True, interrupt_at=0.5),
                             recording={"enabled": True, "directory": str(tmp_path),
                                        "format": "wav"})
    await line.call(np.concatenate([burst(0.4), silence(1.4)]))
    fake = line.fake
    assert fake.control_in[0]["session"]["audio"]["input"]["transcription"] == {
        "model": "gpt-4o-mini-transcribe"}
    summary = await line.summary(caplog)
    assert "assistant_transcript_p50=" in summary and "assistant_total_p50=" in summary


async def test_transfer_tool_dials_the_named_destination_and_answers_the_call(
        openai_line, caplog):
    caplog.set_level(logging.INFO)
    script = Script(echo=False, tool_calls=[(0.4, "transfer_call",
                                             {"destination": "sales", "announce": "One moment."})])
    line = await openai_line(script, rest=True)
    report = await line.call(burst(0.3), seconds=5)
    assert report.closed_by == "rest" and report.transferred_to == "+14155550100"
    assert "reason=transferred:sales" in await line.summary(caplog)
    with trio.fail_after(2):
        await line.fake.closed.wait()
    assert list(line.fake.tool_results.values()) == ["Transferred to sales."]


async def test_a_refused_transfer_is_the_tools_answer_and_the_model_goes_on(
        openai_line, caplog):
    caplog.set_level(logging.INFO)
    script = Script(echo=False, tool_calls=[(0.4, "transfer_call",
                                             {"destination": "+19005550199"})])
    line = await openai_line(script, rest=True)
    report = await line.call(burst(0.3), seconds=2.0)
    assert report.closed_by == "caller" and not report.transferred_to
    assert "reason=caller-hangup" in await line.summary(caplog)
    [answer] = line.fake.tool_results.values()
    assert "was not made: not a destination in [transfer.to]" in answer
    kinds = [m["type"] for m in line.fake.control_in]
    answered = kinds.index("conversation.item.create")
    assert kinds[answered + 1] == "response.create"  # the model tells the caller


async def test_dtmf_tool_presses_the_keys(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, tool_calls=[(0.3, "send_dtmf",
                                                             {"digits": "1w2#"})]))
    report = await line.call(silence(0.1), seconds=2.5)
    assert report.tones_heard == "12#", report.render()
    await line.summary(caplog)
    assert list(line.fake.tool_results.values()) == ["Pressed 1 w 2 # on the phone line."]


async def test_end_call_tool_hangs_up_after_answering_it(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, end_at=0.5))
    report = await line.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and report.next_twiml == "<Hangup/>"
    assert "reason=assistant-ended:openai:end-call-tool" in await line.summary(caplog)
    assert list(line.fake.tool_results.values()) == ["The call is ending."]
    assert line.told("response.create") == [{"type": "response.create"}]  # the greeting only


async def test_a_tool_voxd_does_not_run_gets_an_error_answer(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, tool_calls=[(0.3, "weather", {"city": "x"})]))
    report = await line.call(silence(1.2))
    assert report.closed_by == "caller"
    await line.summary(caplog)
    [answer] = line.fake.tool_results.values()
    assert answer.startswith("Error: the tool weather is not available")


async def test_keys_the_caller_presses_reach_openai(openai_line, caplog):
    caplog.set_level(logging.DEBUG)
    line = await openai_line(Script(echo=False), keypad={"collect": True})
    presses = [(key, 0.4 + 0.15 * i) for i, key in enumerate("4711#")]
    report = await line.call(silence(0.1), seconds=2.0, dtmf=presses)
    assert report.keys_pressed == "4711#"
    await line.summary(caplog)
    kinds = [m["type"] for m in line.fake.control_in]
    [entry] = line.told("conversation.item.create")
    assert entry["item"] == {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "The caller pressed 4 7 1 1 # on the keypad."}]}
    assert kinds[kinds.index("conversation.item.create") + 1] == "response.create"
    assert line.fake.problems == []


async def test_keys_pressed_while_openai_speaks_are_answered_after_its_response(
        openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=False, reply=reply_in("mulaw"), reply_at=0.3),
                             barge_in={"local_vad": False})
    report = await line.call(silence(3.0), dtmf=[("5", 0.8)])
    assert report.keys_pressed == "5"
    await line.summary(caplog)
    kinds = [m["type"] for m in line.fake.control_in]
    assert kinds[kinds.index("conversation.item.create") + 1] == "response.create"
    assert line.fake.problems == []  # not refused: asked for once the reply was done
    assert line.fake.responses_requested == 2  # the greeting, and the answer to the key


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "OpenAI" in r.getMessage()]


async def test_a_bad_key_refused_at_the_upgrade_gives_the_fallback(openai_line, caplog):
    line = await openai_line(Script(), key="sk-wrong")
    report = await line.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>Sorry")
    [said] = [e for e in error_lines(caplog) if "HTTP 401" in e]
    assert "OpenAI refused the WebSocket (HTTP 401)" in said and "OPENAI_API_KEY" in said
    assert "sk-wrong" not in caplog.text and API_KEY not in caplog.text


async def test_a_bad_key_refused_in_band_gives_the_fallback(openai_line, caplog):
    line = await openai_line(Script(), key="sk-wrong", fake_options={"key_check": "event"})
    report = await line.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>Sorry")
    said = [e for e in error_lines(caplog) if "invalid_api_key" in e]
    assert len(said) == 1 and "OpenAI ended the session" in said[0], error_lines(caplog)
    assert "OPENAI_API_KEY" in said[0]
    assert "sk-wrong" not in caplog.text


async def test_a_refused_upgrade_gives_the_fallback(openai_line, caplog):
    line = await openai_line(Script(refuse_with=503))
    report = await line.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>Sorry")
    assert len([e for e in error_lines(caplog) if "HTTP 503" in e]) == 1


async def test_a_dropped_socket_ends_the_call_as_an_upstream_error(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(drop_after=0.5))
    report = await line.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and report.next_twiml.startswith("<Say>Sorry")
    assert "reason=upstream-error" in await line.summary(caplog)


async def test_a_silent_openai_is_declared_dead_by_the_keepalive(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(silent_after=0.3),
                             call={"keepalive_interval": 0.3, "keepalive_timeout": 0.3})
    report = await line.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    assert "reason=upstream-keepalive-timeout" in await line.summary(caplog)
    with trio.fail_after(2):
        await line.fake.closed.wait()  # voxd closed it, silent or not


async def test_garbage_is_logged_and_ignored(openai_line, caplog):
    caplog.set_level(logging.INFO)
    line = await openai_line(Script(echo=True, garbage_at=0.2))
    report = await line.call(np.concatenate([burst(0.4), silence(1.0)]))
    assert report.closed_by == "caller"
    assert "reason=caller-hangup" in await line.summary(caplog)
    ignored = [r.getMessage() for r in caplog.records if "(ignored)" in r.getMessage()]
    assert len(ignored) == 1 and "not a JSON object" in ignored[0]

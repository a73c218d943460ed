"""voxd with `assistant.provider = "deepgram"` against a fake Deepgram Voice Agent that follows
the documented protocol: whole calls through the simulator in both audio modes, barge-in, the
call-control functions, the keypad, latency reports, and the failures."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import trio

from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.script import Script
from tests.integration.audio import best_alignment, burst, silence, snr_db
from tests.integration.conftest import make_settings
from voxd.audio.g711 import ulaw_decode, ulaw_encode
from voxd.observability import metrics
from voxd.providers.base import CallInfo
from voxd.providers.deepgram import DeepgramProvider
from voxd.sim.caller import CallReport, TwilioSimulator
from voxd.sim.rest import SimulatedRest

AUDIO = ["pcm16", "mulaw"]
TRANSFER = {"default": "support", "announce": "Connecting you now.",
            "to": {"sales": "+14155550100", "support": "sip:desk@pbx.example.com"}}
KEY = "dg-test-key"


class Line:
    """One voxd speaking to one fake Deepgram, with a simulated Twilio REST API."""

    def __init__(self, voxd: Any, fake: FakeDeepgram, rest: SimulatedRest | None) -> None:
        self.voxd = voxd
        self.fake = fake
        self.rest = rest

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


@pytest.fixture
def line(start_voxd, nursery):
    """`await line(script, audio=..., key=..., fake=..., rest=..., **sections)` -> Line; without
    `rest`, calls end through the stream's <Connect action> (the fallback follows it)."""

    async def start(script: Script | None = None, *, audio: str = "mulaw", key: str = KEY,
                    fake: FakeDeepgram | None = None, rest: bool = True,
                    **sections: Any) -> Line:
        fake = fake or FakeDeepgram()
        fake.script = script or Script()
        await nursery.start(fake.serve)
        simulated = None
        if rest:
            simulated = SimulatedRest()
            await nursery.start(simulated.serve)
            sections["twilio"] = {"rest_call_control": True,
                                  "api_base_url": simulated.base_url}
        sections.setdefault("transfer", TRANSFER)
        # The fake echoes the caller while the caller talks: voxd's own barge-in would rightly
        # cut it off, so these tests leave barge-in to Deepgram's UserStartedSpeaking.
        sections.setdefault("barge_in", {"local_vad": False})
        deepgram = {**fake.sections()["deepgram"], **sections.pop("deepgram", {})}
        voxd = await start_voxd(secrets={"deepgram_api_key": key},
                                assistant={"provider": "deepgram", "audio": audio},
                                deepgram=deepgram, **sections)
        if simulated is not None:
            simulated.auth_token = voxd.token
        return Line(voxd, fake, simulated)

    return start


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


def tone(seconds: float, audio: str) -> bytes:
    """A steady tone in the fake's audio format (what the agent says)."""
    rate = 16000 if audio == "pcm16" else 8000
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    return samples.tobytes() if audio == "pcm16" else ulaw_encode(samples).tobytes()


@pytest.mark.parametrize("audio", AUDIO)
async def test_a_call_talks_to_deepgram_in_the_configured_format(line, caplog, audio):
    caplog.set_level(logging.INFO)
    phone = await line(audio=audio,
                       deepgram={"settings": {"agent": {"greeting": "Hello from voxd."}}})
    report = await phone.call(np.concatenate([burst(0.8, seed=11), silence(0.8)]))
    assert report.errors == [] and report.closed_by == "caller"
    said = pcm(report.caller_frames)[800:5600]
    heard = pcm([bytes(report.received_audio)])  # the fake's echo, as voxd sent it on
    lag, correlation = best_alignment(said, heard)
    assert correlation > 0.95
    fake = phone.fake
    sent = b"".join(report.caller_frames)
    if audio == "mulaw":  # bytes through untouched, both ways
        assert bytes(fake.audio_in) == sent
        assert np.array_equal(heard[lag:lag + len(said)], said)
    else:
        assert len(fake.audio_in) == 4 * len(sent)
        received = np.frombuffer(bytes(fake.audio_in), "<i2")  # 16 kHz: compare at 8 kHz
        assert max(best_alignment(said, received[phase::2])[1] for phase in (0, 1)) > 0.9
        assert snr_db(said, heard[lag:lag + len(said)]) > 25
    # The handshake as Deepgram documents it.
    assert fake.headers["authorization"] == f"Token {KEY}"
    settings = fake.settings
    assert settings["type"] == "Settings" and fake.control_in[0] == settings
    expected = ({"encoding": "mulaw", "sample_rate": 8000} if audio == "mulaw"
                else {"encoding": "linear16", "sample_rate": 16000})
    assert settings["audio"]["input"] == expected
    assert settings["audio"]["output"] == {**expected, "container": "none"}
    assert settings["agent"]["greeting"] == "Hello from voxd."
    assert [f["name"] for f in settings["agent"]["think"]["functions"]] == \
        ["transfer_call", "send_dtmf", "end_call"]
    assert fake.audio_format == audio
    with trio.fail_after(1):
        await fake.closed.wait()
    assert [m["type"] for m in fake.control_in] == ["Settings"]  # audio flowed: no KeepAlive
    assert "reason=caller-hangup" in await phone.summary(caplog)
    assert any(r.getMessage().startswith("Deepgram agent session ") for r in caplog.records)
    assert KEY not in caplog.text


async def test_user_started_speaking_clears_what_the_caller_would_hear(line, caplog):
    caplog.set_level(logging.INFO)
    script = Script(echo=False, reply=tone(2.0, "mulaw"), reply_at=0.2, interrupt_at=1.0)
    phone = await line(script)
    report = await phone.call(silence(0.2), seconds=2.5)
    assert phone.fake.interruptions == 1
    assert report.clears >= 1, report.render()
    clear_at = next(t for t, what in report.events if what.startswith("clear"))
    heard = pcm(report.heard_frames)
    after = heard[int((clear_at + 0.06) * 8000):]
    assert len(after) > 4000 and np.max(np.abs(after)) < 200  # nothing of the reply after it
    line_ = await phone.summary(caplog)
    assert "barge_ins=1" in line_


@pytest.mark.parametrize("audio", AUDIO)
async def test_the_transfer_function_dials_the_named_destination(line, caplog, audio):
    caplog.set_level(logging.INFO)
    arguments = {"destination": "sales", "announce": "One moment."}
    phone = await line(Script(echo=False, tool_calls=[(0.4, "transfer_call", arguments)]),
                       audio=audio)
    report = await phone.call(burst(0.3), seconds=6)
    assert report.closed_by == "rest" and report.transferred_to == "+14155550100"
    assert "reason=transferred:sales" in await phone.summary(caplog)
    with trio.fail_after(1):
        await phone.fake.closed.wait()
    [answer] = phone.fake.tool_results.values()  # answered, with the outcome
    assert answer == "The caller was transferred to sales."


async def test_a_refused_transfer_is_answered_with_why_and_the_call_goes_on(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=False, tool_calls=[
        (0.3, "transfer_call", {"destination": "+19005550199"})]))
    report = await phone.call(burst(0.3), seconds=2.0)
    assert report.closed_by == "caller" and not report.transferred_to
    assert "reason=caller-hangup" in await phone.summary(caplog)
    [answer] = phone.fake.tool_results.values()
    assert "was not made: not a destination in [transfer.to]" in answer


@pytest.mark.parametrize("audio", AUDIO)
async def test_the_keypad_function_presses_keys_the_caller_hears(line, caplog, audio):
    caplog.set_level(logging.INFO)
    keys = "1w23*#0A"
    phone = await line(Script(echo=False, tool_calls=[(0.3, "send_dtmf", {"digits": keys})]),
                       audio=audio)
    report = await phone.call(silence(0.1), seconds=3.5)
    assert report.tones_heard == keys.replace("w", ""), report.render()
    assert report.closed_by == "caller"
    await phone.summary(caplog)
    [answer] = phone.fake.tool_results.values()
    assert answer == "The keys are being pressed."


async def test_the_end_call_function_hangs_up_after_the_last_words(line, caplog):
    caplog.set_level(logging.INFO)
    script = Script(echo=False, reply=tone(0.6, "mulaw"), reply_at=0.1,
                    tool_calls=[(0.3, "end_call", {})])
    phone = await line(script)
    report = await phone.call(silence(0.1), seconds=4)
    assert "reason=assistant-ended:deepgram:end-call-tool" in await phone.summary(caplog)
    assert [u.get("Status") for u in phone.rest.updates] == ["completed"]
    assert list(phone.fake.tool_results.values()) == ["The call ends after your last words."]
    # the goodbye (asked for 0.2 s into it) was heard to its end before the call was hung up
    assert report.media_received >= 30, report.render()


async def test_tool_names_come_from_the_config(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=False, tool_calls=[(0.3, "hang_up_now", {}),
                                                      (0.2, "send_dtmf", {"digits": "1"})]),
                       deepgram={"end_call_tool": "hang_up_now", "dtmf_tool": ""})
    report = await phone.call(silence(0.1), seconds=3)
    assert report.tones_heard == ""  # send_dtmf is not voxd's here
    assert "reason=assistant-ended:deepgram:end-call-tool" in await phone.summary(caplog)
    names = [f["name"] for f in phone.fake.settings["agent"]["think"]["functions"]]
    assert names == ["transfer_call", "hang_up_now"]
    results = list(phone.fake.tool_results.values())
    assert results[0].startswith("Error: there is no function named send_dtmf")


async def test_keys_the_caller_presses_reach_deepgram_and_never_a_log_line(line, caplog):
    caplog.set_level(logging.DEBUG)
    phone = await line(Script(echo=False), keypad={"collect": True})
    presses = [(key, 0.4 + 0.15 * i) for i, key in enumerate("4711#")]
    report = await phone.call(silence(0.1), seconds=2.0, dtmf=presses)
    assert report.keys_pressed == "4711#"
    await phone.summary(caplog)
    assert {"type": "InjectUserMessage",
            "content": "The caller pressed 4 7 1 1 # on the keypad."} in phone.fake.control_in
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("voxd."))
    assert "4711" not in logged and "4 7 1 1" not in logged


def stage_count(stage: str) -> float:
    return metrics.REGISTRY.get_sample_value("voxd_assistant_stage_seconds_count",
                                             {"stage": stage}) or 0.0


async def test_deepgrams_latency_reports_are_exported_once_per_turn(line, caplog):
    caplog.set_level(logging.INFO)
    before = {stage: stage_count(stage) for stage in ("total", "first_token", "first_audio",
                                                      "transcript")}
    fake = FakeDeepgram(latency_report=True)
    phone = await line(Script(echo=False, reply=tone(0.3, "mulaw"), reply_at=0.1), fake=fake)
    await phone.call(silence(0.1), seconds=1.5)
    await phone.summary(caplog)
    gained = {stage: stage_count(stage) - count for stage, count in before.items()}
    assert gained == {"total": 1, "first_token": 1, "first_audio": 1, "transcript": 1}


async def test_garbage_and_unknown_messages_are_logged_and_ignored(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=True, garbage_at=0.2))
    report = await phone.call(np.concatenate([burst(0.5), silence(0.7)]))
    assert report.closed_by == "caller" and report.received_audio
    assert "reason=caller-hangup" in await phone.summary(caplog)
    warnings = [r.getMessage() for r in caplog.records if "(ignored)" in r.getMessage()]
    assert len(warnings) == 1 and "not JSON" in warnings[0]


async def test_a_bad_api_key_gives_the_fallback_and_one_clear_line(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(key="wrong-key", rest=False)
    report = await phone.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd"
    assert report.next_twiml.startswith("<Say>"), report.render()
    assert "reason=upstream-error" in await phone.summary(caplog)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "Deepgram refused the WebSocket (HTTP 401)" in errors[0]
    assert "DEEPGRAM_API_KEY" in errors[0]
    assert "wrong-key" not in caplog.text


async def test_a_refused_upgrade_gives_the_fallback(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(refuse_with=503), rest=False)
    report = await phone.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd"
    assert "reason=upstream-error" in await phone.summary(caplog)
    assert any("Deepgram refused the WebSocket (HTTP 503)" in r.getMessage()
               for r in caplog.records)


async def test_settings_deepgram_refuses_end_the_call_with_its_words(line, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeDeepgram(settings_error=("UNPARSABLE_CLIENT_MESSAGE",
                                        "Unknown think provider 'nope'."))
    phone = await line(fake=fake, rest=False)
    report = await phone.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd"
    assert "reason=upstream-error" in await phone.summary(caplog)
    assert any("Deepgram refused the Settings (UNPARSABLE_CLIENT_MESSAGE): Unknown think "
               "provider 'nope'." in r.getMessage() for r in caplog.records)


async def test_an_error_mid_call_ends_it_with_the_fallback(line, caplog):
    caplog.set_level(logging.INFO)
    fake = FakeDeepgram(messages_at=[(0.5, {"type": "Error", "code": "THINK_REQUEST_FAILED",
                                            "description": "LLM unreachable"})])
    phone = await line(Script(echo=False), fake=fake, rest=False)
    report = await phone.call(burst(0.3), seconds=3)
    assert report.closed_by == "voxd"
    assert "reason=upstream-error" in await phone.summary(caplog)
    assert any("Deepgram reported an error (THINK_REQUEST_FAILED): LLM unreachable"
               in r.getMessage() for r in caplog.records)


async def test_deepgram_closing_the_socket_ends_the_call(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=False, end_at=0.5), rest=False)
    report = await phone.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    assert "reason=assistant-ended:Deepgram closed the call" in await phone.summary(caplog)


async def test_a_dropped_socket_is_an_upstream_error(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=False, drop_after=0.5), rest=False)
    report = await phone.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    assert "reason=upstream-error" in await phone.summary(caplog)
    assert any("Deepgram connection closed (no close frame)" in r.getMessage()
               for r in caplog.records)


async def test_a_silent_deepgram_is_declared_dead_by_the_keepalive(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(Script(echo=False, silent_after=0.3),
                       call={"keepalive_interval": 0.3, "keepalive_timeout": 0.3}, rest=False)
    report = await phone.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    assert "reason=upstream-keepalive-timeout" in await phone.summary(caplog)


async def test_keepalive_goes_out_only_while_no_caller_audio_does(nursery):
    """Deepgram closes a socket idle ~10 s and wants KeepAlive only when no audio flows: the
    session's timer (in connect's own nursery) sends one per quiet interval, none otherwise,
    and stops with the session."""
    fake = FakeDeepgram(script=Script(echo=False))
    await nursery.start(fake.serve)
    settings = make_settings("http://127.0.0.1:1", None, {"deepgram_api_key": KEY},
                             assistant={"provider": "deepgram", "audio": "mulaw"},
                             deepgram={**fake.sections()["deepgram"],
                                       "keepalive_interval": 0.1})
    provider = DeepgramProvider(settings)
    frame = b"\xff" * 160
    async with provider.connect(CallInfo("CA1", "MZ1")) as assistant:
        for _ in range(20):  # 0.4 s of audio
            assert assistant.ready_nowait and assistant.send_audio_nowait(frame)
            await trio.sleep(0.02)
        talking = [m["type"] for m in fake.control_in]
        await trio.sleep(0.35)  # quiet
        quiet = [m["type"] for m in fake.control_in]
    assert talking == ["Settings"]
    assert quiet[0] == "Settings" and 2 <= quiet.count("KeepAlive") <= 4
    assert bytes(fake.audio_in) == frame * 20
    with trio.fail_after(1):
        await fake.closed.wait()

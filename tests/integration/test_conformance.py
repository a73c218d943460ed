"""One conformance suite for every provider: each vendor's simulator (voxd/sim/vendors,
following the vendor's documented protocol) plays the same `Script`
(voxd/sim/vendors/script.py) in its own words, and the same checks hold for all: caller audio
arrives intact (by content), assistant audio is heard intact, a barge-in clears what plays and
the assistant is told what was heard where its protocol can say so, transfer / hang-up / keys
out / keys in work, a hang-up from either side ends everything, and every failure ends as the
README documents.

Adding a provider: write its adapter and its simulator (voxd/sim/vendors, implementing
`ConformantFake`, registered in its SIMULATORS), add a row to PROVIDERS; the suite covers it.
A provider whose protocol cannot do something says so in its row (`cannot`), and that check is
skipped naming why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import soxr
import trio

from tests.fakes.script import ConformantFake, Script
from tests.integration.audio import best_alignment, burst, silence
from voxd.audio.g711 import pcm16_to_ulaw, ulaw_to_pcm16
from voxd.sim.caller import CallReport, TwilioSimulator
from voxd.sim.vendors import simulator

TRANSFER = {"to": {"sales": "+14155550100"}}
TOOLS = {"transfer_tool": "transfer_call", "dtmf_tool": "send_dtmf",
         "end_call_tool": "end_call"}
"""The tool names every fake uses (the config's defaults, set explicitly)."""


@dataclass(frozen=True)
class Row:
    """A provider under test (its fake is its simulator in voxd.sim.vendors): the audio modes
    it supports, what its protocol cannot do (check -> why), and options for its simulator."""

    audio: tuple[str, ...] = ("mulaw", "pcm16")
    cannot: dict[str, str] = field(default_factory=dict)
    fake_options: dict[str, Any] = field(default_factory=dict)


PROVIDERS: dict[str, Row] = {
    "echo": Row(cannot={"script": "the echo is built in: it says back what it hears and "
                                  "presses back keys; nothing else is scripted"}),
    "websocket": Row(cannot={"http": "no HTTP request before the socket"}),
    "vapi": Row(cannot={
        "barge-in": "the Vapi fake interrupts itself on the caller's speech (its VAD), not "
                    "on a script: tests/integration/test_vapi.py covers it",
        "heard": "Vapi's transport has no message for what the caller heard"}),
    "elevenlabs": Row(fake_options={"signed": True},
                      cannot={"heard": "no ElevenLabs message says what the caller heard"}),
    "deepgram": Row(cannot={
        "heard": "no Deepgram message says what the caller heard",
        "http": "no HTTP request before the socket"}),
    "openai": Row(cannot={"http": "no HTTP request before the socket"}),
}

CASES = [(provider, audio) for provider, row in PROVIDERS.items() for audio in row.audio]


def needs(check: str) -> Any:
    """Mark a test as needing `check` of the provider: where its row says it `cannot`, the
    test is skipped at collection, naming why (tests/integration/conftest.py)."""
    def mark(test: Any) -> Any:
        test.needs = check
        return test
    return mark


def skip_reason(case: tuple[str, str], check: str) -> str | None:
    """Why `check` is skipped for `case` (provider, audio), or None."""
    provider = case[0]
    cannot = PROVIDERS[provider].cannot
    for key in (check, "script"):
        if key in cannot:
            return f"{provider}: {cannot[key]}"
    return None


@dataclass
class Line:
    """A voxd whose assistant is `provider` (through its fake), and a way to call it."""

    provider: str
    audio: str
    row: Row
    voxd: Any
    fake: ConformantFake | None

    def needs(self, check: str) -> ConformantFake:
        """The fake (a test marked `@needs(check)` never runs where the provider cannot)."""
        assert skip_reason((self.provider, self.audio), check) is None
        assert self.fake is not None
        return self.fake

    async def call(self, caller: np.ndarray, seconds: float,
                   dtmf: list[tuple[str, float]] | None = None) -> CallReport:
        simulator = TwilioSimulator(self.voxd.webhook, auth_token=self.voxd.token)
        with trio.fail_after(seconds + 15):
            report = await simulator.call(caller, seconds, dtmf=dtmf or [])
            await self.voxd.runtime.wait_idle()
        return report

    def reply(self, seconds: float, seed: int = 7) -> tuple[np.ndarray, bytes]:
        """Speech-like audio (8 kHz int16) and the same in the fake's audio format."""
        assert self.fake is not None
        said = burst(seconds, seed=seed)
        if self.fake.audio_format == "mulaw":
            return said, pcm16_to_ulaw(said.tobytes())
        wide = soxr.resample(said, 8000, 16000).astype(np.int16)
        return said, wide.tobytes()


def caller_audio_of(fake: ConformantFake) -> np.ndarray:
    """What the fake received from voxd, as 8 kHz int16."""
    data = bytes(fake.audio_in)
    if fake.audio_format == "mulaw":
        return np.frombuffer(ulaw_to_pcm16(data), np.int16)
    wide = np.frombuffer(data[: len(data) // 2 * 2], np.int16)
    return soxr.resample(wide, 16000, 8000).astype(np.int16)


def heard(report: CallReport) -> np.ndarray:
    return np.frombuffer(ulaw_to_pcm16(bytes(report.received_audio)), np.int16)


def summary(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(params=CASES, ids=[f"{p}-{a}" for p, a in CASES])
async def line(request, start_voxd, nursery) -> Line:
    provider, audio = request.param
    row = PROVIDERS[provider]
    fake: ConformantFake | None = None
    sections: dict[str, Any] = {"assistant": {"provider": provider, "audio": audio},
                                "transfer": TRANSFER}
    secrets: dict[str, str] = {}
    if provider != "echo":  # every other provider plays its vendor's simulator
        fake = simulator(provider, audio, **row.fake_options)
        await nursery.start(fake.serve)
        for section, keys in fake.sections().items():
            tools = TOOLS if section == provider and provider != "websocket" else {}
            sections[section] = {**keys, **tools}
        secrets = fake.secrets
    voxd = await start_voxd(secrets=secrets, **sections)
    return Line(provider, audio, row, voxd, fake)


# -- audio ------------------------------------------------------------------------------------


async def test_caller_audio_arrives_intact(line: Line) -> None:
    said = burst(2.0, seed=3)
    if line.provider == "echo":  # its only ears are what it says back (once the caller stops)
        report = await line.call(said, 5.0)
        _, correlation = best_alignment(said[800:12000], heard(report))
        assert correlation > 0.9, correlation
        return
    fake = line.needs("audio")
    fake.script = Script(echo=False)
    await line.call(said, 2.5)
    _, correlation = best_alignment(said[800:12000], caller_audio_of(fake))
    assert correlation > 0.95, correlation


@needs("audio")
async def test_assistant_audio_is_heard_intact(line: Line) -> None:
    fake = line.needs("audio")
    said, reply = line.reply(1.5)
    fake.script = Script(echo=False, reply=reply, reply_at=0.3)
    report = await line.call(silence(2.5), 2.5)
    _, correlation = best_alignment(said[400:10000], heard(report))
    assert correlation > 0.95, correlation


# -- barge-in ---------------------------------------------------------------------------------


@needs("barge-in")
async def test_a_barge_in_clears_what_plays(line: Line) -> None:
    fake = line.needs("barge-in")
    _, reply = line.reply(4.0)
    fake.script = Script(echo=False, reply=reply, reply_at=0.2, interrupt_at=1.5)
    report = await line.call(silence(3.5), 3.5)
    assert report.clears >= 1
    cleared = next(t for t, what in report.events if "clear" in what)
    # the reply would play until ~4.2 s: the caller hears nothing of it after the clear
    speech = report.assistant_speech()
    assert speech and max(end for _, end in speech) < cleared + 0.3, (speech, cleared)
    if "heard" not in line.row.cannot:
        assert fake.heard and 800 <= fake.heard[-1] <= 1800, fake.heard


# -- call control -----------------------------------------------------------------------------


@needs("tools")
async def test_the_assistant_transfers_the_caller(line: Line) -> None:
    fake = line.needs("tools")
    fake.script = Script(tool_calls=[(0.6, "transfer_call", {"destination": "sales"})])
    report = await line.call(burst(1.0), 3.0)
    assert report.transferred_to == "+14155550100"


@needs("tools")
async def test_the_assistant_presses_keys(line: Line) -> None:
    fake = line.needs("tools")
    fake.script = Script(echo=False, tool_calls=[(0.5, "send_dtmf", {"digits": "12#"})])
    report = await line.call(silence(2.5), 2.5)
    assert report.tones_heard == "12#"


@needs("tools")
async def test_the_assistant_hangs_up(line: Line, caplog) -> None:
    caplog.set_level(logging.INFO)
    fake = line.needs("tools")
    fake.script = Script(tool_calls=[(0.6, "end_call", {})])
    report = await line.call(burst(1.0), 4.0)
    assert report.closed_by == "voxd" and "<Hangup" in report.next_twiml
    assert "reason=assistant-ended" in summary(caplog)


async def test_the_callers_keys_reach_the_assistant(line: Line) -> None:
    report_keys = "7"
    if line.provider == "echo":  # presses them back
        report = await line.call(silence(2.0), 2.0, dtmf=[(report_keys, 0.5)])
        assert report.tones_heard == report_keys
        return
    fake = line.needs("keypad")
    fake.script = Script(echo=False)
    await line.call(silence(2.0), 2.0, dtmf=[(report_keys, 0.5)])
    assert any(report_keys in str(message) for message in fake.control_in[1:]), \
        fake.control_in


@needs("hang-up")
async def test_the_callers_hang_up_ends_the_assistants_session(line: Line) -> None:
    fake = line.needs("hang-up")
    await line.call(burst(1.0), 1.5)
    with trio.fail_after(3):
        await fake.closed.wait()


# -- failures ---------------------------------------------------------------------------------


@needs("refuse")
async def test_a_refused_session_gives_the_fallback(line: Line, caplog) -> None:
    caplog.set_level(logging.INFO)
    fake = line.needs("refuse")
    fake.script = Script(refuse_with=401)
    report = await line.call(burst(1.0), 2.0)
    assert "Sorry" in report.next_twiml
    assert "reason=upstream-error" in summary(caplog)


@needs("drop")
async def test_a_dropped_connection_ends_the_call_with_the_fallback(line: Line,
                                                                    caplog) -> None:
    caplog.set_level(logging.INFO)
    fake = line.needs("drop")
    fake.script = Script(drop_after=0.8)
    report = await line.call(burst(1.0), 4.0)
    assert "Sorry" in report.next_twiml
    assert "reason=upstream-error" in summary(caplog)


@needs("garbage")
async def test_garbage_is_skipped_and_the_call_goes_on(line: Line, caplog) -> None:
    caplog.set_level(logging.INFO)
    fake = line.needs("garbage")
    said = burst(2.0, seed=5)
    fake.script = Script(echo=True, garbage_at=0.3)
    report = await line.call(said, 3.0)
    assert "reason=caller-hangup" in summary(caplog)
    assert report.assistant_speech()  # the echo went on after the garbage


@needs("http")
async def test_a_retried_http_step_still_connects(line: Line) -> None:
    fake = line.needs("http")
    fake.script = Script(fail_first=2)
    report = await line.call(burst(1.0), 2.5)
    assert report.assistant_speech()

"""In-call control end to end: a transfer to a person, a refused one, a goodbye that hangs up,
the keypad both ways. For every provider (Vapi's fake, a generic WebSocket assistant, the
echo), in both audio modes, with and without the Twilio REST API (voxd's auth token against
the simulated REST API, which drives the simulated call as Twilio would)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pytest
import trio

from tests.fakes.vapi import FakeVapi, VapiScript
from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.audio import burst, silence
from voxd.observability import metrics
from voxd.sim.caller import CallReport, TwilioSimulator
from voxd.sim.rest import SimulatedRest

AUDIO = ["pcm16", "mulaw"]
TRANSFER = {"default": "support", "announce": "Connecting you now.",
            "to": {"sales": "+14155550100", "support": "sip:desk@pbx.example.com"}}
SECRET_KEYS = "4711"
"""A PIN-like entry: it must never appear in a log line."""


class Line:
    """One voxd with one kind of assistant, a simulated REST API, and a way to call it."""

    def __init__(self, voxd: Any, rest: SimulatedRest | None, assistant: Any = None) -> None:
        self.voxd = voxd
        self.rest = rest
        self.assistant = assistant

    async def call(self, caller: np.ndarray, seconds: float,
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
    """`await line(provider, audio, rest=True, vapi_script=..., assistant=..., **sections)`."""

    async def start(provider: str, audio: str, *, rest: bool = True,
                    vapi_script: VapiScript | None = None,
                    assistant: FakeAssistant | None = None, **sections: Any) -> Line:
        simulated = None
        if rest:
            simulated = SimulatedRest()
            await nursery.start(simulated.serve)
            sections["twilio"] = {"rest_call_control": True,
                                  "api_base_url": simulated.base_url}
        sections.setdefault("transfer", TRANSFER)
        fake: Any = None
        secrets: dict[str, str] = {}
        if provider == "vapi":
            fake = FakeVapi(vapi_script)
            await nursery.start(fake.serve)
            sections["vapi"] = {"base_url": fake.base_url, "assistant_id": "asst-1"}
            secrets["vapi_api_key"] = fake.script.api_key
        elif provider == "websocket":
            fake = assistant or FakeAssistant(loopback=False)
            await nursery.start(fake.serve)
            sections["websocket"] = {"url": fake.url}
        voxd = await start_voxd(secrets=secrets,
                                assistant={"provider": provider, "audio": audio}, **sections)
        if simulated is not None:
            simulated.auth_token = voxd.token  # the auth token voxd signs and calls REST with
        return Line(voxd, simulated, fake)

    return start


def transfer_request(provider: str, to: str, at: float = 0.6) -> dict[str, Any]:
    """How each provider's assistant asks for a transfer to `to`, `at` seconds in."""
    if provider == "vapi":
        args = {"destination": to, "announce": "One moment."}
        return {"vapi_script": VapiScript(tool_calls_at=[(at, [("transfer_call", args)])])}
    message = {"type": "transfer", "to": to, "announce": "One moment."}
    return {"assistant": FakeAssistant(loopback=False, messages_at=[(at, message)])}


def dial_of(twiml: str) -> tuple[str, str, str]:
    """(the Say text, the Dial's timeout, what it dials) of a transfer's TwiML."""
    root = ET.fromstring(twiml)
    say = root.find("Say")
    dial = root.find("Dial")
    assert dial is not None, twiml
    return (say.text if say is not None else "") or "", dial.get("timeout", ""), \
        "".join(n.text or "" for n in dial)


def told(line: Line) -> list[dict[str, Any]]:
    """The control messages voxd sent the assistant."""
    if isinstance(line.assistant, FakeVapi):
        return line.assistant.last_call.control_in
    return line.assistant.control_in


# -- transfers --------------------------------------------------------------------------------


@pytest.mark.parametrize("audio", AUDIO)
@pytest.mark.parametrize("provider", ["vapi", "websocket"])
async def test_a_transfer_to_an_allowed_name_dials_it_and_ends_the_stream_as_transferred(
        line, provider, audio, caplog):
    caplog.set_level(logging.INFO)
    transferred_before = metrics.CALLS_TOTAL.labels(outcome="transferred")._value.get()
    phone = await line(provider, audio, **transfer_request(provider, "sales"))
    report = await phone.call(burst(0.3), seconds=6)
    assert report.closed_by == "rest" and report.transferred_to == "+14155550100"
    assert metrics.TRANSFERS.labels(result="answered")._value.get() >= 1  # the Dial action
    [update] = phone.rest.updates  # the <Dial>, and no hang-up
    assert update["call_sid"] == report.call_sid and "Status" not in update
    assert dial_of(update["Twiml"]) == ("One moment.", "30", "+14155550100")
    assert "reason=transferred:sales" in await phone.summary(caplog)
    assert metrics.CALLS_TOTAL.labels(outcome="transferred")._value.get() == \
        transferred_before + 1
    if provider == "websocket":  # told, then the end
        assert told(phone)[-2:] == [{"type": "transferred", "to": "sales"}, {"type": "end"}]
    else:  # Vapi is told to end the call
        assert told(phone)[-1] == {"type": "end-call"}
    # the transfer happened within a second of the request, not at the end of the call
    at = next(t for t, what in report.events if what.startswith("transferred:"))
    assert at < 2.0, report.render()


@pytest.mark.parametrize("audio", AUDIO)
@pytest.mark.parametrize("provider", ["vapi", "websocket"])
async def test_a_transfer_to_an_unknown_destination_is_refused_and_the_call_goes_on(
        line, provider, audio, caplog):
    caplog.set_level(logging.INFO)
    refused_before = metrics.TRANSFERS.labels(result="refused")._value.get()
    phone = await line(provider, audio, **transfer_request(provider, "+19005550199"))
    report = await phone.call(burst(0.3), seconds=2.5)
    assert report.closed_by == "caller" and not phone.rest.updates and not report.transferred_to
    assert "reason=caller-hangup" in await phone.summary(caplog)
    assert metrics.TRANSFERS.labels(result="refused")._value.get() == refused_before + 1
    assert any("transfer to +19005550199 refused: not a destination in [transfer.to]"
               in r.getMessage() for r in caplog.records)
    if provider == "websocket":
        assert {"type": "transfer-refused", "to": "+19005550199",
                "reason": "not a destination in [transfer.to]"} in told(phone)
    else:
        [refusal] = [m for m in told(phone) if m.get("type") == "add-message"]
        assert "not a destination" in refusal["message"]["content"]
        assert refusal["triggerResponseEnabled"] is True


async def test_a_transfer_twilio_refuses_leaves_the_caller_with_the_fallback(line, caplog):
    """The REST request fails (here: Twilio refuses voxd's credentials): counted, one line,
    and the caller is not left hanging: the stream closes and the fallback runs."""
    caplog.set_level(logging.INFO)
    failed_before = metrics.TRANSFERS.labels(result="failed")._value.get()
    phone = await line("websocket", "mulaw", **transfer_request("websocket", "sales"))
    phone.rest.auth_token = "not-voxds-token"
    report = await phone.call(burst(0.3), seconds=4)
    assert report.closed_by == "voxd" and not report.transferred_to
    assert report.next_twiml.startswith("<Say>Sorry, the assistant is unavailable"), \
        report.render()
    assert metrics.TRANSFERS.labels(result="failed")._value.get() == failed_before + 1
    assert any("transfer to sales failed" in r.getMessage() for r in caplog.records)
    assert {"type": "transferred", "to": "sales"} not in told(phone)


async def test_an_assistant_that_hangs_up_right_after_asking_still_transfers(line, caplog):
    """The transfer is decided when asked: the assistant closing its socket during the last
    words does not turn it into an apology."""
    caplog.set_level(logging.INFO)
    words = (np.sin(np.arange(16000) / 8) * 8000).astype("<i2").tobytes()  # 1 s
    assistant = FakeAssistant(loopback=False, reply=words, reply_at=0.0,
                              reply_in_one_message=True,
                              messages_at=[(0.3, {"type": "transfer", "to": "sales"})],
                              close_after=0.5)
    phone = await line("websocket", "pcm16", assistant=assistant)
    report = await phone.call(silence(0.2), seconds=4)
    assert report.transferred_to == "+14155550100", report.render()
    assert "reason=transferred:sales" in await phone.summary(caplog)


async def test_the_vapi_end_call_tool_hangs_up_and_ends_the_vapi_call(line, caplog):
    caplog.set_level(logging.INFO)
    phone = await line("vapi", "mulaw",
                       vapi_script=VapiScript(tool_calls_at=[(0.4, [("end_call", {})])]))
    report = await phone.call(burst(0.3), seconds=4)
    assert "reason=assistant-ended:vapi:end-call-tool" in await phone.summary(caplog)
    assert [u.get("Status") for u in phone.rest.updates] == ["completed"]
    assert report.closed_by == "rest" and report.next_twiml == ""
    assert told(phone)[-1] == {"type": "end-call"}  # Vapi's side of the call ends too


@pytest.mark.parametrize("audio", AUDIO)
async def test_vapi_transfer_update_to_a_configured_number_is_carried_out(line, audio, caplog):
    """Vapi's own transferCall tool dials by number: voxd matches it to [transfer.to]."""
    caplog.set_level(logging.INFO)
    update = {"type": "transfer-update",
              "destination": {"type": "number", "number": "+14155550100"}}
    phone = await line("vapi", audio, vapi_script=VapiScript(messages_at=[(0.5, update)]))
    report = await phone.call(burst(0.3), seconds=5)
    assert report.transferred_to == "+14155550100"
    assert "reason=transferred:sales" in await phone.summary(caplog)


@pytest.mark.parametrize("audio", AUDIO)
async def test_the_echo_transfers_to_the_default_when_the_caller_presses_0(line, audio, caplog):
    caplog.set_level(logging.INFO)
    phone = await line("echo", audio)
    report = await phone.call(silence(0.1), seconds=5, dtmf=[("0", 0.5)])
    assert report.transferred_to == "sip:desk@pbx.example.com", report.render()
    assert "reason=transferred:support" in await phone.summary(caplog)


@pytest.mark.parametrize("audio", AUDIO)
async def test_the_echo_cannot_transfer_without_a_default(line, audio, caplog):
    caplog.set_level(logging.INFO)
    phone = await line("echo", audio, transfer={"to": {"sales": "+14155550100"}})
    report = await phone.call(silence(0.1), seconds=1.5, dtmf=[("0", 0.3)])
    assert report.closed_by == "caller" and not phone.rest.updates
    assert any("refused: no destination named and no transfer.default configured"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("audio", AUDIO)
async def test_without_rest_a_transfer_goes_through_the_streams_action(line, audio, caplog):
    caplog.set_level(logging.INFO)
    phone = await line("websocket", audio, rest=False, **transfer_request("websocket", "sales"))
    report = await phone.call(burst(0.3), seconds=5)
    assert report.closed_by == "voxd" and report.transferred_to == "+14155550100"
    assert "reason=transferred:sales" in await phone.summary(caplog)
    # the dialled person talked, then hung up: the call ends there
    assert report.after_dial == "<Hangup/>"


async def test_nobody_answering_gets_the_no_answer_twiml(line, caplog):
    phone = await line("echo", "mulaw", transfer={**TRANSFER,
                                                  "no_answer_twiml": "<Say>Nobody.</Say>"})
    simulator = TwilioSimulator(phone.voxd.webhook, auth_token=phone.voxd.token,
                                rest=phone.rest, dial_status="no-answer")
    report = await simulator.call(silence(0.1), 4, dtmf=[("0", 0.3)])
    assert report.after_dial == "<Say>Nobody.</Say>", report.render()


# -- the end of a call --------------------------------------------------------------------------


def goodbye(provider: str) -> dict[str, Any]:
    """An assistant that says a few words, then ends the call."""
    words = (np.sin(np.arange(8000) / 8) * 8000).astype("<i2")  # 0.5 s at 16 kHz
    if provider == "vapi":
        return {"vapi_script": VapiScript(first_message=words.tobytes(), end_after=0.3)}
    return {"assistant": FakeAssistant(loopback=False, reply=words.tobytes(), reply_at=0.0,
                                       reply_in_one_message=True, end_after=0.3)}


@pytest.mark.parametrize("audio", AUDIO)
@pytest.mark.parametrize("provider", ["vapi", "websocket"])
@pytest.mark.parametrize("rest", [True, False], ids=["rest", "action"])
async def test_a_goodbye_ends_the_phone_call_with_no_apology_after_it(
        line, provider, audio, rest, caplog):
    caplog.set_level(logging.INFO)
    phone = await line(provider, audio, rest=rest, **goodbye(provider))
    report = await phone.call(silence(0.2), seconds=4)
    assert "reason=assistant-ended:" in await phone.summary(caplog)
    assert report.media_received > 0  # the last words were sent ...
    assert report.assistant_speech(), report.render()  # ... and heard
    if rest:  # hung up by REST: nothing runs after the stream
        [update] = phone.rest.updates
        assert update["Status"] == "completed"
        assert report.closed_by == "rest" and report.next_twiml == "", report.render()
    else:  # the stream's action answers a hang-up, not the fallback
        assert report.closed_by == "voxd" and report.next_twiml == "<Hangup/>", report.render()


@pytest.mark.parametrize("rest", [True, False], ids=["rest", "action"])
async def test_a_failure_still_gets_the_fallback(line, rest, caplog):
    caplog.set_level(logging.INFO)
    phone = await line("vapi", "mulaw", rest=rest, vapi_script=VapiScript(drop_after=0.4))
    report = await phone.call(silence(0.2), seconds=3)
    assert "reason=upstream-error" in await phone.summary(caplog)
    assert report.next_twiml.startswith("<Say>Sorry, the assistant is unavailable"), \
        report.render()


# -- the keypad -------------------------------------------------------------------------------


@pytest.mark.parametrize("audio", AUDIO)
@pytest.mark.parametrize("provider", ["vapi", "websocket"])
async def test_keys_pressed_reach_the_assistant_and_never_a_log_line(
        line, provider, audio, caplog):
    caplog.set_level(logging.DEBUG)
    phone = await line(provider, audio, keypad={"collect": True})
    presses = [(key, 0.4 + 0.15 * i) for i, key in enumerate(SECRET_KEYS + "#")]
    report = await phone.call(silence(0.1), seconds=2.0, dtmf=presses)
    assert report.keys_pressed == SECRET_KEYS + "#"
    await phone.summary(caplog)
    if provider == "websocket":
        assert {"type": "dtmf", "digits": SECRET_KEYS + "#"} in told(phone)
    else:
        [entry] = [m for m in told(phone) if m.get("type") == "add-message"]
        assert entry["message"]["content"] == "The caller pressed 4 7 1 1 # on the keypad."
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("voxd."))
    assert SECRET_KEYS not in logged and "4 7 1 1" not in logged
    assert "keypad entry of 5 key(s)" in logged


@pytest.mark.parametrize("audio", AUDIO)
@pytest.mark.parametrize("provider", ["vapi", "websocket", "echo"])
async def test_keys_the_assistant_presses_are_heard_exactly(line, provider, audio, caplog):
    caplog.set_level(logging.INFO)
    keys = "1w23*#0A"
    extra: dict[str, Any] = {}
    dtmf: list[tuple[str, float]] = []
    if provider == "vapi":
        tools = [("send_dtmf", {"digits": keys})]
        extra["vapi_script"] = VapiScript(tool_calls_at=[(0.3, tools)])
    elif provider == "websocket":
        extra["assistant"] = FakeAssistant(
            loopback=False, messages_at=[(0.3, {"type": "send-dtmf", "digits": keys})])
    else:  # the echo presses back what the caller pressed
        keys = "159#"
        extra["keypad"] = {"collect": True}
        dtmf = [(key, 0.3 + 0.1 * i) for i, key in enumerate(keys)]
    phone = await line(provider, audio, **extra)
    report = await phone.call(silence(0.1), seconds=3.5, dtmf=dtmf)
    assert report.tones_heard == keys.replace("w", ""), report.render()
    assert report.closed_by == "caller"
    await phone.summary(caplog)


async def test_keys_that_cannot_be_played_are_refused_and_the_call_goes_on(line, caplog):
    caplog.set_level(logging.INFO)
    assistant = FakeAssistant(loopback=False,
                              messages_at=[(0.3, {"type": "send-dtmf", "digits": "12x4"})])
    phone = await line("websocket", "mulaw", assistant=assistant)
    report = await phone.call(silence(0.1), seconds=1.5)
    assert report.tones_heard == "" and report.closed_by == "caller"
    assert "reason=caller-hangup" in await phone.summary(caplog)
    [warning] = [r.getMessage() for r in caplog.records if "cannot be played" in r.getMessage()]
    assert "12x4" not in warning

"""Outbound calls, the pure parts: who may be called, what Twilio is asked, the pacing."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import trio
import trio.testing

from voxd.config import OutboundConfig, Secret, Secrets, Settings, parse_config
from voxd.outbound import (
    DialRefused,
    RateLimit,
    _state,
    create_fields,
    dial_request,
    machine_detection_mode,
    parse_params,
)
from voxd.twilio.rest import CallState, TwilioRefused

ALLOWED = OutboundConfig(from_number="+14155550199", allowed_to=["+1415555*", "+4930[12]*"])


@pytest.mark.parametrize("to", ["+14155550100", "+4930100200", "+4930299999"])
def test_allowed_destinations(to: str) -> None:
    request = dial_request(ALLOWED, to)
    assert (request.to, request.from_number, request.parameters) == (to, "+14155550199", {})


@pytest.mark.parametrize(("to", "field", "words"), [
    ("+14165550100", "to", "matches no outbound.allowed_to"),
    ("+4930300000", "to", "matches no outbound.allowed_to"),
    ("14155550100", "to", "E.164"),
    ("+1415555*", "to", "E.164"),  # a pattern is not a number
    ("+1415555010\n", "to", "E.164"),
    (12, "to", "int"),
    (None, "to", "NoneType"),
])
def test_refused_destinations(to: object, field: str, words: str) -> None:
    with pytest.raises(DialRefused) as refused:
        dial_request(ALLOWED, to)
    assert refused.value.field == field and words in refused.value.problem


def test_no_patterns_no_calls() -> None:
    with pytest.raises(DialRefused, match=r"outbound\.allowed_to: is empty"):
        dial_request(OutboundConfig(from_number="+14155550199"), "+14155550100")


def test_from_number() -> None:
    assert dial_request(ALLOWED, "+14155550100", "+14155550111").from_number == "+14155550111"
    with pytest.raises(DialRefused, match=r"from: must be an E\.164"):
        dial_request(ALLOWED, "+14155550100", "sales")
    with pytest.raises(DialRefused, match=r"outbound\.from_number is not set"):
        dial_request(OutboundConfig(allowed_to=["+1*"]), "+14155550100")


@pytest.mark.parametrize(("parameters", "words"), [
    ([1, 2], "must be an object"),
    ({"a b": "x"}, "letters, digits"),
    ({"to": "x"}, "set by voxd"),
    ({"direction": "x"}, "set by voxd"),
    ({"k": 5}, "must be a string"),
    ({"k": "x" * 257}, "at most 256"),
    ({"k": "a\x00b"}, "printable"),
    ({f"k{i}": "v" for i in range(17)}, "at most 16"),
])
def test_refused_parameters(parameters: object, words: str) -> None:
    with pytest.raises(DialRefused, match=words) as refused:
        dial_request(ALLOWED, "+14155550100", None, parameters)
    assert refused.value.field == "parameters"


def test_parse_params() -> None:
    assert parse_params(["lead=42", "note=a=b", "empty="]) == \
        {"lead": "42", "note": "a=b", "empty": ""}
    with pytest.raises(DialRefused, match="expected KEY=VALUE"):
        parse_params(["lead"])


def settings(**outbound: object) -> Settings:
    config = parse_config({"server": {"public_url": "https://voice.example.com/"},
                           "twilio": {"account_sid": "AC" + "0" * 32},
                           "outbound": {"from_number": "+14155550199",
                                        "allowed_to": ["+1*"], **outbound}})
    return Settings(config, Secrets(twilio_auth_token=Secret("t")))


def test_create_fields_point_twilio_at_voxd() -> None:
    request = dial_request(settings().config.outbound, "+14155550100", None,
                           {"lead": "42", "note": "a&b=c"})
    fields = create_fields(settings(), request)
    url = urlsplit(str(fields["url"]))
    assert url.scheme + "://" + url.netloc + url.path == "https://voice.example.com/twilio/voice"
    assert parse_qs(url.query) == {"lead": ["42"], "note": ["a&b=c"]}
    assert fields["status_callback"] == "https://voice.example.com/twilio/status"
    assert fields["status_callback_event"] == ["initiated", "ringing", "answered", "completed"]
    assert fields["async_amd"] == "true"
    assert fields["async_amd_status_callback"] == "https://voice.example.com/twilio/amd"
    assert fields["machine_detection"] == "DetectMessageEnd"
    assert (fields["to"], fields["from_"], fields["timeout"]) == \
        ("+14155550100", "+14155550199", 30)


def test_machine_detection_modes() -> None:
    assert machine_detection_mode(settings(on_machine="hangup").config.outbound) == "Enable"
    assert machine_detection_mode(settings(on_machine="continue").config.outbound) == \
        "DetectMessageEnd"
    off = settings(machine_detection=False)
    assert machine_detection_mode(off.config.outbound) is None
    fields = create_fields(off, dial_request(off.config.outbound, "+14155550100"))
    assert "machine_detection" not in fields and "async_amd" not in fields
    assert "?" not in str(fields["url"])  # no parameters, no query


async def test_rate_limit_spaces_turns_and_bounds_the_queue(
        autojump_clock: trio.testing.MockClock) -> None:
    limit = RateLimit()
    waits = [limit.reserve(2.0, 1.0) for _ in range(4)]
    assert waits == [0.0, 0.5, 1.0, None]  # the fourth would wait 1.5 s > 1 s
    assert limit.retry_after() == pytest.approx(1.5)
    await trio.sleep(1.5)
    assert limit.reserve(2.0, 1.0) == 0.0


async def test_a_turn_given_back_goes_to_the_next_request(
        autojump_clock: trio.testing.MockClock) -> None:
    limit = RateLimit()
    assert limit.reserve(1.0, 5.0) == 0.0
    assert limit.reserve(1.0, 5.0) == 1.0
    limit.give_back(1.0)  # the second request's client left while waiting
    assert limit.reserve(1.0, 5.0) == 1.0  # not 2.0


class FlakyCalls:
    """Twilio's calls resource answering `failures` first, then the call's state."""

    def __init__(self, failures: list[TwilioRefused]) -> None:
        self.failures = failures
        self.asked = 0

    async def state(self, sid: str) -> CallState:
        self.asked += 1
        if self.failures:
            raise self.failures.pop(0)
        return CallState("completed", "human", "12")


async def test_waiting_survives_twilio_being_briefly_unavailable(
        autojump_clock: trio.testing.MockClock) -> None:
    calls = FlakyCalls([TwilioRefused("Service Unavailable", 20500, 503),
                        TwilioRefused("could not read the call: ConnectError")])
    state = await _state(calls, "CA" + "1" * 32)  # type: ignore[arg-type]
    assert state.status == "completed" and calls.asked == 3


async def test_waiting_gives_up_on_a_refusal_or_a_long_outage(
        autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(TwilioRefused, match=r"lost track of CA1+ .*may still be in progress"):
        await _state(FlakyCalls([TwilioRefused("Authenticate", 20003, 401)]),  # type: ignore[arg-type]
                     "CA" + "1" * 32)
    outage = FlakyCalls([TwilioRefused("down", 20500, 503)] * 100)
    with pytest.raises(TwilioRefused, match="lost track"):
        await _state(outage, "CA" + "1" * 32)  # type: ignore[arg-type]
    assert 25 <= outage.asked <= 40  # about WAIT_PATIENCE_SECONDS of asking once a second


def test_a_parameter_never_hides_voxds_facts_from_vapi() -> None:
    from voxd.providers.vapi_protocol import create_call_body

    body = create_call_body(audio="pcm16", assistant_id="a", call_sid="CA" + "1" * 32,
                            from_number="+14155550100", to_number="+14155550199",
                            parameters={"callSid": "CAforged", "lead": "42"})
    variables = body["assistantOverrides"]["variableValues"]
    assert variables["callSid"] == "CA" + "1" * 32 and variables["lead"] == "42"

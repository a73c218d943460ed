"""Vapi's transport, sans-I/O: the create-call request, its answers, the control messages."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.config import KeypadConfig, VapiConfig
from voxd.errors import ProtocolError
from voxd.providers.base import (
    ANSWERED_BY,
    MAX_TRANSCRIPT_CHARS,
    AnsweredBy,
    AssistantEnded,
    AssistantInterrupted,
    CallerSpeechStarted,
    DigitsRequested,
    KeypadEntry,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.vapi import VapiMessages
from voxd.providers.vapi_protocol import (
    CreatedCall,
    OtherMessage,
    SpeechUpdate,
    StatusUpdate,
    TranscriptMessage,
    UserInterrupted,
    VapiCreateError,
    create_call_body,
    parse_control,
    parse_create_response,
)


def test_create_body_for_each_audio_mode_and_assistant_kind():
    body = create_call_body(audio="mulaw", assistant_id="a1", call_sid="CA1",
                            from_number="+1", to_number="+2", parameters={"lang": "de"})
    assert body["assistantId"] == "a1" and "assistant" not in body
    assert body["transport"] == {"provider": "vapi.websocket", "audioFormat":
                                 {"format": "mulaw", "container": "raw", "sampleRate": 8000}}
    assert body["assistantOverrides"]["variableValues"] == {
        "callSid": "CA1", "from": "+1", "to": "+2", "lang": "de"}
    assert body["metadata"] == {"twilioCallSid": "CA1", "from": "+1", "to": "+2"}
    assert "phoneNumberId" not in body and "phoneNumber" not in body
    inline = create_call_body(audio="pcm16", assistant={"firstMessage": "hi"}, call_sid="CA2")
    assert inline["assistant"] == {"firstMessage": "hi"} and "assistantId" not in inline
    assert inline["transport"]["audioFormat"] == {"format": "pcm_s16le", "container": "raw",
                                                  "sampleRate": 16000}


def test_a_created_call_keeps_its_url_out_of_reprs():
    answer = {"id": "c1", "status": "queued",
              "transport": {"provider": "vapi.websocket",
                            "websocketCallUrl": "wss://x/c1/transport"}}
    created = parse_create_response(201, json.dumps(answer).encode())
    assert created == CreatedCall("c1", "wss://x/c1/transport")
    assert "wss://" not in repr(created)


@pytest.mark.parametrize(("status", "body", "retryable", "words"), [
    (401, b'{"message":"Invalid Key"}', False, "rejected the API key (HTTP 401: Invalid Key)"),
    (403, b"", False, "rejected the API key (HTTP 403)"),
    (400, b'{"message":["assistantId must be a UUID"]}', False,
     "refused the call (HTTP 400: assistantId must be a UUID)"),
    (404, b"not json", False, "refused the call (HTTP 404)"),
    (429, b"", True, "unavailable (HTTP 429)"),
    (503, b'{"error":"down"}', True, "unavailable (HTTP 503: down)"),
    (201, b'{"id":"x"}', False, "not what its API documents"),
    (201, b'{"id":"x","transport":{"websocketCallUrl":"https://x"}}', False, "no WebSocket URL"),
])
def test_create_errors_are_classified(status, body, retryable, words):
    with pytest.raises(VapiCreateError) as error:
        parse_create_response(status, body)
    assert error.value.retryable is retryable and error.value.status == status
    assert words in str(error.value)


@pytest.mark.parametrize(("text", "event"), [
    ('{"type":"user-interrupted","turnId":"t"}', UserInterrupted()),
    ('{"type":"speech-update","status":"started","role":"user","turn":2}',
     SpeechUpdate("started", "user", 2)),
    ('{"type":"speech-update","status":"stopped","role":"assistant","turn":"x"}',
     SpeechUpdate("stopped", "assistant", None)),
    ('{"type":"status-update","status":"ended","endedReason":"customer-ended-call"}',
     StatusUpdate("ended", "customer-ended-call")),
    ('{"type":"hang"}', OtherMessage("hang")),
    ('{"type":"transcript","role":"user","transcript":"hi"}',
     TranscriptMessage("user", "hi", final=False)),
    ('{"type":"transcript","role":"assistant","transcriptType":"final","transcript":"Hello"}',
     TranscriptMessage("assistant", "Hello", final=True)),
    ('{"type":"transcript[transcriptType=\\"final\\"]","role":"user","transcript":"yes"}',
     TranscriptMessage("user", "yes", final=True)),
    ('{"type":"transcript","role":3,"transcriptType":"final","transcript":null}',
     TranscriptMessage("", "", final=True)),
    ('{"type":"model-output","output":"x"}', OtherMessage("model-output")),
])
def test_control_messages(text, event):
    assert parse_control(text) == event


@pytest.mark.parametrize("text", ["nope", "[]", '{"kind":"x"}', '{"type":3}'])
def test_unreadable_control_messages_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        parse_control(text)


MESSAGES = VapiMessages(VapiConfig(), KeypadConfig())
translate = MESSAGES.translate


def tool_calls(*calls: tuple[str, object]) -> str:
    return json.dumps({"type": "tool-calls", "toolCallList": [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
        for i, (name, args) in enumerate(calls)], "toolWithToolCallList": []})


def test_client_side_tool_calls_become_voxd_requests():
    assert translate(tool_calls(("transfer_call", {"destination": "sales", "announce": "Hi"}))) \
        == (TransferRequested("sales", "Hi"),)
    # arguments as a JSON string (OpenAI's shape, as Vapi's schema has it) work the same
    assert translate(tool_calls(("send_dtmf", '{"digits": "12#"}'),
                                ("end_call", {}))) == \
        (DigitsRequested("12#"), AssistantEnded("vapi:end-call-tool"))
    # tools that are not voxd's, and malformed entries, are passed over
    assert translate(tool_calls(("lookup_order", {"id": 1}))) == ()
    assert translate('{"type":"tool-calls","toolCallList":[3,{"function":7}]}') == ()
    assert translate(tool_calls(("transfer_call", "not json"))) == (TransferRequested("", ""),)


def test_tool_names_come_from_the_config():
    messages = VapiMessages(VapiConfig(transfer_tool="handoff"), KeypadConfig())
    assert messages.translate(tool_calls(("handoff", {"destination": "x"}))) == \
        (TransferRequested("x", ""),)
    assert messages.translate(tool_calls(("transfer_call", {"destination": "x"}))) == ()


def test_transfer_update_names_the_number_or_sip_uri():
    number = {"type": "transfer-update", "destination": {"type": "number",
                                                         "number": "+14155550100",
                                                         "message": "Connecting you"}}
    assert translate(json.dumps(number)) == TransferRequested("+14155550100", "Connecting you")
    sip = {"type": "transfer-update", "destination": {"type": "sip", "sipUri": "sip:a@b.c"}}
    assert translate(json.dumps(sip)) == TransferRequested("sip:a@b.c", "")
    squad = {"type": "transfer-update", "destination": {"type": "assistant",
                                                        "assistantName": "billing"}}
    assert translate(json.dumps(squad)) is None


def test_notices_to_vapi_are_system_messages():
    keys = json.loads(MESSAGES.notice(KeypadEntry("123#")) or "")
    assert keys == {"type": "add-message", "triggerResponseEnabled": True,
                    "message": {"role": "system",
                                "content": "The caller pressed 1 2 3 # on the keypad."}}
    refused = json.loads(MESSAGES.notice(TransferRefused("ceo", "not allowed")) or "")
    assert "not allowed" in refused["message"]["content"]
    assert MESSAGES.notice(Transferred("sales")) is None  # end-call follows


def test_what_voxd_acts_on():
    assert translate('{"type":"user-interrupted"}') == AssistantInterrupted()
    assert translate('{"type":"speech-update","status":"started","role":"user"}') == \
        CallerSpeechStarted()
    assert translate('{"type":"speech-update","status":"started","role":"assistant"}') is None
    assert translate('{"type":"status-update","status":"ended","endedReason":"silence"}') == \
        AssistantEnded("vapi:silence")
    assert translate('{"type":"status-update","status":"in-progress"}') is None
    assert translate('{"type":"hang"}') is None  # "hang" is a delay notice, not a hang-up


def final(role: str, text: str, kind: str = "final") -> str:
    return json.dumps({"type": "transcript", "role": role, "transcriptType": kind,
                       "transcript": text})


def test_final_transcripts_become_events_and_partial_ones_do_not():
    assert translate(final("assistant", "How can I help?")) == \
        Transcript("assistant", "How can I help?")
    assert translate(final("user", "I need a plumber")) == Transcript("user", "I need a plumber")
    assert translate(final("user", "I need a", kind="partial")) is None
    assert translate(final("system", "you are a helpful")) is None  # not a party to the call
    assert translate(final("tool", "x")) is None
    assert translate(final("user", "")) is None
    long = translate(final("assistant", "é" * (MAX_TRANSCRIPT_CHARS + 500)))
    assert isinstance(long, Transcript) and len(long.text) == MAX_TRANSCRIPT_CHARS


def test_who_answered_is_told_as_a_system_message():
    beep = json.loads(MESSAGES.notice(AnsweredBy("machine_end_beep")) or "")
    assert beep == {"type": "add-message", "triggerResponseEnabled": True,
                    "message": {"role": "system", "content": "The call was answered by an "
                                "answering machine; its greeting has ended (beep)."}}
    person = json.loads(MESSAGES.notice(AnsweredBy("human")) or "")
    assert person["message"]["content"] == "The call was answered by a person."
    assert person["triggerResponseEnabled"] is False  # the assistant goes on as it was
    for value in ANSWERED_BY:
        assert json.loads(MESSAGES.notice(AnsweredBy(value)) or "")["type"] == "add-message"
    odd = json.loads(MESSAGES.notice(AnsweredBy("robot\x1b[2J")) or "")
    assert odd["message"]["content"] == \
        "It is not known whether a person or a machine answered the call."


@given(st.text(max_size=200))
def test_arbitrary_text_is_an_event_or_a_protocol_error(text):
    with contextlib.suppress(ProtocolError):
        parse_control(text)


@given(st.dictionaries(st.sampled_from(["type", "status", "role", "turn", "endedReason",
                                        "toolCallList", "destination"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=10)
                       | st.lists(st.integers(), max_size=2), max_size=5))
def test_arbitrary_objects_are_an_event_or_a_protocol_error(value):
    with contextlib.suppress(ProtocolError):
        translate(json.dumps(value))


@pytest.mark.parametrize("status", [201, 500])
def test_a_deeply_nested_answer_is_a_clean_error(status):
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(VapiCreateError):
        parse_create_response(status, body)

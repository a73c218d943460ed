"""ElevenLabs' WebSocket protocol, sans-I/O: every server event parsed (and every malformed,
oversized or unknown one handled), every client message built, tools and notices mapped, the
signed-URL answer classified, audio formats converted."""

from __future__ import annotations

import base64
import contextlib
import json

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.audio.g711 import pcm16_to_ulaw, ulaw_to_pcm16
from voxd.errors import ProtocolError, UpstreamError
from voxd.providers.base import (
    MAX_TRANSCRIPT_CHARS,
    AnsweredBy,
    AssistantEnded,
    DigitsRequested,
    KeypadEntry,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.elevenlabs_protocol import (
    FORMATS,
    AgentResponse,
    AgentResponseCorrection,
    Audio,
    ElevenLabsMessages,
    Interruption,
    Metadata,
    OtherMessage,
    Ping,
    SignedUrlError,
    ToolCall,
    UserTranscript,
    check_format,
    client_tool_result,
    contextual_update,
    converter,
    dynamic_variables,
    initiation_message,
    parse_server_message,
    parse_signed_url_response,
    pong,
    user_audio_chunk,
    user_message,
)


def message(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields})


# -- server events ----------------------------------------------------------------------------


def test_metadata_gives_the_agents_formats():
    event = parse_server_message(message(
        "conversation_initiation_metadata",
        conversation_initiation_metadata_event={"conversation_id": "conv_1",
                                                "agent_output_audio_format": "ulaw_8000",
                                                "user_input_audio_format": "pcm_16000"}))
    assert event == Metadata("conv_1", "pcm_16000", "ulaw_8000")


def test_metadata_without_formats_means_the_default():
    event = parse_server_message(message("conversation_initiation_metadata",
                                         conversation_initiation_metadata_event={}))
    assert event == Metadata("", "pcm_16000", "pcm_16000")


def test_audio_is_decoded_from_base64():
    raw = bytes(range(256))
    event = parse_server_message(message("audio", audio_event={
        "audio_base_64": base64.b64encode(raw).decode(), "event_id": 7,
        "alignment": {"chars": ["a"]}}))
    assert event == Audio(raw, 7)


@pytest.mark.parametrize("event_id", ["12", 12])
def test_event_ids_may_be_integers_or_digit_strings(event_id):
    event = parse_server_message(message("interruption",
                                         interruption_event={"event_id": event_id}))
    assert event == Interruption(12)


def test_ping_and_its_pong():
    event = parse_server_message(message("ping", ping_event={"event_id": 5, "ping_ms": 40}))
    assert event == Ping(5, 40)
    assert parse_server_message(message("ping", ping_event={"event_id": 6})) == Ping(6, None)
    assert json.loads(pong(5)) == {"type": "pong", "event_id": 5}


def test_client_tool_call():
    event = parse_server_message(message("client_tool_call", client_tool_call={
        "tool_name": "transfer_call", "tool_call_id": "t1",
        "parameters": {"destination": "sales"}}))
    assert event == ToolCall("transfer_call", "t1", {"destination": "sales"})
    bare = parse_server_message(message("client_tool_call", client_tool_call={
        "tool_name": "end_call", "tool_call_id": "t2"}))
    assert bare == ToolCall("end_call", "t2", {})


def test_transcripts_are_stripped_and_bounded():
    said = parse_server_message(message("user_transcript", user_transcription_event={
        "user_transcript": "  I need help.  "}))
    assert said == UserTranscript("I need help.")
    long = parse_server_message(message("agent_response", agent_response_event={
        "agent_response": "x" * 10_000}))
    assert long == AgentResponse("x" * MAX_TRANSCRIPT_CHARS)


@pytest.mark.parametrize("shape", [
    {"agent_response_correction_event": {"original_agent_response": "Hello there, how",
                                         "corrected_agent_response": "Hello there"}},
    {"correction_event": {"corrected_response": "Hello there"}},  # the AsyncAPI file's shape
])
def test_corrections_in_either_documented_shape(shape):
    event = parse_server_message(message("agent_response_correction", **shape))
    assert event == AgentResponseCorrection("Hello there")


@pytest.mark.parametrize("kind", ["vad_score", "internal_tentative_agent_response",
                                  "agent_chat_response_part", "brand_new_event"])
def test_other_and_unknown_types_are_not_errors(kind):
    assert parse_server_message(message(kind, whatever={"x": [1, 2]})) == OtherMessage(kind)


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON"),
    ("[1, 2]", "breaks its protocol"),
    ('{"no_type": 1}', "breaks its protocol"),
    ('{"type": 7}', "breaks its protocol"),
    (message("audio"), "without audio_event"),
    (message("audio", audio_event={"audio_base_64": "!!not base64!!", "event_id": 1}),
     "breaks its protocol"),
    (message("audio", audio_event={"audio_base_64": "AAAA"}), "breaks its protocol"),
    (message("ping", ping_event={"event_id": "12a"}), "not an integer"),
    (message("ping", ping_event={"event_id": -1}), "negative"),
    (message("ping", ping_event={"event_id": "9" * 40}), "not an integer"),
    (message("ping"), "without ping_event"),
    (message("interruption", interruption_event={}), "breaks its protocol"),
    (message("client_tool_call", client_tool_call={"tool_name": "", "tool_call_id": "x"}),
     "tool_name"),
    (message("client_tool_call", client_tool_call={"tool_name": "t", "tool_call_id": ""}),
     "tool_call_id"),
    (message("client_tool_call", client_tool_call={"tool_name": "t" * 5000,
                                                    "tool_call_id": "x"}), "tool_name"),
    (message("client_tool_call", client_tool_call={"tool_name": "t", "tool_call_id": "x",
                                                   "parameters": [1]}), "breaks its protocol"),
    (message("user_transcript", user_transcription_event={"user_transcript": 5}),
     "breaks its protocol"),
    (message("agent_response_correction"), "without its event"),
    ('{"type": "client_tool_call", "client_tool_call": {"tool_name": "t", "tool_call_id": "i",'
     ' "parameters": {"a": ' + "[" * 5000 + "]" * 5000 + "}}}", "nested too deeply"),
])
def test_malformed_messages_are_protocol_errors(text, says):
    with pytest.raises(ProtocolError, match=says):
        parse_server_message(text)


@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_protocol_error(text):
    with contextlib.suppress(ProtocolError):
        parse_server_message(text)


@given(st.dictionaries(st.sampled_from(["type", "audio_event", "ping_event",
                                        "interruption_event", "client_tool_call",
                                        "user_transcription_event"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=12), inner,
                                                      max_size=3), max_leaves=8)))
def test_any_json_object_parses_or_is_a_protocol_error(obj):
    with contextlib.suppress(ProtocolError):
        parse_server_message(json.dumps(obj))


# -- client messages --------------------------------------------------------------------------


def test_initiation_message_carries_the_calls_facts_and_the_override():
    variables = dynamic_variables(
        call_sid="CA1", from_number="+15550001", to_number="+15550002",
        parameters={"from": "+15550001", "to": "+15550002", "tier": "gold",
                    "call_sid": "spoofed", "system__caller_id": "reserved"})
    assert variables == {"tier": "gold", "call_sid": "CA1", "caller_number": "+15550001",
                         "called_number": "+15550002"}
    sent = json.loads(initiation_message(variables, {"agent": {"language": "de"}}))
    assert sent == {"type": "conversation_initiation_client_data",
                    "dynamic_variables": variables,
                    "conversation_config_override": {"agent": {"language": "de"}}}
    assert "conversation_config_override" not in json.loads(initiation_message(variables, {}))


def test_many_parameters_are_bounded():
    variables = dynamic_variables(call_sid="CA1", from_number="", to_number="",
                                  parameters={f"p{i}": str(i) for i in range(500)})
    assert len(variables) == 64 + 3


@given(st.binary(max_size=2000))
def test_user_audio_chunk_is_the_documented_json(data):
    text = user_audio_chunk(data)
    assert json.loads(text) == {"user_audio_chunk": base64.b64encode(data).decode()}
    assert text == json.dumps({"user_audio_chunk": base64.b64encode(data).decode()},
                              separators=(",", ":"))


def test_other_client_messages():
    assert json.loads(client_tool_result("t1", "done")) == {
        "type": "client_tool_result", "tool_call_id": "t1", "result": "done", "is_error": False}
    assert json.loads(client_tool_result("t1", "no", is_error=True))["is_error"] is True
    assert json.loads(user_message('1 "2"')) == {"type": "user_message", "text": '1 "2"'}
    assert json.loads(contextual_update("x")) == {"type": "contextual_update", "text": "x"}


# -- tools and notices ------------------------------------------------------------------------

MESSAGES = ElevenLabsMessages("transfer_call", "send_dtmf", "end_call",
                              "The caller pressed {digits} on the keypad.")


def test_transfer_tool_waits_for_its_outcome():
    answer = MESSAGES.tool(ToolCall("transfer_call", "t1", {"destination": "sales",
                                                            "announce": "One moment."}))
    assert answer.event == TransferRequested("sales", "One moment.")
    assert answer.result is None  # answered once voxd knows
    text, is_error = MESSAGES.transfer_outcome(TransferRefused("sales", "not allowed"))
    assert is_error and "not made: not allowed" in text
    text, is_error = MESSAGES.transfer_outcome(Transferred("sales"))
    assert not is_error and "transferred to sales" in text


def test_transfer_without_a_destination_is_the_default():
    answer = MESSAGES.tool(ToolCall("transfer_call", "t1", {"destination": 5}))
    assert answer.event == TransferRequested("", "")


def test_dtmf_tool_presses_keys_and_says_why_not():
    answer = MESSAGES.tool(ToolCall("send_dtmf", "t1", {"digits": "12#"}))
    assert answer.event == DigitsRequested("12#") and not answer.is_error and answer.result
    bad = MESSAGES.tool(ToolCall("send_dtmf", "t2", {"digits": "12x"}))
    assert bad.event == DigitsRequested("12x") and bad.is_error
    assert "character 3" in (bad.result or "") and "12x" not in (bad.result or "")


def test_end_call_tool_ends_the_call():
    answer = MESSAGES.tool(ToolCall("end_call", "t1", {}))
    assert answer.event == AssistantEnded("elevenlabs:end-call-tool") and not answer.is_error


def test_unknown_tools_are_answered_as_errors():
    answer = MESSAGES.tool(ToolCall("book_flight", "t1", {}))
    assert answer.event is None and answer.is_error and "book_flight" in (answer.result or "")


def test_a_tool_named_empty_is_no_tool():
    messages = ElevenLabsMessages("", "send_dtmf", "end_call", "{digits}")
    assert messages.tool(ToolCall("", "t1", {})).event is None


def test_notices():
    keys = json.loads(MESSAGES.notice(KeypadEntry("123#")) or "")
    assert keys == {"type": "user_message", "text": "The caller pressed 1 2 3 # on the keypad."}
    refused = json.loads(MESSAGES.notice(TransferRefused("x", "busy")) or "")
    assert refused["type"] == "contextual_update" and "busy" in refused["text"]
    machine = json.loads(MESSAGES.notice(AnsweredBy("machine_end_beep")) or "")
    assert machine["type"] == "contextual_update" and "leave your message" in machine["text"]
    odd = json.loads(MESSAGES.notice(AnsweredBy("martian")) or "")
    assert "not known" in odd["text"]
    assert MESSAGES.notice(Transferred("sales")) is None


# -- the signed URL ---------------------------------------------------------------------------


def test_signed_url_answer():
    url = parse_signed_url_response(200, b'{"signed_url": "wss://x/v1/convai/conversation?'
                                         b'agent_id=a&conversation_signature=s"}')
    assert url.url.startswith("wss://") and "signature" not in repr(url)


@pytest.mark.parametrize("status, body, retryable, says", [
    (401, b'{"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}', False,
     "rejected the API key (HTTP 401: Invalid API key): check ELEVENLABS_API_KEY"),
    (404, b'{"detail": "Agent not found"}', False, "HTTP 404: Agent not found"),
    (422, b'{"detail": [{"msg": "field required"}]}', False, "field required"),
    (429, b"", True, "unavailable (HTTP 429)"),
    (503, b"<html>", True, "unavailable (HTTP 503)"),
    (200, b'{"signed_url": "https://not-a-socket"}', False, "no WebSocket URL"),
    (200, b"{}", False, "not what its API documents"),
    (200, b"[[[", False, "not what its API documents"),
])
def test_signed_url_failures(status, body, retryable, says):
    with pytest.raises(SignedUrlError) as info:
        parse_signed_url_response(status, body)
    assert info.value.retryable is retryable
    assert says in str(info.value)


# -- audio formats ----------------------------------------------------------------------------


def test_unknown_formats_are_refused_with_advice():
    assert check_format("pcm_24000") == "pcm_24000"
    with pytest.raises(UpstreamError, match="ulaw_8000"):
        check_format("mp3_44100")


def tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def test_same_formats_pass_through():
    assert converter("ulaw_8000", "ulaw_8000") is None
    assert converter("pcm_16000", "pcm_16000") is None


def test_mulaw_to_pcm_8000_is_exact():
    ulaw = pcm16_to_ulaw(tone(8000).tobytes())
    conv = converter("ulaw_8000", "pcm_8000")
    assert conv is not None
    assert conv.process(ulaw) == ulaw_to_pcm16(ulaw)


def chunked(conv, data: bytes, size: int) -> bytes:
    return b"".join(conv.process(data[i:i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("source, target", [
    ("ulaw_8000", "pcm_16000"), ("pcm_16000", "ulaw_8000"), ("pcm_8000", "pcm_16000"),
    ("pcm_16000", "pcm_8000"), ("pcm_16000", "pcm_24000"), ("pcm_24000", "pcm_16000"),
    ("pcm_44100", "ulaw_8000"), ("ulaw_8000", "pcm_22050"), ("pcm_48000", "pcm_16000"),
])
def test_conversions_keep_the_signal(source, target):
    """A tone streamed through in 20 ms chunks (odd-sized for s16le, to test the carry)
    comes out at the target rate with its frequency and level."""
    src_encoding, src_rate = FORMATS[source]
    dst_encoding, dst_rate = FORMATS[target]
    signal = tone(src_rate, 1.0).tobytes()
    data = pcm16_to_ulaw(signal) if src_encoding == "ulaw" else signal
    conv = converter(source, target)
    assert conv is not None and source in conv.description
    size = src_rate // 50 * (1 if src_encoding == "ulaw" else 2) + (0 if src_encoding == "ulaw"
                                                                    else 1)
    out = chunked(conv, data, size)
    samples = (np.frombuffer(ulaw_to_pcm16(out), np.int16) if dst_encoding == "ulaw"
               else np.frombuffer(out, "<i2"))
    assert abs(len(samples) - dst_rate) < dst_rate * 0.15  # at most ~150 ms held back
    middle = samples[len(samples) // 4: 3 * len(samples) // 4].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    peak_hz = np.argmax(spectrum) * dst_rate / len(middle)
    assert abs(peak_hz - 440) < 10
    rms = np.sqrt(np.mean(middle**2))
    assert 8000 / np.sqrt(2) * 0.9 < rms < 8000 / np.sqrt(2) * 1.1


def test_msgspec_is_the_decoder():
    """The module keeps to msgspec (no json.loads per audio message)."""
    assert isinstance(parse_server_message(msgspec.json.encode(
        {"type": "audio", "audio_event": {"audio_base_64": "AAA=", "event_id": 1}})), Audio)

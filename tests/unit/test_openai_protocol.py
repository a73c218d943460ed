"""OpenAI Realtime's protocol, sans-I/O: the client messages voxd builds, every server event it
reads (and the malformed, oversized and unknown ones), what the caller heard, and 16 <-> 24 kHz."""

from __future__ import annotations

import base64
import contextlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxd.errors import ProtocolError
from voxd.providers.base import MAX_TRANSCRIPT_CHARS
from voxd.providers.openai_protocol import (
    MAX_ARGUMENTS_CHARS,
    RESPONSE_CANCEL,
    RESPONSE_CREATE,
    AssistantTranscript,
    AudioDelta,
    FunctionCall,
    Other,
    ResponseCreated,
    ResponseDone,
    ServerError,
    SpeechStarted,
    SpeechStopped,
    Spoken,
    ToolSet,
    UserTranscript,
    append_audio,
    function_call_output,
    parse_event,
    realtime_url,
    session_update,
    system_text,
    truncate,
    user_text,
)


def event(**fields: object) -> str:
    return json.dumps(fields)


# -- client messages --


def test_the_url_carries_the_model_and_nothing_else():
    assert realtime_url("wss://api.openai.com", "gpt-realtime") == \
        "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert realtime_url("ws://127.0.0.1:9/", "a b&c") == \
        "ws://127.0.0.1:9/v1/realtime?model=a%20b%26c"


@pytest.mark.parametrize("chunk", [b"", b"\x00\xff" * 80, bytes(range(256))])
def test_audio_append_is_the_documented_event(chunk):
    message = json.loads(append_audio(chunk))
    assert message == {"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(chunk).decode()}


def update(**overrides):
    arguments = dict(audio="mulaw", model="gpt-realtime", voice="marin",
                     instructions="Be brief.", turn_detection={"type": "server_vad"},
                     tools=ToolSet())
    arguments.update(overrides)
    return json.loads(session_update(**arguments))


def test_session_update_is_the_ga_shape_with_mu_law_both_ways():
    message = update()
    assert message["type"] == "session.update"
    session = message["session"]
    assert session["type"] == "realtime" and session["model"] == "gpt-realtime"
    assert session["output_modalities"] == ["audio"]
    assert session["instructions"] == "Be brief."
    assert session["audio"] == {
        "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}}
    assert [t["name"] for t in session["tools"]] == ["transfer_call", "send_dtmf", "end_call"]
    assert session["tool_choice"] == "auto"
    assert all(t["type"] == "function" and t["parameters"]["type"] == "object"
               for t in session["tools"])


def test_pcm_is_24_khz_and_turn_detection_can_be_off_and_transcription_on():
    session = update(audio="pcm16", turn_detection=None,
                     transcription_model="gpt-4o-mini-transcribe")["session"]
    assert session["audio"]["input"] == {
        "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
        "transcription": {"model": "gpt-4o-mini-transcribe"}}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}


def test_tools_named_empty_are_left_out_and_extra_tools_added_without_clashes():
    extra = [{"type": "function", "name": "end_call", "parameters": {}},
             {"type": "mcp", "name": "lookup", "server_url": "https://mcp.example.com"}]
    session = update(tools=ToolSet(transfer="handoff", dtmf="", end_call="end_call"),
                     extra_tools=extra, destinations=["sales", ""])["session"]
    names = [t["name"] for t in session["tools"]]
    assert names == ["handoff", "end_call", "lookup"]
    transfer = session["tools"][0]["parameters"]["properties"]["destination"]
    assert transfer["enum"] == ["sales", ""]
    assert "tools" not in update(tools=ToolSet("", "", ""))["session"]


def test_truncate_output_and_messages():
    assert json.loads(truncate("item_1", 1234)) == {
        "type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0,
        "audio_end_ms": 1234}
    assert json.loads(truncate("item_1", -5))["audio_end_ms"] == 0
    assert json.loads(function_call_output("call_1", "done")) == {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": "call_1", "output": "done"}}
    for build, role in ((user_text, "user"), (system_text, "system")):
        assert json.loads(build('say "1"\n')) == {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": role,
                     "content": [{"type": "input_text", "text": 'say "1"\n'}]}}
    assert json.loads(RESPONSE_CREATE) == {"type": "response.create"}
    assert json.loads(RESPONSE_CANCEL) == {"type": "response.cancel"}


# -- server events --


@pytest.mark.parametrize("name", ["response.output_audio.delta", "response.audio.delta"])
def test_audio_deltas_ga_and_beta(name):
    parsed = parse_event(event(type=name, event_id="e", item_id="item_1", response_id="r",
                               output_index=0, content_index=0,
                               delta=base64.b64encode(b"\x01\x02\x03").decode()))
    assert parsed == AudioDelta("item_1", b"\x01\x02\x03")


@pytest.mark.parametrize("fields", [
    {"delta": "not base64!!", "item_id": "i"},
    {"delta": "QUJD", "item_id": None},
    {"item_id": "i"},
    {"delta": 5, "item_id": "i"},
    {"delta": "QUJD", "item_id": "i" * 201},
])
def test_malformed_audio_deltas_are_protocol_errors(fields):
    with pytest.raises(ProtocolError):
        parse_event(event(type="response.output_audio.delta", **fields))


def test_speech_edges():
    assert parse_event(event(type="input_audio_buffer.speech_started", audio_start_ms=1000,
                             item_id="item_u")) == SpeechStarted("item_u")
    assert parse_event(event(type="input_audio_buffer.speech_stopped", audio_end_ms=2000,
                             item_id="item_u")) == SpeechStopped("item_u")
    assert parse_event(event(type="input_audio_buffer.speech_started")) == SpeechStarted("")


def test_function_calls_decode_their_json_string_arguments():
    parsed = parse_event(event(type="response.function_call_arguments.done", call_id="call_1",
                               name="transfer_call", item_id="i", output_index=0,
                               response_id="r",
                               arguments=json.dumps({"destination": "sales"})))
    assert parsed == FunctionCall("call_1", "transfer_call", {"destination": "sales"})
    for arguments in ("", "not json", "[1, 2]", '"text"'):
        parsed = parse_event(event(type="response.function_call_arguments.done",
                                   call_id="c", name="end_call", arguments=arguments))
        assert parsed == FunctionCall("c", "end_call", {})


def test_function_calls_without_ids_or_with_huge_arguments_are_protocol_errors():
    with pytest.raises(ProtocolError, match="call_id"):
        parse_event(event(type="response.function_call_arguments.done", name="x",
                          arguments="{}"))
    with pytest.raises(ProtocolError, match="name"):
        parse_event(event(type="response.function_call_arguments.done", call_id="c",
                          arguments="{}"))
    with pytest.raises(ProtocolError, match="arguments over"):
        parse_event(event(type="response.function_call_arguments.done", call_id="c",
                          name="x", arguments=" " * (MAX_ARGUMENTS_CHARS + 1)))


@pytest.mark.parametrize("name", ["response.output_audio_transcript.done",
                                  "response.audio_transcript.done"])
def test_assistant_transcripts_are_cut(name):
    parsed = parse_event(event(type=name, item_id="i", transcript="x" * 5000))
    assert parsed == AssistantTranscript("x" * MAX_TRANSCRIPT_CHARS)


def test_caller_transcripts():
    parsed = parse_event(event(type="conversation.item.input_audio_transcription.completed",
                               item_id="i", content_index=0, transcript="hello",
                               usage={"type": "duration", "seconds": 1.0}))
    assert parsed == UserTranscript("hello")
    with pytest.raises(ProtocolError, match="without transcript"):
        parse_event(event(type="conversation.item.input_audio_transcription.completed"))


def test_responses_and_errors():
    assert parse_event(event(type="response.created", response={"id": "r"})) == \
        ResponseCreated()
    assert parse_event(event(type="response.done", response={
        "id": "r", "status": "cancelled", "output": [{"huge": "x"}]})) == \
        ResponseDone("cancelled")
    assert parse_event(event(type="response.done")) == ResponseDone("")
    fatal = parse_event(event(type="error", event_id="e", error={
        "type": "invalid_request_error", "code": "session_expired",
        "message": "Your session hit the maximum duration of 60 minutes.", "param": None}))
    assert fatal == ServerError("invalid_request_error", "session_expired",
                                "Your session hit the maximum duration of 60 minutes.", True)
    mild = parse_event(event(type="error", error={"type": "invalid_request_error",
                                                  "code": "response_cancel_not_active",
                                                  "message": "m" * 1000}))
    assert isinstance(mild, ServerError) and not mild.fatal and len(mild.message) == 300
    assert parse_event(event(type="error")) == ServerError("", "", "", False)


def test_unknown_events_are_other_whatever_their_fields():
    assert parse_event(event(type="session.created", session={"x": 1})) == \
        Other("session.created")
    # fields voxd reads elsewhere may have any shape in an event it does not know
    assert parse_event(event(type="response.brand_new", delta={"a": 1}, error=[1])) == \
        Other("response.brand_new")
    assert parse_event(event(type="t" * 500)) == Other("t" * 80)


@pytest.mark.parametrize("text", ["", "not json", "[1]", '{"no_type": 1}', '{"type": 5}',
                                  "[" * 5000, '{"type": "error", "error": "text"}',
                                  '{"type": "response.done", "response": 3}'])
def test_malformed_frames_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        parse_event(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.dictionaries(st.sampled_from(["type", "delta", "item_id", "call_id",
                                                  "name", "arguments", "transcript", "error",
                                                  "response"]),
                                 st.one_of(st.none(), st.integers(), st.text(max_size=40),
                                           st.sampled_from([
                                               "response.output_audio.delta", "error",
                                               "response.function_call_arguments.done",
                                               "response.done"])),
                                 max_size=6).map(json.dumps)))
def test_any_frame_is_an_event_or_a_protocol_error(text):
    with contextlib.suppress(ProtocolError):
        parse_event(text)


# -- what the caller heard --


def test_heard_time_maps_to_the_item_playing_then_clamped_to_what_arrived():
    spoken = Spoken(bytes_per_ms=8)
    spoken.audio("a", 8 * 400, now=0.0)  # 400 ms of item a
    spoken.audio("b", 8 * 300, now=0.05)  # then 300 ms of item b, back to back
    assert spoken.locate(250) == ("a", 250)
    assert spoken.locate(400) == ("a", 400)
    assert spoken.locate(450) == ("b", 50)
    assert spoken.locate(5000) == ("b", 300)  # never beyond what arrived for b
    assert spoken.locate(-3) == ("a", 0)


def test_a_pause_starts_a_new_turn_and_items_keep_their_offsets():
    spoken = Spoken(bytes_per_ms=48)
    spoken.audio("a", 48 * 200, now=0.0)  # plays until 0.2
    spoken.audio("a", 48 * 200, now=0.1)  # more of a, still the same turn (plays to 0.4)
    assert spoken.locate(300) == ("a", 300)
    spoken.audio("b", 48 * 100, now=1.0)  # after a pause: a new turn
    assert spoken.turn_started == 1.0
    assert spoken.locate(50) == ("b", 50)
    assert spoken.play_end == pytest.approx(1.1)


def test_after_an_interruption_the_next_audio_is_a_new_turn():
    spoken = Spoken(bytes_per_ms=8)
    assert spoken.locate(100) is None
    spoken.audio("a", 8 * 1000, now=0.0)
    spoken.interrupted(now=0.3)
    spoken.audio("a", 8 * 100, now=0.31)  # in flight when the caller cut in
    assert spoken.turn_started == 0.31
    assert spoken.locate(50) == ("a", 1050)  # the new turn starts 1000 ms into a


def test_items_remembered_are_bounded():
    spoken = Spoken(bytes_per_ms=8)
    for i in range(200):
        spoken.audio(f"i{i}", 8, now=float(i))
    assert len(spoken.received_ms) <= Spoken.MAX_ITEMS


def test_decoding_is_typed_not_dicts():
    # the flat decode skips what voxd does not read: a big session.created costs little
    big = event(type="session.created", session={"instructions": "x" * 100_000})
    assert isinstance(parse_event(big), Other)
    assert msgspec.json.decode(append_audio(b"\x00"))["audio"] == "AA=="

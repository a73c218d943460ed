"""Deepgram's Voice Agent protocol, sans-I/O: the Settings voxd builds, every server message
parsed (well-formed, malformed, oversized, unknown), the client messages, and how function
calls and notices map to voxd's events and Deepgram's messages."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.config import DeepgramConfig
from voxd.errors import ProtocolError, UpstreamError
from voxd.providers.base import (
    MAX_TRANSCRIPT_CHARS,
    AnsweredBy,
    AssistantEnded,
    AssistantInterrupted,
    DigitsRequested,
    KeypadEntry,
    StageLatency,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.deepgram import DeepgramAssistant
from voxd.providers.deepgram_protocol import (
    AUDIO,
    DEFAULT_AGENT,
    KEEP_ALIVE,
    AgentAudioDone,
    AgentError,
    AgentStartedSpeaking,
    AgentWarning,
    ConversationText,
    FunctionCall,
    FunctionCallCancelled,
    FunctionCallRequest,
    LatencyReport,
    OtherMessage,
    SettingsApplied,
    UserStartedSpeaking,
    Welcome,
    function_call_response,
    function_definitions,
    inject_user_message,
    parse_server,
    settings_body,
    settings_message,
    stages,
    transcript,
    update_prompt,
)

FUNCTIONS = function_definitions("transfer_call", "send_dtmf", "end_call", ["sales", "support"])


def msg(**fields: Any) -> str:
    return json.dumps(fields)


# -- Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("audio", ["mulaw", "pcm16"])
def test_settings_take_the_operators_body_and_voxd_sets_the_audio(audio):
    operator = {"tags": ["voxd"], "audio": {"input": {"encoding": "opus"}},
                "agent": {"greeting": "Hello!",
                          "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
                          "think": {"provider": {"type": "open_ai", "model": "gpt-4o"},
                                    "prompt": "Be brief."},
                          "speak": {"provider": {"type": "deepgram",
                                                 "model": "aura-2-thalia-en"}}}}
    body = settings_body(operator, audio, FUNCTIONS)
    assert body["type"] == "Settings" and body["tags"] == ["voxd"]
    assert body["audio"] == AUDIO[audio]
    if audio == "mulaw":
        assert body["audio"] == {
            "input": {"encoding": "mulaw", "sample_rate": 8000},
            "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}}
    else:
        assert body["audio"]["input"] == {"encoding": "linear16", "sample_rate": 16000}
        assert body["audio"]["output"]["sample_rate"] == 16000
    assert body["agent"]["greeting"] == "Hello!"
    assert body["agent"]["think"]["prompt"] == "Be brief."
    assert [f["name"] for f in body["agent"]["think"]["functions"]] == \
        ["transfer_call", "send_dtmf", "end_call"]
    assert "functions" not in operator["agent"]["think"]  # the operator's config is untouched
    assert operator["audio"] == {"input": {"encoding": "opus"}}
    assert json.loads(settings_message(body)) == body


def test_settings_default_the_agents_parts_that_are_left_out():
    body = settings_body({}, "mulaw", [])
    assert set(body) == {"type", "audio", "agent"}
    assert body["agent"] == DEFAULT_AGENT
    assert body["agent"] is not DEFAULT_AGENT and "functions" not in body["agent"]["think"]
    partial = settings_body({"agent": {"speak": {"provider": {"type": "cartesia"}}}}, "mulaw",
                            FUNCTIONS)
    assert partial["agent"]["speak"] == {"provider": {"type": "cartesia"}}
    assert partial["agent"]["listen"] == DEFAULT_AGENT["listen"]
    assert len(partial["agent"]["think"]["functions"]) == 3
    assert "functions" not in DEFAULT_AGENT["think"]


def test_functions_go_to_every_think_provider_and_the_operators_own_one_wins():
    mine = {"name": "end_call", "description": "Hang up.", "parameters": {"type": "object"}}
    weather = {"name": "get_weather", "endpoint": {"url": "https://example.com/w"}}
    think = [{"provider": {"type": "open_ai"}, "functions": [mine, weather]},
             {"provider": {"type": "anthropic"}}]
    body = settings_body({"agent": {"think": think}}, "mulaw", FUNCTIONS)
    first, fallback = body["agent"]["think"]
    assert [f["name"] for f in first["functions"]] == \
        ["end_call", "get_weather", "transfer_call", "send_dtmf"]
    assert first["functions"][0] == mine  # as the operator wrote it
    assert [f["name"] for f in fallback["functions"]] == \
        ["transfer_call", "send_dtmf", "end_call"]


def test_an_agent_given_by_id_is_sent_as_it_is():
    body = settings_body({"agent": "agent-1234"}, "pcm16", FUNCTIONS)
    assert body["agent"] == "agent-1234" and body["audio"] == AUDIO["pcm16"]


def test_voxds_functions_are_client_side_deferred_to_the_turns_end_and_can_be_left_out():
    transfer, dtmf, end = FUNCTIONS
    for function in FUNCTIONS:
        assert "endpoint" not in function  # no endpoint: Deepgram asks the client to run it
        assert function["defer_until_eot"] is True
        assert function["parameters"]["type"] == "object"
    assert transfer["parameters"]["required"] == ["destination"]
    assert "one of: sales, support" in transfer["parameters"]["properties"]["destination"][
        "description"]
    assert set(transfer["parameters"]["properties"]) == {"destination", "announce"}
    assert dtmf["parameters"]["required"] == ["digits"]
    assert end["parameters"]["properties"] == {}
    assert [f["name"] for f in function_definitions("", "keys", "")] == ["keys"]
    assert function_definitions("", "", "") == []


# -- client messages --------------------------------------------------------------------------


def test_client_messages_are_what_deepgram_documents():
    assert json.loads(KEEP_ALIVE) == {"type": "KeepAlive"}
    assert json.loads(function_call_response("fc_1", "send_dtmf", "done")) == \
        {"type": "FunctionCallResponse", "id": "fc_1", "name": "send_dtmf", "content": "done"}
    assert json.loads(inject_user_message('1 "2" #')) == \
        {"type": "InjectUserMessage", "content": '1 "2" #'}
    assert json.loads(update_prompt("note\n")) == {"type": "UpdatePrompt", "prompt": "note\n"}


# -- server messages --------------------------------------------------------------------------


def test_every_server_event_is_parsed():
    assert parse_server(msg(type="Welcome", request_id="r-1")) == Welcome("r-1")
    assert parse_server(msg(type="SettingsApplied")) == SettingsApplied()
    assert parse_server(msg(type="AgentAudioDone")) == AgentAudioDone()
    assert parse_server(msg(type="UserStartedSpeaking")) == UserStartedSpeaking()
    assert parse_server(msg(type="ConversationText", role="user", content="hi")) == \
        ConversationText("user", "hi")
    assert parse_server(msg(type="AgentStartedSpeaking", total_latency=1, tts_latency=0.2,
                            ttt_latency=0.5)) == AgentStartedSpeaking(1.0, 0.2, 0.5)
    assert parse_server(msg(type="LatencyReport", ttt_text_latency=0.3)) == \
        LatencyReport(ttt_text_latency=0.3)
    assert parse_server(msg(type="Error", description="bad", code="X")) == AgentError("X", "bad")
    assert parse_server(msg(type="Warning", description="meh", code="W")) == \
        AgentWarning("W", "meh")
    request = parse_server(msg(type="FunctionCallRequest", functions=[
        {"id": "fc_1", "name": "send_dtmf", "arguments": '{"digits": "12#"}',
         "client_side": True, "thought_signature": "sig"},
        {"id": "fc_2", "name": "lookup", "arguments": "", "client_side": False}]))
    assert request == FunctionCallRequest((
        FunctionCall("fc_1", "send_dtmf", {"digits": "12#"}, True),
        FunctionCall("fc_2", "lookup", {}, False)))
    for kind in ("AgentThinking", "PromptUpdated", "SpeakUpdated",
                 "InjectionRefused", "History", "BrandNew"):
        assert parse_server(msg(type=kind, content="x")) == OtherMessage(kind)


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"no": "type"}', '{"type": 7}', "[" * 5000 + "]" * 5000,
    msg(type="ConversationText", role="user"),
    msg(type="ConversationText", role="user", content=5),
    msg(type="AgentStartedSpeaking", total_latency="fast"),
    msg(type="Error", description=["x"]),
    msg(type="Welcome", request_id=None),
    msg(type="FunctionCallRequest"),
    msg(type="FunctionCallRequest", functions={"id": "1"}),
    msg(type="FunctionCallRequest", functions=["call"]),
    msg(type="FunctionCallRequest", functions=[{"id": "1", "arguments": "{}"}]),
    msg(type="FunctionCallRequest", functions=[{"id": "1", "name": "x", "client_side": "yes"}]),
    msg(type="FunctionCallRequest", functions=[{"id": "1" * 2000, "name": "x"}]),
])
def test_malformed_messages_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        parse_server(text)


def test_oversized_strings_are_cut():
    said = parse_server(msg(type="ConversationText", role="assistant", content="x" * 10**5))
    assert isinstance(said, ConversationText)
    assert len(said.content) == MAX_TRANSCRIPT_CHARS
    error = parse_server(msg(type="Error", description="y" * 10**5, code="z" * 1000))
    assert isinstance(error, AgentError) and len(error.description) <= 300
    assert len(error.code) <= 80
    other = parse_server(msg(type="T" * 1000))
    assert isinstance(other, OtherMessage) and len(other.type) <= 80


def test_function_arguments_that_are_not_an_object_are_flagged_not_fatal():
    def call(arguments: str) -> FunctionCall:
        parsed = parse_server(msg(type="FunctionCallRequest", functions=[
            {"id": "1", "name": "f", "arguments": arguments, "client_side": True}]))
        assert isinstance(parsed, FunctionCallRequest)
        return parsed.functions[0]

    assert call('{"a": 1}').arguments_ok
    assert call("").arguments == {} and call("").arguments_ok
    for bad in ("[1]", "nope", '"text"', "{" * 3000, '{"a": "' + "x" * 20000 + '"}'):
        assert not call(bad).arguments_ok and call(bad).arguments == {}


def test_at_most_sixteen_function_calls_are_taken_from_one_request():
    functions = [{"id": str(i), "name": "f", "arguments": "{}", "client_side": True}
                 for i in range(100)]
    parsed = parse_server(msg(type="FunctionCallRequest", functions=functions))
    assert isinstance(parsed, FunctionCallRequest) and len(parsed.functions) == 16


def test_transcripts_are_the_callers_and_the_agents_only():
    assert transcript(ConversationText("user", "hello")) == ("user", "hello")
    assert transcript(ConversationText("assistant", "hi")) == ("assistant", "hi")
    assert transcript(ConversationText("system", "x")) is None
    assert transcript(ConversationText("user", "")) is None


def test_latency_maps_onto_voxds_stages_and_no_turn_counts_twice():
    started = AgentStartedSpeaking(total_latency=1.2, tts_latency=0.3, ttt_latency=0.5)
    assert stages(started) == (StageLatency("total", 1.2), StageLatency("first_token", 0.5),
                               StageLatency("first_audio", 0.3))
    report = LatencyReport(stt_latency=0.2, ttt_token_latency=0.4, ttt_text_latency=0.45,
                           tts_latency=0.3, total_latency=1.2)
    assert stages(report, turn_reported=True) == (StageLatency("transcript", 0.2),)
    assert stages(report) == (StageLatency("transcript", 0.2), StageLatency("total", 1.2),
                              StageLatency("first_token", 0.45),
                              StageLatency("first_audio", 0.3))
    assert stages(LatencyReport(ttt_token_latency=0.4)) == (StageLatency("first_token", 0.4),)
    assert stages(AgentStartedSpeaking(0.0, 0.0, 0.0)) == ()  # a greeting: no caller turn
    assert stages(AgentStartedSpeaking(-1.0, 1e9, None)) == ()
    assert stages(LatencyReport(), turn_reported=True) == ()


# -- what voxd does with them (the session's mapping, no socket involved) ---------------------


def session(**config: Any) -> DeepgramAssistant:
    return DeepgramAssistant(None, DeepgramConfig(**config),  # type: ignore[arg-type]
                             "The caller pressed {digits} on the keypad.")


def request(*calls: tuple[str, str, dict[str, Any] | str]) -> FunctionCallRequest:
    parsed = parse_server(msg(type="FunctionCallRequest", functions=[
        {"id": i, "name": name, "client_side": True,
         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}
        for i, name, arguments in calls]))
    assert isinstance(parsed, FunctionCallRequest)
    return parsed


def answers(assistant: DeepgramAssistant) -> dict[str, str]:
    sent, assistant._outbox = assistant._outbox, []
    return {m["id"]: m["content"] for m in map(json.loads, sent)
            if m["type"] == "FunctionCallResponse"}


def test_events_map_to_voxds():
    s = session()
    assert s.translate_event(UserStartedSpeaking()) == AssistantInterrupted()
    assert s.translate_event(AgentAudioDone()) is None
    assert s.translate_event(ConversationText("user", "hi")) == Transcript("user", "hi")
    assert s.translate_event(ConversationText("robot", "hi")) is None
    assert s.translate_event(AgentWarning("W", "w")) is None
    assert s.translate_event(OtherMessage("AgentThinking")) is None
    with pytest.raises(UpstreamError, match=r"Deepgram reported an error \(X\): broke"):
        s.translate_event(AgentError("X", "broke\x1b[2J"))
    try:
        s.translate_event(AgentError("X", "broke\x1b[2J"))
    except UpstreamError as exc:
        assert "\x1b" not in str(exc)  # escaped: it ends up in a log line


def test_a_turns_latency_is_taken_once():
    s = session()
    started = AgentStartedSpeaking(1.0, 0.2, 0.4)
    report = LatencyReport(stt_latency=0.1, tts_latency=0.2, total_latency=1.0)
    assert len(s.translate_event(started)) == 3  # type: ignore[arg-type]
    assert s.translate_event(report) == (StageLatency("transcript", 0.1),)
    # a next turn reported only by a LatencyReport is taken from it
    assert s.translate_event(UserStartedSpeaking()) == AssistantInterrupted()
    assert len(s.translate_event(report)) == 3  # type: ignore[arg-type]


def test_call_control_functions_become_events_and_are_answered():
    s = session()
    events = s.translate_event(request(
        ("a", "send_dtmf", {"digits": "1w2#"}), ("b", "end_call", {}),
        ("c", "transfer_call", {"destination": "sales", "announce": "One moment."})))
    assert events == (DigitsRequested("1w2#"), AssistantEnded("deepgram:end-call-tool"),
                      TransferRequested("sales", "One moment."))
    got = answers(s)
    assert set(got) == {"a", "b"}  # the transfer is answered with its outcome, later
    assert s.notice_messages(TransferRefused("sales", "nobody there")) == [
        function_call_response("c", "transfer_call", "The transfer to sales was not made: "
                               "nobody there. Tell the caller, and carry on.")]
    assert s.notice_messages(Transferred("sales")) == []  # nothing pending any more


def test_call_control_waits_for_the_words_still_arriving():
    """Deepgram may ask for a function while the words said with it are still streaming: the
    goodbye (or the transfer's or the keys' lead-in) is heard first."""
    s = session()
    assert s.translate_event(AgentStartedSpeaking(1.0, 0.2, 0.4)) is not None
    held = s.translate_event(request(("e", "end_call", {})))
    assert held is not None and not isinstance(held, tuple)  # nothing for the call yet
    assert list(answers(s)) == ["e"]  # but Deepgram is answered at once
    assert s.translate_event(AgentAudioDone()) == (AssistantEnded("deepgram:end-call-tool"),)
    assert s.translate_event(AgentAudioDone()) is None
    # not speaking: at once
    assert s.translate_event(request(("f", "send_dtmf", {"digits": "2"}))) == \
        (DigitsRequested("2"),)


def test_what_an_interrupted_reply_asked_for_waits_for_deepgrams_word_on_it():
    s = session()
    s.translate_event(AgentStartedSpeaking(1.0, 0.2, 0.4))
    s.translate_event(request(("d", "send_dtmf", {"digits": "1"}),
                              ("t", "transfer_call", {"destination": "sales"})))
    assert s.translate_event(UserStartedSpeaking()) == AssistantInterrupted()
    cancelled = parse_server(msg(type="FunctionCallCancelled", functions=[{"id": "t"}]))
    assert cancelled == FunctionCallCancelled(("t",))
    assert s.translate_event(cancelled) is None
    # the next reply starts: what was not cancelled stands, before the reply's latency
    events = s.translate_event(AgentStartedSpeaking(1.0, 0.2, 0.4))
    assert isinstance(events, tuple) and events[0] == DigitsRequested("1")
    assert all(isinstance(e, StageLatency) for e in events[1:])
    assert s.notice_messages(TransferRefused("sales", "x")) != [] and not s._transfers
    # ids as bare strings are taken too; anything else is malformed
    assert parse_server(msg(type="FunctionCallCancelled", functions=["a", {"id": "b"}])) == \
        FunctionCallCancelled(("a", "b"))
    with pytest.raises(ProtocolError):
        parse_server(msg(type="FunctionCallCancelled", functions=[{"name": "x"}]))


def test_a_made_transfer_is_answered_when_the_caller_was_moved():
    s = session()
    assert s.translate_event(request(("t", "transfer_call", {}))) == (TransferRequested(),)
    [message] = s.notice_messages(Transferred("support"))
    assert json.loads(message) == {"type": "FunctionCallResponse", "id": "t",
                                   "name": "transfer_call",
                                   "content": "The caller was transferred to support."}


def test_functions_voxd_cannot_run_are_answered_with_an_error():
    s = session()
    nothing = s.translate_event(request(("x", "get_weather", {}),
                                        ("y", "send_dtmf", {"digits": ""}),
                                        ("z", "send_dtmf", "[not an object]")))
    assert nothing is not None and not isinstance(nothing, tuple)  # no event, but answers owed
    got = answers(s)
    assert set(got) == {"x", "y", "z"}
    assert all(content.startswith("Error") for content in got.values())
    server_side = parse_server(msg(type="FunctionCallRequest", functions=[
        {"id": "s", "name": "send_dtmf", "arguments": '{"digits": "1"}', "client_side": False}]))
    assert s.translate_event(server_side) is None and s._outbox == []


def test_tool_names_come_from_the_config_and_an_empty_one_is_not_voxds():
    s = session(transfer_tool="handoff", dtmf_tool="", end_call_tool="bye")
    assert s.translate_event(request(("1", "handoff", {"destination": "x"}))) == \
        (TransferRequested("x"),)
    assert s.translate_event(request(("2", "bye", {}))) == \
        (AssistantEnded("deepgram:end-call-tool"),)
    s.translate_event(request(("3", "send_dtmf", {"digits": "1"})))
    assert answers(s)["3"].startswith("Error")


def test_notices_are_said_as_deepgram_messages():
    s = session()
    [keys] = s.notice_messages(KeypadEntry("123#"))
    assert json.loads(keys) == {"type": "InjectUserMessage",
                                "content": "The caller pressed 1 2 3 # on the keypad."}
    [refused] = s.notice_messages(TransferRefused("", "no default"))
    assert json.loads(refused)["type"] == "UpdatePrompt"  # no transfer call to answer
    [person] = s.notice_messages(AnsweredBy("human"))
    assert json.loads(person) == {"type": "UpdatePrompt",
                                  "prompt": "The call was answered by a person."}
    context, speak_now = map(json.loads, s.notice_messages(AnsweredBy("machine_end_beep")))
    assert context["type"] == "UpdatePrompt" and "leave your message" in context["prompt"]
    assert speak_now["type"] == "InjectUserMessage"
    assert speak_now["content"].startswith("[system note]")
    [unknown] = s.notice_messages(AnsweredBy("martian"))
    assert "not known" in json.loads(unknown)["prompt"]


def test_every_client_message_is_valid_json_whatever_the_text():
    nasty = 'quote " backslash \\ newline \n nul \x00 emoji \U0001f600'
    for message in (inject_user_message(nasty), update_prompt(nasty),
                    function_call_response(nasty, nasty, nasty)):
        assert nasty in msgspec.json.decode(message).values()


@given(st.text(max_size=300))
def test_any_text_is_an_event_or_a_protocol_error(text):
    with contextlib.suppress(ProtocolError):
        parse_server(text)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=3), max_leaves=10)
_kinds = st.sampled_from(["Welcome", "SettingsApplied", "UserStartedSpeaking",
                          "ConversationText", "FunctionCallRequest", "AgentStartedSpeaking",
                          "AgentAudioDone", "LatencyReport", "Error", "Warning",
                          "FunctionCallCancelled", "Other"])


@given(_kinds, st.dictionaries(st.sampled_from(
    ["role", "content", "functions", "id", "name", "arguments", "client_side", "code",
     "description", "total_latency", "tts_latency", "ttt_latency", "stt_latency",
     "request_id"]), _json, max_size=5))
def test_any_message_of_a_known_type_is_an_event_or_a_protocol_error(kind, fields):
    with contextlib.suppress(ProtocolError, UpstreamError):
        event = parse_server(json.dumps({**fields, "type": kind}))
        session().translate_event(event)

"""Deepgram's Voice Agent API, sans-I/O: the `Settings` voxd sends, the JSON messages Deepgram
sends back as typed values, and every other client message as text.

Theory of operation (developers.deepgram.com/reference/voice-agent/voice-agent, the AsyncAPI
spec; the per-message pages under /docs/voice-agent-*):
- voxd opens `wss://agent.deepgram.com/v1/agent/converse` with `Authorization: Token <key>`;
  Deepgram says `Welcome {request_id}`; voxd sends `Settings` at once (audio formats, the
  agent's listen/think/speak providers, prompt, greeting, functions); Deepgram answers
  `SettingsApplied`, or `Error {code, description}` (fatal: the session is over).
- Audio then goes both ways as binary frames of raw samples (no JSON, no base64): mu-law
  8 kHz both ways (container "none") for `assistant.audio = "mulaw"`, linear16 16 kHz for
  `pcm16`. Nothing here touches audio.
- `UserStartedSpeaking`: the caller talks; Deepgram drops its own reply, the client must drop
  the agent audio it still holds. `ConversationText {role, content}`: what was said (the
  caller's only once the turn is confirmed). `AgentStartedSpeaking {total_latency,
  tts_latency, ttt_latency}` and `LatencyReport {...}`: the turn's latency, in seconds.
- `FunctionCallRequest {functions: [{id, name, arguments (a JSON string), client_side}]}`:
  for each `client_side` one the client answers `FunctionCallResponse {id, name, content}`.
  voxd declares its call-control functions (transfer, keys, end the call) in `Settings`
  without an `endpoint` (so they are client-side) and with `defer_until_eot` (so none runs
  for a turn the caller then continues).
- voxd tells the agent things with `InjectUserMessage {content}` (it answers, as if the caller
  had said it) and `UpdatePrompt {prompt}` (added to the prompt: context, no answer).
  `KeepAlive` holds an idle socket open (Deepgram closes one that is silent ~10 s).
Deepgram's messages are untrusted: each is validated here, strings are bounded, unknown types
are `OtherMessage`, and a malformed one is a ProtocolError.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from voxd.errors import ProtocolError
from voxd.providers.base import MAX_TRANSCRIPT_CHARS, TRANSCRIPT_ROLES, StageLatency
from voxd.providers.control import MAX_TEXT_FIELD, decode_control

PATH = "/v1/agent/converse"
"""The Voice Agent WebSocket's path on `deepgram.base_url`."""

AUDIO: dict[str, dict[str, Any]] = {
    "mulaw": {"input": {"encoding": "mulaw", "sample_rate": 8000},
              "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}},
    "pcm16": {"input": {"encoding": "linear16", "sample_rate": 16000},
              "output": {"encoding": "linear16", "sample_rate": 16000, "container": "none"}},
}
"""voxd's `assistant.audio` -> the Settings' `audio` (raw samples both ways, no header)."""

DEFAULT_AGENT: dict[str, Any] = {
    "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
    "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"},
              "prompt": "You are a helpful assistant on a phone call. Keep answers short."},
    "speak": {"provider": {"type": "deepgram", "model": "aura-2-asteria-en"}},
}
"""What `agent.listen`, `agent.think` and `agent.speak` are when `deepgram.settings` leaves
one out (the models of Deepgram's own examples)."""

KEEP_ALIVE = '{"type":"KeepAlive"}'
"""Client -> Deepgram: keep an idle socket open (no answer comes)."""
MAX_FUNCTION_CALLS = 16
"""Function calls taken from one FunctionCallRequest; more are ignored."""
MAX_ARGUMENTS_CHARS = 16384
"""Longest `arguments` string of a function call voxd parses."""
MAX_DESCRIPTION = 300
"""Longest error or warning description kept."""


# -- client messages --------------------------------------------------------------------------


def function_definitions(transfer_tool: str, dtmf_tool: str, end_call_tool: str,
                         destinations: Sequence[str] = ()) -> list[dict[str, Any]]:
    """voxd's call-control functions as `agent.think.functions` entries (a name "" leaves that
    one out). Without an `endpoint` they are client-side: Deepgram asks voxd to run them.
    `destinations` are the [transfer.to] names the model may choose from."""
    functions: list[dict[str, Any]] = []
    if transfer_tool:
        where = ("one of: " + ", ".join(destinations)) if destinations else \
            "the name of the person or team"
        functions.append({
            "name": transfer_tool,
            "description": "Transfer the caller to a person. Use it when the caller asks for "
                           "a human or you cannot help.",
            "parameters": {
                "type": "object",
                "properties": {
                    "destination": {"type": "string",
                                    "description": f"Whom to transfer the caller to: {where}."},
                    "announce": {"type": "string",
                                 "description": "Optional words said to the caller before "
                                                "the transfer."},
                },
                "required": ["destination"],
            },
            "defer_until_eot": True,
        })
    if dtmf_tool:
        functions.append({
            "name": dtmf_tool,
            "description": "Press keys on the phone's keypad (e.g. to navigate a phone menu).",
            "parameters": {
                "type": "object",
                "properties": {
                    "digits": {"type": "string",
                               "description": "The keys: 0-9, *, #, A-D; w pauses half a "
                                              "second."},
                },
                "required": ["digits"],
            },
            "defer_until_eot": True,
        })
    if end_call_tool:
        functions.append({
            "name": end_call_tool,
            "description": "End the phone call, after your last words (say goodbye first).",
            "parameters": {"type": "object", "properties": {}},
            "defer_until_eot": True,
        })
    return functions


def settings_body(settings: Mapping[str, Any], audio: Literal["pcm16", "mulaw"],
                  functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `Settings` message for one call: the operator's `deepgram.settings` (a copy), with
    `type` and `audio` set by voxd, `agent.listen/think/speak` defaulted when left out, and
    `functions` added to every think provider (a fallback list too) unless the operator
    declared a function of the same name there (theirs is kept as they wrote it). An
    `agent` given as a string (a stored agent's id) is sent as it is."""
    body: dict[str, Any] = copy.deepcopy(dict(settings))
    body["type"] = "Settings"
    body["audio"] = copy.deepcopy(AUDIO[audio])
    agent = body.get("agent")
    if agent is None:
        agent = body["agent"] = {}
    if not isinstance(agent, dict):
        return body
    for part, default in DEFAULT_AGENT.items():
        if part not in agent:
            agent[part] = copy.deepcopy(default)
    thinks = agent["think"] if isinstance(agent["think"], list) else [agent["think"]]
    for think in thinks:
        if not isinstance(think, dict):
            continue
        declared = think.get("functions")
        if not isinstance(declared, list):
            declared = think["functions"] = []
        names = {f.get("name") for f in declared if isinstance(f, dict)}
        declared.extend(copy.deepcopy(dict(f)) for f in functions if f["name"] not in names)
        if not declared:
            del think["functions"]
    return body


def settings_message(body: Mapping[str, Any]) -> str:
    """A Settings body (see `settings_body`) as the text frame sent."""
    return msgspec.json.encode(body).decode()


def function_call_response(call_id: str, name: str, content: str) -> str:
    """`FunctionCallResponse`: the result of a client-side function call (`call_id` as the
    request gave it)."""
    return msgspec.json.encode({"type": "FunctionCallResponse", "id": call_id, "name": name,
                                "content": content}).decode()


def inject_user_message(content: str) -> str:
    """`InjectUserMessage`: text the agent takes as if the caller had said it (and answers)."""
    return msgspec.json.encode({"type": "InjectUserMessage", "content": content}).decode()


def update_prompt(prompt: str) -> str:
    """`UpdatePrompt`: text added to the agent's prompt (context; the agent does not answer)."""
    return msgspec.json.encode({"type": "UpdatePrompt", "prompt": prompt}).decode()


# -- server messages --------------------------------------------------------------------------


class Welcome(msgspec.Struct, frozen=True):
    """The socket is open; `request_id` names the session in Deepgram's logs (safe to log)."""

    request_id: str = ""


class SettingsApplied(msgspec.Struct, frozen=True):
    """Deepgram took the Settings: audio may flow."""


class UserStartedSpeaking(msgspec.Struct, frozen=True):
    """The caller started speaking: Deepgram stops its reply; drop what is queued."""


class ConversationText(msgspec.Struct, frozen=True):
    """What the caller (`role` user) or the agent (assistant) said; `content` is cut to
    MAX_TRANSCRIPT_CHARS."""

    role: str
    content: str


class FunctionCall(msgspec.Struct, frozen=True):
    """One function the agent's model calls; `arguments` is the decoded JSON object ({} when
    it was not one: then `arguments_ok` is False)."""

    id: str
    name: str
    arguments: dict[str, Any]
    client_side: bool
    arguments_ok: bool = True


class FunctionCallRequest(msgspec.Struct, frozen=True):
    """The model calls functions; voxd runs (and answers) the client-side ones."""

    functions: tuple[FunctionCall, ...]


class FunctionCallCancelled(msgspec.Struct, frozen=True):
    """The caller spoke again: these function calls (by id) are void; answer none of them."""

    ids: tuple[str, ...]


class AgentStartedSpeaking(msgspec.Struct, frozen=True):
    """The agent's reply starts; its latency in seconds: `total` from the caller's utterance to
    the reply, of which `ttt` the model (text-to-text) and `tts` speech synthesis."""

    total_latency: float | None = None
    tts_latency: float | None = None
    ttt_latency: float | None = None


class LatencyReport(msgspec.Struct, frozen=True):
    """A turn's latency breakdown in seconds (each figure optional)."""

    stt_latency: float | None = None
    ttt_token_latency: float | None = None
    ttt_text_latency: float | None = None
    tts_latency: float | None = None
    total_latency: float | None = None


class AgentAudioDone(msgspec.Struct, frozen=True):
    """Deepgram has sent all of the reply's audio (sent, not heard: the caller may still be
    hearing it)."""


class AgentError(msgspec.Struct, frozen=True):
    """`Error`: a fatal problem; the session is over."""

    code: str = ""
    description: str = ""


class AgentWarning(msgspec.Struct, frozen=True):
    """`Warning`: a problem the session survives."""

    code: str = ""
    description: str = ""


class OtherMessage(msgspec.Struct, frozen=True):
    """A message voxd does not act on (AgentThinking, PromptUpdated, History, unknown
    types ...)."""

    type: str


DeepgramEvent = (Welcome | SettingsApplied | UserStartedSpeaking | ConversationText
                 | FunctionCallRequest | FunctionCallCancelled | AgentStartedSpeaking
                 | AgentAudioDone | LatencyReport | AgentError | AgentWarning | OtherMessage)

_SIMPLE: dict[str, type[msgspec.Struct]] = {
    "Welcome": Welcome,
    "SettingsApplied": SettingsApplied,
    "UserStartedSpeaking": UserStartedSpeaking,
    "AgentStartedSpeaking": AgentStartedSpeaking,
    "AgentAudioDone": AgentAudioDone,
    "LatencyReport": LatencyReport,
    "Error": AgentError,
    "Warning": AgentWarning,
}
"""Types whose fields are taken as they are (extra fields ignored, wrong types refused)."""


class _ConversationText(msgspec.Struct):
    role: str
    content: str


class _FunctionCall(msgspec.Struct):
    id: str
    name: str
    arguments: str = ""
    client_side: bool = False


class _FunctionCallRequest(msgspec.Struct):
    functions: list[Any]


def parse_server(text: str) -> DeepgramEvent:
    """One JSON text frame from Deepgram as an event; ProtocolError if it is not a JSON object
    with a string `type`, or a known type whose fields have the wrong types. Unknown types
    are OtherMessage (Deepgram adds messages over time)."""
    kind, message = decode_control(text, "Deepgram")
    try:
        simple = _SIMPLE.get(kind)
        if simple is not None:
            event = msgspec.convert(message, simple)
            return _bounded(event)  # type: ignore[arg-type]
        if kind == "ConversationText":
            said = msgspec.convert(message, _ConversationText)
            return ConversationText(said.role[:40], said.content[:MAX_TRANSCRIPT_CHARS])
        if kind == "FunctionCallRequest":
            request = msgspec.convert(message, _FunctionCallRequest)
            return FunctionCallRequest(_function_calls(request.functions))
        if kind == "FunctionCallCancelled":
            cancelled = msgspec.convert(message, _FunctionCallRequest)
            return FunctionCallCancelled(_ids(cancelled.functions))
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"Deepgram sent a {kind[:40]} message that is not what its API "
                            f"documents: {str(exc)[:200]}") from None
    return OtherMessage(kind[:80])


def _bounded(event: DeepgramEvent) -> DeepgramEvent:
    """Strings of a simple event cut to a size fit for a log line."""
    if isinstance(event, AgentError):
        return AgentError(event.code[:80], event.description[:MAX_DESCRIPTION])
    if isinstance(event, AgentWarning):
        return AgentWarning(event.code[:80], event.description[:MAX_DESCRIPTION])
    if isinstance(event, Welcome):
        return Welcome(event.request_id[:80])
    return event


def _function_calls(entries: list[Any]) -> tuple[FunctionCall, ...]:
    """The well-formed entries of a FunctionCallRequest (at most MAX_FUNCTION_CALLS); an
    entry that is not `{id, name, arguments, client_side}` is a ProtocolError."""
    calls = []
    for entry in entries[:MAX_FUNCTION_CALLS]:
        call = msgspec.convert(entry, _FunctionCall)
        if len(call.id) > MAX_TEXT_FIELD or len(call.name) > MAX_TEXT_FIELD:
            raise ProtocolError("Deepgram sent a function call whose id or name is over "
                                f"{MAX_TEXT_FIELD} characters")
        arguments, ok = _arguments(call.arguments)
        calls.append(FunctionCall(call.id, call.name, arguments, call.client_side, ok))
    return tuple(calls)


def _ids(entries: list[Any]) -> tuple[str, ...]:
    """The ids of a FunctionCallCancelled's `functions` (each `{id, ...}`; a bare id string is
    taken too: the message is new and its shape only shown in part)."""
    ids = []
    for entry in entries[:MAX_FUNCTION_CALLS]:
        value = entry.get("id") if isinstance(entry, dict) else entry
        if not isinstance(value, str) or len(value) > MAX_TEXT_FIELD:
            raise ProtocolError("Deepgram sent a FunctionCallCancelled without function ids")
        ids.append(value)
    return tuple(ids)


def _arguments(text: str) -> tuple[dict[str, Any], bool]:
    """A function call's `arguments` (a JSON string) as an object, and whether it was one
    ("" counts as {}: a function without parameters)."""
    if not text.strip():
        return {}, True
    if len(text) > MAX_ARGUMENTS_CHARS:
        return {}, False
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return {}, False
    return (value, True) if isinstance(value, dict) else ({}, False)


# -- what the events mean to voxd -------------------------------------------------------------


def transcript(event: ConversationText) -> tuple[str, str] | None:
    """(role, text) of a ConversationText voxd keeps: the caller's or the agent's, not empty."""
    if event.role not in TRANSCRIPT_ROLES or not event.content:
        return None
    return event.role, event.content


def stages(event: AgentStartedSpeaking | LatencyReport, *,
           turn_reported: bool = False) -> tuple[StageLatency, ...]:
    """The stages of a turn a latency message reports, as voxd names them (base.STAGES):
    total_latency is `total` (the caller's utterance to the first audio), the model's share
    (ttt_latency; a report's time to the first text token) `first_token`, speech synthesis
    (tts_latency) `first_audio`, and a report's stt_latency `transcript`. AgentStartedSpeaking
    gives total, model and synthesis at the start of each reply; a LatencyReport follows the
    turn: when the turn was `turn_reported` already, only what AgentStartedSpeaking lacks
    (`transcript`) is taken from it, so no turn counts twice. Figures absent, negative, not
    finite or over an hour are left out; a report of nothing but zeros (a greeting, an
    injected message: no caller utterance) gives nothing."""
    if isinstance(event, AgentStartedSpeaking):
        figures = [("total", event.total_latency), ("first_token", event.ttt_latency),
                   ("first_audio", event.tts_latency)]
    else:
        figures = [("transcript", event.stt_latency)]
        if not turn_reported:
            figures += [("total", event.total_latency),
                        ("first_token", event.ttt_text_latency
                         if event.ttt_text_latency is not None else event.ttt_token_latency),
                        ("first_audio", event.tts_latency)]
    kept = [(stage, float(seconds)) for stage, seconds in figures
            if seconds is not None and 0.0 <= seconds < 3600.0]
    if not any(seconds > 0.0 for _, seconds in kept):
        return ()
    return tuple(StageLatency(stage, seconds) for stage, seconds in kept)

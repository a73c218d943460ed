"""OpenAI Realtime over WebSocket, sans-I/O: the messages voxd sends, the server events it
reads, and the bookkeeping a barge-in needs (which item was playing, and how much of it).

Theory of operation
-------------------
The socket carries JSON text frames only; audio travels base64-encoded inside them
(`input_audio_buffer.append` up, `response.output_audio.delta` down; the beta name
`response.audio.delta` is read too). With `assistant.audio = "mulaw"` both directions are
G.711 mu-law 8 kHz (`audio/pcmu`), Twilio's own bytes, untouched. OpenAI's PCM is 24 kHz only
(`audio/pcm`, rate 24000), so with `assistant.audio = "pcm16"` voxd's 16 kHz s16le is
resampled 3:2 both ways (by `voxd.audio.rational`, in the adapter): mulaw is the cheaper and
better path.

Every server event is one flat msgspec decode (`_Event`: the fields voxd reads, all optional,
everything else skipped), then checked for what its type needs. Unknown types are `Other`
(not errors: the API grows). A frame that is not JSON, or whose known type lacks a field or
has one of the wrong kind, is a ProtocolError. Text is cut (transcripts to
MAX_TRANSCRIPT_CHARS, error messages, tool arguments bounded).

Barge-in: the model generates audio faster than real time, so what it sent is not what the
caller heard. `Spoken` keeps, per assistant item, how many milliseconds of audio arrived,
and groups the items that play back to back into the turn voxd's playback calls a burst (a
pause of BURST_GAP seconds starts a new one, as voxd's playout does). voxd reports "the
caller heard N seconds of the turn"; `Spoken.locate` turns that into (the item playing at that
moment, milliseconds into it), clamped to what arrived for that item: the
`conversation.item.truncate` the server accepts (it rejects `audio_end_ms` beyond the item's
audio).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import msgspec

from voxd.errors import ProtocolError
from voxd.providers.base import MAX_TRANSCRIPT_CHARS

AudioMode = Literal["pcm16", "mulaw"]

AUDIO_FORMATS: dict[str, dict[str, Any]] = {
    "mulaw": {"type": "audio/pcmu"},
    "pcm16": {"type": "audio/pcm", "rate": 24000},
}
"""voxd's `assistant.audio` -> the session's audio.input/output.format (PCM: 24 kHz only)."""
VENDOR_BYTES_PER_MS: dict[str, int] = {"mulaw": 8, "pcm16": 48}
"""Bytes per millisecond of the audio on OpenAI's side of the socket (pcmu 8 kHz x 1 byte;
pcm 24 kHz x 2 bytes)."""

MAX_ARGUMENTS_CHARS = 16_000
"""Longest tool-call `arguments` JSON taken; longer is a ProtocolError."""
MAX_ERROR_CHARS = 300
"""Longest error message kept from an `error` event."""
MAX_ID_CHARS = 200
"""Longest item/call id taken (the server's are ~30 characters)."""

FATAL_ERROR_CODES = frozenset({
    "invalid_api_key", "session_expired", "insufficient_quota", "model_not_found",
    "invalid_model", "account_deactivated", "organization_deactivated",
})
"""`error` codes after which the session cannot go on (the server closes it, or will
answer nothing useful): the call ends as an upstream error. Others are logged and the call
goes on, as OpenAI recommends ("most errors are recoverable")."""

RESPONSE_CREATE = '{"type":"response.create"}'
RESPONSE_CANCEL = '{"type":"response.cancel"}'
_APPEND_HEAD = '{"type":"input_audio_buffer.append","audio":"'
_APPEND_TAIL = '"}'


# -- client messages ---------------------------------------------------------------------


def realtime_url(base_url: str, model: str) -> str:
    """The socket's URL: `base_url` (a ws(s):// origin) + /v1/realtime?model=..."""
    return f"{base_url.rstrip('/')}/v1/realtime?model={quote(model, safe='')}"


def append_audio(chunk: bytes) -> str:
    """`input_audio_buffer.append` for one chunk of caller audio (already in the session's
    input format), built by concatenation: no dict, no JSON encoder per 20 ms frame."""
    return _APPEND_HEAD + binascii.b2a_base64(chunk, newline=False).decode("ascii") \
        + _APPEND_TAIL


def _encode(message: Mapping[str, Any]) -> str:
    return msgspec.json.encode(message).decode()


@dataclass(frozen=True)
class ToolSet:
    """voxd's call-control tools by name ("" = not offered)."""

    transfer: str = "transfer_call"
    dtmf: str = "send_dtmf"
    end_call: str = "end_call"


def tool_definitions(tools: ToolSet, destinations: Sequence[str]) -> list[dict[str, Any]]:
    """voxd's function tools as the session declares them (those named "" left out);
    `destinations` are the names the model may pick ("" for transfer.default, if set)."""
    defined: list[dict[str, Any]] = []
    if tools.transfer:
        destination: dict[str, Any] = {
            "type": "string",
            "description": "Who to hand the caller to (one of the configured names). Leave "
                           "empty for the default destination."}
        if destinations:
            destination["enum"] = list(destinations)
        defined.append({
            "type": "function", "name": tools.transfer,
            "description": "Transfer the caller to a person. Use it when the caller asks for "
                           "a person or you cannot help.",
            "parameters": {"type": "object", "properties": {
                "destination": destination,
                "announce": {"type": "string",
                             "description": "What to tell the caller before connecting "
                                            "(optional)."}},
                "required": []}})
    if tools.dtmf:
        defined.append({
            "type": "function", "name": tools.dtmf,
            "description": "Press keys on the phone line (for a phone menu): 0-9, *, #, A-D; "
                           "w waits half a second.",
            "parameters": {"type": "object", "properties": {
                "digits": {"type": "string", "pattern": "^[0-9*#A-Dw]+$"}},
                "required": ["digits"]}})
    if tools.end_call:
        defined.append({
            "type": "function", "name": tools.end_call,
            "description": "Hang up the call, after your last words (say goodbye first).",
            "parameters": {"type": "object", "properties": {}, "required": []}})
    return defined


def session_update(
    *,
    audio: AudioMode,
    model: str,
    voice: str,
    instructions: str,
    turn_detection: Mapping[str, Any] | None,
    tools: ToolSet,
    extra_tools: Sequence[Mapping[str, Any]] = (),
    destinations: Sequence[str] = (),
    transcription_model: str = "",
) -> str:
    """The first message: a GA `session.update` (session.type "realtime") with the audio
    formats for `audio`, the voice, instructions, turn detection, and the tools (voxd's own,
    then `extra_tools` whose names are not voxd's). `transcription_model` ("" = off) turns on
    the transcription of the caller's audio."""
    fmt = AUDIO_FORMATS[audio]
    declared = tool_definitions(tools, destinations)
    names = {tool["name"] for tool in declared}
    declared += [dict(tool) for tool in extra_tools if tool.get("name") not in names]
    audio_input: dict[str, Any] = {"format": fmt, "turn_detection": (
        dict(turn_detection) if turn_detection else None)}
    if transcription_model:
        audio_input["transcription"] = {"model": transcription_model}
    session: dict[str, Any] = {
        "type": "realtime", "model": model, "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {"input": audio_input, "output": {"format": fmt, "voice": voice}},
    }
    if declared:
        session["tools"] = declared
        session["tool_choice"] = "auto"
    return _encode({"type": "session.update", "session": session})


def truncate(item_id: str, audio_end_ms: int) -> str:
    """`conversation.item.truncate`: the caller heard `audio_end_ms` of the item's audio."""
    return _encode({"type": "conversation.item.truncate", "item_id": item_id,
                    "content_index": 0, "audio_end_ms": max(0, audio_end_ms)})


def function_call_output(call_id: str, output: str) -> str:
    """The answer to a tool call (`conversation.item.create` of a function_call_output)."""
    return _encode({"type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": call_id,
                             "output": output}})


def user_text(text: str) -> str:
    """A user message the model answers as the caller's words (keypad entries)."""
    return _encode({"type": "conversation.item.create",
                    "item": {"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": text}]}})


def system_text(text: str) -> str:
    """A system message: context for the model, not the caller's words."""
    return _encode({"type": "conversation.item.create",
                    "item": {"type": "message", "role": "system",
                             "content": [{"type": "input_text", "text": text}]}})


# -- server events -----------------------------------------------------------------------


class AudioDelta(msgspec.Struct, frozen=True):
    """A piece of the assistant's speech for item `item_id` (vendor format, decoded)."""

    item_id: str
    audio: bytes


class SpeechStarted(msgspec.Struct, frozen=True):
    """The server's VAD heard the caller start speaking (an interruption if audio plays)."""

    item_id: str = ""


class SpeechStopped(msgspec.Struct, frozen=True):
    """The server's VAD heard the caller stop: the turn's clock starts."""

    item_id: str = ""


class FunctionCall(msgspec.Struct, frozen=True):
    """The model called a function tool (`arguments` decoded; {} when not an object)."""

    call_id: str
    name: str
    arguments: dict[str, Any]


class UserTranscript(msgspec.Struct, frozen=True):
    """The caller's words (input audio transcription), cut to MAX_TRANSCRIPT_CHARS."""

    text: str


class AssistantTranscript(msgspec.Struct, frozen=True):
    """The assistant's spoken words (its audio's transcript), cut to MAX_TRANSCRIPT_CHARS."""

    text: str


class ResponseCreated(msgspec.Struct, frozen=True):
    """The model started a response."""


class ResponseDone(msgspec.Struct, frozen=True):
    """A response ended (`status`: completed, cancelled, incomplete, failed)."""

    status: str = ""


class ServerError(msgspec.Struct, frozen=True):
    """An `error` event; `fatal` when its code is in FATAL_ERROR_CODES."""

    kind: str
    code: str
    message: str
    fatal: bool


class Other(msgspec.Struct, frozen=True):
    """An event voxd does not act on (session.created, rate_limits.updated, unknown...)."""

    type: str


ServerEvent = (AudioDelta | SpeechStarted | SpeechStopped | FunctionCall | UserTranscript
               | AssistantTranscript | ResponseCreated | ResponseDone | ServerError | Other)


class _ErrorBody(msgspec.Struct):
    type: str | None = None
    code: str | None = None
    message: str | None = None


class _Response(msgspec.Struct):
    status: str | None = None


class _Event(msgspec.Struct):
    """The fields voxd reads from any server event (others are skipped by the decoder)."""

    type: str
    delta: str | None = None
    item_id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    transcript: str | None = None
    error: _ErrorBody | None = None
    response: _Response | None = None


class _Type(msgspec.Struct):
    type: str


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_type = msgspec.json.Decoder(_Type).decode

AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})
"""The assistant's audio: the GA name, and the beta one."""
ASSISTANT_TRANSCRIPTS = frozenset({"response.output_audio_transcript.done",
                                   "response.audio_transcript.done"})
KNOWN = AUDIO_DELTAS | ASSISTANT_TRANSCRIPTS | {
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
    "response.function_call_arguments.done",
    "conversation.item.input_audio_transcription.completed", "response.created",
    "response.done", "error"}


def parse_event(text: str) -> ServerEvent:
    """One server frame as an event; ProtocolError for a frame that is not a JSON object with
    a string `type`, or a known type without the fields it needs."""
    try:
        raw = _decode_event(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        # A field of an unknown event may have any shape: that is no error.
        try:
            kind = _decode_type(text).type
        except (msgspec.DecodeError, RecursionError):
            raise ProtocolError(f"OpenAI sent an event that is not a JSON object with a "
                                f"string 'type': {str(exc)[:120]}") from None
        if kind in KNOWN:
            raise ProtocolError(f"OpenAI sent a {kind[:60]} event that does not follow its "
                                f"documented shape: {str(exc)[:120]}") from None
        return Other(kind[:80])
    kind = raw.type
    if kind in AUDIO_DELTAS:
        if raw.delta is None or raw.item_id is None:
            raise ProtocolError(f"OpenAI sent {kind} without delta or item_id")
        try:
            audio = binascii.a2b_base64(raw.delta, strict_mode=True)
        except binascii.Error:
            raise ProtocolError(f"OpenAI sent {kind} whose audio is not base64") from None
        return AudioDelta(_id(raw.item_id, kind), audio)
    if kind == "input_audio_buffer.speech_started":
        return SpeechStarted(_id(raw.item_id or "", kind))
    if kind == "input_audio_buffer.speech_stopped":
        return SpeechStopped(_id(raw.item_id or "", kind))
    if kind == "response.function_call_arguments.done":
        return _function_call(raw)
    if kind in ASSISTANT_TRANSCRIPTS:
        return AssistantTranscript(_required(raw.transcript, "transcript", kind)
                                   [:MAX_TRANSCRIPT_CHARS])
    if kind == "conversation.item.input_audio_transcription.completed":
        return UserTranscript(_required(raw.transcript, "transcript", kind)
                              [:MAX_TRANSCRIPT_CHARS])
    if kind == "response.created":
        return ResponseCreated()
    if kind == "response.done":
        return ResponseDone((raw.response.status or "") if raw.response else "")
    if kind == "error":
        body = raw.error or _ErrorBody()
        code = (body.code or "")[:80]
        return ServerError((body.type or "")[:80], code, (body.message or "")[:MAX_ERROR_CHARS],
                           code in FATAL_ERROR_CODES)
    return Other(kind[:80])


def _required(value: str | None, name: str, kind: str) -> str:
    if value is None:
        raise ProtocolError(f"OpenAI sent {kind} without {name}")
    return value


def _id(value: str, kind: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"OpenAI sent {kind} with an id over {MAX_ID_CHARS} characters")
    return value


def _function_call(raw: _Event) -> FunctionCall:
    kind = raw.type
    call_id = _id(_required(raw.call_id, "call_id", kind), kind)
    name = _required(raw.name, "name", kind)[:MAX_ID_CHARS]
    text = raw.arguments or ""
    if len(text) > MAX_ARGUMENTS_CHARS:
        raise ProtocolError(f"OpenAI sent {kind} with arguments over {MAX_ARGUMENTS_CHARS} "
                            "characters")
    try:
        arguments = msgspec.json.decode(text) if text.strip() else {}
    except (msgspec.DecodeError, RecursionError):
        arguments = {}  # the model's JSON, not the server's: the tool sees no arguments
    return FunctionCall(call_id, name, arguments if isinstance(arguments, dict) else {})


# -- what the caller heard ---------------------------------------------------------------

BURST_GAP = 0.25
"""Seconds of no audio after which the next audio is a new turn (voxd's playback.BURST_GAP)."""


@dataclass
class _Segment:
    item_id: str
    start_ms: float
    """Where in its item this segment of the turn starts."""
    ms: float = 0.0


@dataclass
class Spoken:
    """The assistant's audio as it arrived, per item and per turn, to say what was heard.

    Times are the caller's (`now`, seconds); the audio is assumed to play in real time from
    its arrival, as voxd's playback plays it."""

    bytes_per_ms: int
    received_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds of audio that arrived per item (the most a truncate may say)."""
    turn: list[_Segment] = field(default_factory=list)
    turn_started: float = 0.0
    play_end: float = float("-inf")
    """When the audio that arrived so far ends playing, if it plays in real time."""
    MAX_ITEMS = 64

    def audio(self, item_id: str, nbytes: int, now: float) -> None:
        """`nbytes` of item `item_id` arrived at `now`."""
        ms = nbytes / self.bytes_per_ms
        if now >= self.play_end + BURST_GAP or not self.turn:
            self.turn = []
            self.turn_started = now
        self.play_end = max(self.play_end, now) + ms / 1000
        before = self.received_ms.get(item_id)
        if before is None:
            if len(self.received_ms) >= self.MAX_ITEMS:  # bounded: forget the oldest
                self.received_ms.pop(next(iter(self.received_ms)))
            before = 0.0
        self.received_ms[item_id] = before + ms
        if self.turn and self.turn[-1].item_id == item_id:
            self.turn[-1].ms += ms
        else:
            self.turn.append(_Segment(item_id, before, ms))

    def locate(self, heard_ms: float) -> tuple[str, int] | None:
        """(item playing after `heard_ms` of the turn, ms into it), clamped to what arrived
        for that item; None when the turn has no audio."""
        if not self.turn:
            return None
        left = max(0.0, heard_ms)
        for segment in self.turn:
            if left <= segment.ms:
                break
            left -= segment.ms
        else:
            left = segment.ms
        end = min(segment.start_ms + left, self.received_ms.get(segment.item_id, 0.0))
        return segment.item_id, int(end)

    def interrupted(self, now: float) -> None:
        """What was queued is gone: the next audio starts a new turn (the interrupted one is
        kept until then, so a later report of what was heard can still be located in it)."""
        self.play_end = now - BURST_GAP

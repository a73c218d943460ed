"""Vapi's WebSocket transport, sans-I/O: the create-call request and response, and the call
socket's JSON control messages (shared/reference/vapi-websocket-transport.md).

Audio itself needs no parsing: it travels as binary frames of raw samples. Everything here is
plain data in, typed values out; the HTTP client and the socket live in `providers/vapi.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from voxd.errors import UpstreamError
from voxd.providers.control import decode_control

AUDIO_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000},
    "mulaw": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
}
"""voxd's `assistant.audio` -> Vapi's transport.audioFormat."""

END_CALL = '{"type":"end-call"}'
"""Client -> Vapi: end the call (sent before closing the socket, always)."""
MAX_TOOL_CALLS = 16
"""Tool calls taken from one message; more are ignored."""


class VapiCreateError(UpstreamError):
    """Vapi refused to create the call; `retryable` says whether trying again may help."""

    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def create_call_body(
    *,
    audio: Literal["pcm16", "mulaw"],
    assistant_id: str = "",
    assistant: Mapping[str, Any] | None = None,
    call_sid: str,
    from_number: str = "",
    to_number: str = "",
    parameters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON body of `POST /call` for one Twilio call, over the WebSocket transport.

    The Twilio call's facts reach the assistant twice: as `assistantOverrides.variableValues`
    (usable in prompts as {{callSid}}, {{from}}, {{to}}, ...) and as `metadata` (echoed back in
    Vapi's server events and call logs)."""
    facts = {"callSid": call_sid, "from": from_number, "to": to_number}
    variables = {**(parameters or {}), **facts}  # a parameter never hides voxd's facts
    body: dict[str, Any] = {
        "transport": {"provider": "vapi.websocket", "audioFormat": AUDIO_FORMATS[audio]},
        "assistantOverrides": {"variableValues": variables},
        "metadata": {"twilioCallSid": call_sid, "from": from_number, "to": to_number},
    }
    if assistant:
        body["assistant"] = dict(assistant)
    else:
        body["assistantId"] = assistant_id
    return body


class _Transport(msgspec.Struct):
    websocketCallUrl: str


class _CreatedCall(msgspec.Struct):
    transport: _Transport
    id: str = ""


class CreatedCall(msgspec.Struct, frozen=True):
    """A call Vapi created: its id (safe to log) and socket URL (a secret: never log it)."""

    id: str
    websocket_call_url: str

    def __repr__(self) -> str:
        return f"CreatedCall(id={self.id!r}, websocket_call_url='***')"


def parse_create_response(status: int, body: bytes) -> CreatedCall:
    """Classify Vapi's answer to `POST /call`: a CreatedCall, or VapiCreateError saying what
    went wrong and whether a retry may help (429 and 5xx may; 4xx will not)."""
    if status in (200, 201):
        try:
            created = msgspec.json.decode(body, type=_CreatedCall)
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested deep
            raise VapiCreateError(f"Vapi's create-call answer is not what its API documents: "
                                  f"{str(exc)[:200]}", status, retryable=False) from None
        url = created.transport.websocketCallUrl
        if not url.startswith(("ws://", "wss://")):
            raise VapiCreateError("Vapi's create-call answer has no WebSocket URL", status,
                                  retryable=False)
        return CreatedCall(created.id, url)
    detail = _error_detail(body)
    if status in (401, 403):
        return _raise(f"Vapi rejected the API key (HTTP {status}{detail}): check VAPI_API_KEY "
                      "or the vapi_api_key credential", status, retryable=False)
    if status == 429 or status >= 500:
        return _raise(f"Vapi is unavailable (HTTP {status}{detail})", status, retryable=True)
    return _raise(f"Vapi refused the call (HTTP {status}{detail}): check vapi.assistant_id "
                  "and vapi.assistant", status, retryable=False)


def _raise(message: str, status: int, *, retryable: bool) -> CreatedCall:
    raise VapiCreateError(message, status, retryable)


def _error_detail(body: bytes) -> str:
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return ""
    if isinstance(data, dict):
        message = data.get("message") or data.get("error")
        if isinstance(message, list):
            message = "; ".join(str(m) for m in message)
        if message:
            return f": {str(message)[:200]}"
    return ""


# -- control messages on the call socket ---------------------------------------------------


class SpeechUpdate(msgspec.Struct, frozen=True):
    """Someone started or stopped speaking (`role` user = the caller)."""

    status: str
    role: str
    turn: int | None = None


class UserInterrupted(msgspec.Struct, frozen=True):
    """The caller barged in: drop the assistant audio still queued."""


class StatusUpdate(msgspec.Struct, frozen=True):
    """The call's status changed; `ended` comes with a reason."""

    status: str
    ended_reason: str = ""


class ToolCall(msgspec.Struct, frozen=True):
    """One client-side function tool call of the assistant's model."""

    id: str
    name: str
    arguments: dict[str, Any]


class ToolCalls(msgspec.Struct, frozen=True):
    """`tool-calls`: the model calls tools that have no server URL (run by the client: voxd)."""

    calls: tuple[ToolCall, ...]


class TransferUpdate(msgspec.Struct, frozen=True):
    """`transfer-update`: Vapi transfers the call (its transferCall tool) to a number or SIP
    URI; over the WebSocket transport the client (voxd) owns the phone leg and must do it."""

    destination: str
    """The number or SIP URI ("" for a destination that is another assistant)."""
    message: str = ""


class TranscriptMessage(msgspec.Struct, frozen=True):
    """`transcript`: what the caller (`role` user) or the assistant said, as Vapi heard it;
    `final` is False for a partial guess that later messages revise. Untrusted text, any
    length (the caller of `parse_control` bounds it)."""

    role: str
    text: str
    final: bool


class OtherMessage(msgspec.Struct, frozen=True):
    """A message voxd does not act on (model-output, hang, unknown types...)."""

    type: str


VapiEvent = (SpeechUpdate | UserInterrupted | StatusUpdate | ToolCalls | TransferUpdate
             | TranscriptMessage | OtherMessage)

TRANSCRIPT_TYPES = frozenset({"transcript", 'transcript[transcriptType="final"]'})
"""The names Vapi gives its transcript messages (the second: a final-only subscription)."""


def parse_control(text: str) -> VapiEvent:
    """One JSON text frame from Vapi as an event; ProtocolError if it is not a JSON object with
    a string `type` (unknown types are not errors: they become OtherMessage). Lenient on the
    other fields, which Vapi documents only loosely."""
    kind, message = decode_control(text, "Vapi")
    if kind == "user-interrupted":
        return UserInterrupted()
    if kind == "speech-update":
        turn = message.get("turn")
        return SpeechUpdate(str(message.get("status", "")), str(message.get("role", "")),
                            turn if isinstance(turn, int) else None)
    if kind == "status-update":
        return StatusUpdate(str(message.get("status", "")), str(message.get("endedReason", "")))
    if kind == "tool-calls":
        return ToolCalls(_tool_calls(message))
    if kind in TRANSCRIPT_TYPES:
        role, said = message.get("role"), message.get("transcript")
        final = kind != "transcript" or message.get("transcriptType") == "final"
        return TranscriptMessage(role if isinstance(role, str) else "",
                                 said if isinstance(said, str) else "", final)
    if kind == "transfer-update":
        destination = message.get("destination")
        if not isinstance(destination, dict):
            return TransferUpdate("")
        address = destination.get("number") if destination.get("type") == "number" else \
            destination.get("sipUri") if destination.get("type") == "sip" else ""
        said = destination.get("message")
        return TransferUpdate(address if isinstance(address, str) else "",
                              said if isinstance(said, str) else "")
    return OtherMessage(kind)


def _tool_calls(message: dict[str, Any]) -> tuple[ToolCall, ...]:
    """The function calls of a `tool-calls` message (`toolCallList`, else the calls inside
    `toolWithToolCallList`); entries that are not function calls with a name are skipped.
    Arguments may be an object or (OpenAI's way, as Vapi's schema says) a JSON string."""
    entries = message.get("toolCallList")
    if not isinstance(entries, list):
        listed = message.get("toolWithToolCallList")
        entries = [item.get("toolCall") for item in listed if isinstance(item, dict)] \
            if isinstance(listed, list) else []
    calls = []
    for entry in entries[:MAX_TOOL_CALLS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("function"), dict):
            continue
        function = entry["function"]
        name = function.get("name")
        if not isinstance(name, str):
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = msgspec.json.decode(arguments)
            except (msgspec.DecodeError, RecursionError):
                arguments = {}
        calls.append(ToolCall(str(entry.get("id", "")), name,
                              arguments if isinstance(arguments, dict) else {}))
    return tuple(calls)


def add_message(content: str, *, respond: bool = True) -> str:
    """`add-message`: a system message into the assistant's conversation (`respond`: the
    assistant answers it at once)."""
    return msgspec.json.encode({"type": "add-message",
                                "message": {"role": "system", "content": content},
                                "triggerResponseEnabled": respond}).decode()

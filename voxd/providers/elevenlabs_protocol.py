"""ElevenLabs Agents (Conversational AI) over its WebSocket, sans-I/O.

The protocol, as ElevenLabs documents it (elevenlabs.io/docs/agents-platform/api-reference/
agents-platform/websocket; elevenlabs-docs `fern/apis/convai/asyncapi.yml`; the official Python
SDK's `conversational_ai/conversation.py`):
- the client connects to `wss://api.elevenlabs.io/v1/convai/conversation?agent_id=ID` (a public
  agent), or to the signed URL `GET /v1/convai/conversation/get-signed-url?agent_id=ID` answers
  with the `xi-api-key` header (`{"signed_url": "wss://...&conversation_signature=..."}`, valid
  for 15 minutes: a private agent);
- it sends `conversation_initiation_client_data` first (`dynamic_variables`: strings, numbers,
  booleans; `conversation_config_override`), then caller audio as `{"user_audio_chunk": b64}`
  (no `type`), in the agent's `user_input_audio_format`;
- the server starts with `conversation_initiation_metadata` (the conversation id and the agent's
  audio formats, set on the agent, not per conversation), then sends `audio` (its speech in
  `agent_output_audio_format`, numbered by `event_id`), `interruption` (the caller talked over
  it: audio events up to that `event_id` are void), `ping` (to be answered with
  `{"type":"pong","event_id":N}` at once), `client_tool_call` (answered with
  `client_tool_result`), `user_transcript`, `agent_response`, `agent_response_correction`
  (what the agent's interrupted turn really said), `vad_score`, `internal_tentative_...`;
- the client may also send `user_message` (text as if the caller said it: keypad entries) and
  `contextual_update` (background facts that prompt no answer).

Everything here is data in, typed values out: the socket and the clock live in
`providers/elevenlabs.py`. Every server message is decoded by msgspec into one struct (fields it
does not know are skipped, base64 audio decoded in C), checked, and bounded; one that is not
what the protocol says is a ProtocolError naming what is wrong, never more.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from voxd.audio import dtmf
from voxd.audio.convert import AudioConverter, Format
from voxd.errors import ProtocolError, UpstreamError
from voxd.observability.untrusted import show
from voxd.providers.base import (
    MAX_TRANSCRIPT_CHARS,
    AnsweredBy,
    AssistantEnded,
    AssistantEvent,
    AudioFormat,
    CallNotice,
    DigitsRequested,
    KeypadEntry,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.control import (
    MAX_TEXT_FIELD,
    keypad_text,
    tool_argument,
    transfer_refused_text,
)

SENDER = "ElevenLabs"

# -- audio formats ---------------------------------------------------------------------------

FORMATS: dict[str, Format] = {
    "ulaw_8000": ("ulaw", 8000),
    "pcm_8000": ("pcm", 8000),
    "pcm_16000": ("pcm", 16000),
    "pcm_22050": ("pcm", 22050),
    "pcm_24000": ("pcm", 24000),
    "pcm_44100": ("pcm", 44100),
    "pcm_48000": ("pcm", 48000),
}
"""The agent audio formats ElevenLabs documents (AudioFormatEnum) -> (encoding, sample rate):
`pcm` is s16le mono, `ulaw` G.711 mu-law."""
VOXD_FORMATS: dict[AudioFormat, str] = {"mulaw": "ulaw_8000", "pcm16": "pcm_16000"}
"""voxd's `assistant.audio` in ElevenLabs' words."""
DEFAULT_FORMAT = "pcm_16000"
"""What ElevenLabs uses when the agent sets nothing (and what a metadata message without a
format is taken to mean)."""


def check_format(name: str) -> str:
    """`name` if voxd can convert it; UpstreamError saying what to set otherwise."""
    if name not in FORMATS:
        raise UpstreamError(f"the ElevenLabs agent uses the audio format {show(name, 40)!r}, "
                            "which voxd cannot convert: set the agent's input and output audio "
                            "formats to ulaw_8000 (or pcm_16000)")
    return name


class FormatConverter(AudioConverter):
    """voxd's AudioConverter between two of FORMATS, named as ElevenLabs names them."""

    def __init__(self, source: str, target: str) -> None:
        super().__init__(FORMATS[source], FORMATS[target])
        self.description = f"{source} -> {target}"
        """What it does, for the log line."""


def converter(source: str, target: str) -> FormatConverter | None:
    """The converter from `source` to `target` (both in FORMATS), or None when they are the
    same (the bytes pass through untouched)."""
    return None if source == target else FormatConverter(source, target)


# -- client -> ElevenLabs --------------------------------------------------------------------

MAX_PARAMETERS = 64
"""Custom call parameters passed on as dynamic variables, at most."""
RESERVED_PREFIX = "system__"
"""Dynamic variable names ElevenLabs keeps for itself (a parameter so named is not passed)."""


def dynamic_variables(*, call_sid: str, from_number: str, to_number: str,
                      parameters: Mapping[str, str] | None = None) -> dict[str, str]:
    """The conversation's dynamic variables (usable in the agent's prompt and first message as
    {{call_sid}}, {{caller_number}}, {{called_number}}, and each custom <Parameter> by its
    name). A parameter never hides voxd's facts; `from`/`to` (already given) and reserved
    names are left out. Values are strings, as the protocol allows."""
    variables: dict[str, str] = {}
    for name, value in list((parameters or {}).items())[:MAX_PARAMETERS]:
        if name in ("from", "to") or name.startswith(RESERVED_PREFIX) or not name:
            continue
        variables[str(name)] = str(value)
    variables.update(call_sid=call_sid, caller_number=from_number, called_number=to_number)
    return variables


def initiation_message(variables: Mapping[str, str | int | float | bool],
                       override: Mapping[str, Any] | None = None) -> str:
    """`conversation_initiation_client_data`: the first message on the socket. The override
    table is sent as configured (the agent must allow each overridden field, else ElevenLabs
    closes the socket with a policy violation naming it)."""
    message: dict[str, Any] = {"type": "conversation_initiation_client_data",
                               "dynamic_variables": dict(variables)}
    if override:
        message["conversation_config_override"] = dict(override)
    return msgspec.json.encode(message).decode()


_AUDIO_HEAD = '{"user_audio_chunk":"'
_AUDIO_TAIL = '"}'
_b64 = binascii.b2a_base64


def user_audio_chunk(data: bytes) -> str:
    """Caller audio (the agent's input format) as its JSON text: string concatenation around
    base64, ~0.4 us per 20 ms frame (json.dumps of a dict: ~2.5 us; msgspec encoding the
    bytes: about the same as this, measured on this project's machines)."""
    return _AUDIO_HEAD + _b64(data, newline=False).decode("ascii") + _AUDIO_TAIL


def pong(event_id: int) -> str:
    """The answer to `ping` `event_id`."""
    return f'{{"type":"pong","event_id":{int(event_id)}}}'


def client_tool_result(tool_call_id: str, result: str, *, is_error: bool = False) -> str:
    """The answer to a `client_tool_call` (the model waits for it)."""
    return msgspec.json.encode({"type": "client_tool_result", "tool_call_id": tool_call_id,
                                "result": result, "is_error": is_error}).decode()


def user_message(text: str) -> str:
    """Text the agent takes as the caller's own words (and answers)."""
    return msgspec.json.encode({"type": "user_message", "text": text}).decode()


def contextual_update(text: str) -> str:
    """A background fact for the agent; it prompts no answer by itself."""
    return msgspec.json.encode({"type": "contextual_update", "text": text}).decode()


# -- ElevenLabs -> client --------------------------------------------------------------------

MAX_TOOL_CALL_ID = 256
MAX_EVENT_ID_DIGITS = 19


class Metadata(msgspec.Struct, frozen=True):
    """`conversation_initiation_metadata`: the conversation started, in these audio formats."""

    conversation_id: str
    user_input_audio_format: str
    agent_output_audio_format: str


class Audio(msgspec.Struct, frozen=True):
    """`audio`: a piece of the agent's speech (output format), numbered by `event_id`."""

    data: bytes
    event_id: int


class Interruption(msgspec.Struct, frozen=True):
    """`interruption`: the caller talked over the agent; its audio up to `event_id` is void."""

    event_id: int


class Ping(msgspec.Struct, frozen=True):
    """`ping`: answer with `pong(event_id)` at once; `ping_ms` is ElevenLabs' measured RTT."""

    event_id: int
    ping_ms: float | None = None


class ToolCall(msgspec.Struct, frozen=True):
    """`client_tool_call`: the agent calls a client tool (answer with `client_tool_result`)."""

    name: str
    call_id: str
    parameters: dict[str, Any]


class UserTranscript(msgspec.Struct, frozen=True):
    """`user_transcript`: what the caller said (final, bounded)."""

    text: str


class AgentResponse(msgspec.Struct, frozen=True):
    """`agent_response`: what the agent says in this turn (bounded)."""

    text: str


class AgentResponseCorrection(msgspec.Struct, frozen=True):
    """`agent_response_correction`: what the agent's interrupted turn really said (bounded)."""

    text: str


class OtherMessage(msgspec.Struct, frozen=True):
    """A message voxd does not act on (vad_score, tentative responses, unknown types)."""

    type: str


ServerEvent = (Metadata | Audio | Interruption | Ping | ToolCall | UserTranscript | AgentResponse
               | AgentResponseCorrection | OtherMessage)


class _MetadataEvent(msgspec.Struct):
    conversation_id: str = ""
    user_input_audio_format: str = DEFAULT_FORMAT
    agent_output_audio_format: str = DEFAULT_FORMAT


class _AudioEvent(msgspec.Struct):
    audio_base_64: bytes  # msgspec decodes the base64 (in C) and refuses bad base64
    event_id: int | str


class _EventId(msgspec.Struct):
    event_id: int | str


class _PingEvent(msgspec.Struct):
    event_id: int | str
    ping_ms: float | None = None


class _ToolCall(msgspec.Struct):
    tool_name: str
    tool_call_id: str
    parameters: dict[str, Any] | None = None


class _UserTranscription(msgspec.Struct):
    user_transcript: str


class _AgentResponse(msgspec.Struct):
    agent_response: str


class _Correction(msgspec.Struct):
    """The SDK's shape of a correction."""

    corrected_agent_response: str = ""
    original_agent_response: str = ""


class _CorrectionDocumented(msgspec.Struct):
    """The AsyncAPI file's shape of a correction (the sources disagree: both are taken)."""

    corrected_response: str = ""


class _Message(msgspec.Struct):
    type: str
    conversation_initiation_metadata_event: _MetadataEvent | None = None
    audio_event: _AudioEvent | None = None
    interruption_event: _EventId | None = None
    ping_event: _PingEvent | None = None
    client_tool_call: _ToolCall | None = None
    user_transcription_event: _UserTranscription | None = None
    agent_response_event: _AgentResponse | None = None
    agent_response_correction_event: _Correction | None = None
    correction_event: _CorrectionDocumented | None = None


_decoder = msgspec.json.Decoder(_Message)


def parse_server_message(text: str | bytes) -> ServerEvent:
    """One text frame from ElevenLabs as an event. ProtocolError for a frame that is not a
    JSON object with a string `type`, or a known type whose event is missing or malformed;
    unknown types are OtherMessage (not errors)."""
    try:
        message = _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{SENDER} sent a message that breaks its protocol: "
                            f"{show(exc, 200)}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{SENDER} sent a message that is not JSON: {show(exc, 200)}") \
            from None
    except RecursionError:  # msgspec's depth guard: the stack stays safe
        raise ProtocolError(f"{SENDER} sent a message with JSON nested too deeply") from None
    kind = message.type
    if kind == "audio":
        audio = _need(message.audio_event, kind, "audio_event")
        return Audio(audio.audio_base_64, _event_id(audio.event_id, kind))
    if kind == "ping":
        ping = _need(message.ping_event, kind, "ping_event")
        return Ping(_event_id(ping.event_id, kind), ping.ping_ms)
    if kind == "interruption":
        interruption = _need(message.interruption_event, kind, "interruption_event")
        return Interruption(_event_id(interruption.event_id, kind))
    if kind == "user_transcript":
        said = _need(message.user_transcription_event, kind, "user_transcription_event")
        return UserTranscript(_said(said.user_transcript))
    if kind == "agent_response":
        response = _need(message.agent_response_event, kind, "agent_response_event")
        return AgentResponse(_said(response.agent_response))
    if kind == "agent_response_correction":
        if message.agent_response_correction_event is not None:
            corrected = message.agent_response_correction_event.corrected_agent_response
        elif message.correction_event is not None:
            corrected = message.correction_event.corrected_response
        else:
            raise ProtocolError(f"{SENDER} sent {kind} without its event")
        return AgentResponseCorrection(_said(corrected))
    if kind == "client_tool_call":
        call = _need(message.client_tool_call, kind, "client_tool_call")
        if not call.tool_name or len(call.tool_name) > MAX_TEXT_FIELD:
            raise ProtocolError(f"{SENDER} sent {kind} whose tool_name is empty or over "
                                f"{MAX_TEXT_FIELD} characters")
        if not call.tool_call_id or len(call.tool_call_id) > MAX_TOOL_CALL_ID:
            raise ProtocolError(f"{SENDER} sent {kind} whose tool_call_id is empty or over "
                                f"{MAX_TOOL_CALL_ID} characters")
        return ToolCall(call.tool_name, call.tool_call_id, call.parameters or {})
    if kind == "conversation_initiation_metadata":
        meta = _need(message.conversation_initiation_metadata_event, kind,
                     "conversation_initiation_metadata_event")
        return Metadata(meta.conversation_id[:200], meta.user_input_audio_format[:40],
                        meta.agent_output_audio_format[:40])
    return OtherMessage(kind[:80])


def _need(event: Any, kind: str, name: str) -> Any:
    if event is None:
        raise ProtocolError(f"{SENDER} sent {kind} without {name}")
    return event


def _event_id(value: int | str, kind: str) -> int:
    """An event id: an integer (the SDK also takes one written as a string of digits)."""
    if isinstance(value, int):
        if value < 0:
            raise ProtocolError(f"{SENDER} sent {kind} with a negative event_id")
        return value
    if not value.isdigit() or not value.isascii() or len(value) > MAX_EVENT_ID_DIGITS:
        raise ProtocolError(f"{SENDER} sent {kind} whose event_id is not an integer")
    return int(value)


def _said(text: str) -> str:
    return text.strip()[:MAX_TRANSCRIPT_CHARS]


# -- the signed URL --------------------------------------------------------------------------


class SignedUrlError(UpstreamError):
    """ElevenLabs did not give a signed URL; `retryable` says whether trying again may help."""

    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class _SignedUrl(msgspec.Struct):
    signed_url: str


class SignedUrl(msgspec.Struct, frozen=True):
    """A signed conversation URL: a credential (valid 15 minutes). Never log it."""

    url: str

    def __repr__(self) -> str:
        return "SignedUrl('***')"


SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
CONVERSATION_PATH = "/v1/convai/conversation"


def parse_signed_url_response(status: int, body: bytes) -> SignedUrl:
    """Classify ElevenLabs' answer to the signed-URL request: the URL, or SignedUrlError saying
    what went wrong and whether a retry may help (429 and 5xx may; other 4xx will not)."""
    if 200 <= status < 300:
        try:
            answer = msgspec.json.decode(body, type=_SignedUrl)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            raise SignedUrlError("ElevenLabs' signed-URL answer is not what its API documents",
                                 status, retryable=False) from None
        if not answer.signed_url.startswith(("wss://", "ws://")):
            raise SignedUrlError("ElevenLabs' signed-URL answer has no WebSocket URL", status,
                                 retryable=False)
        return SignedUrl(answer.signed_url)
    detail = _error_detail(body)
    if status in (401, 403):
        raise SignedUrlError(f"ElevenLabs rejected the API key (HTTP {status}{detail}): check "
                             "ELEVENLABS_API_KEY or the elevenlabs_api_key credential", status,
                             retryable=False)
    if status == 429 or status >= 500:
        raise SignedUrlError(f"ElevenLabs is unavailable (HTTP {status}{detail})", status,
                             retryable=True)
    raise SignedUrlError(f"ElevenLabs refused the signed URL (HTTP {status}{detail}): check "
                         "elevenlabs.agent_id", status, retryable=False)


def _error_detail(body: bytes) -> str:
    """ElevenLabs' error text (`detail` as a string, `{message}` or a validation list)."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return ""
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("status")
    elif isinstance(detail, list):
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item)
                           for item in detail[:3])
    return f": {show(detail, 200)}" if isinstance(detail, str) and detail else ""


# -- call control and notices ----------------------------------------------------------------


class ToolAnswer(NamedTuple):
    """What one client tool call means for the call: the event (None: nothing for voxd to do),
    and the tool result to send now (None: later, once the outcome is known: a transfer)."""

    event: AssistantEvent | None
    result: str | None
    is_error: bool = False


class ElevenLabsMessages:
    """Tool calls -> voxd events and their results; notices -> ElevenLabs messages, for one
    configuration (the client tools' names, the keypad template)."""

    def __init__(self, transfer_tool: str, dtmf_tool: str, end_call_tool: str,
                 keypad_template: str) -> None:
        self.transfer_tool = transfer_tool
        self.dtmf_tool = dtmf_tool
        self.end_call_tool = end_call_tool
        self.template = keypad_template

    def tool(self, call: ToolCall) -> ToolAnswer:
        """One client tool call (a name "" is no tool: never matched)."""
        name, parameters = call.name, call.parameters
        if name == self.transfer_tool and name:
            return ToolAnswer(TransferRequested(tool_argument(parameters, "destination"),
                                                tool_argument(parameters, "announce")), None)
        if name == self.dtmf_tool and name:
            digits = tool_argument(parameters, "digits")
            problem = dtmf.problem(digits)
            if problem is not None:  # voxd refuses them too (and logs it): say why here
                return ToolAnswer(DigitsRequested(digits), f"The keys were not pressed: "
                                  f"{problem}.", is_error=True)
            return ToolAnswer(DigitsRequested(digits), "The keys are being pressed.")
        if name == self.end_call_tool and name:
            return ToolAnswer(AssistantEnded("elevenlabs:end-call-tool"),
                              "The call ends after your last words.")
        return ToolAnswer(None, f"voxd has no client tool named {name[:80]!r}.", is_error=True)

    @staticmethod
    def transfer_outcome(notice: Transferred | TransferRefused) -> tuple[str, bool]:
        """The result of a transfer tool call, once voxd knows it: (text, is_error)."""
        if isinstance(notice, TransferRefused):
            return transfer_refused_text(notice.to, notice.reason), True
        return f"The caller was transferred to {notice.to}.", False

    def notice(self, notice: CallNotice) -> str | None:
        """What ElevenLabs is told about the phone call (None: nothing)."""
        if isinstance(notice, KeypadEntry):
            return user_message(keypad_text(self.template, notice.digits))
        if isinstance(notice, TransferRefused):
            text, _ = self.transfer_outcome(notice)
            return contextual_update(text)
        if isinstance(notice, AnsweredBy):
            return contextual_update(ANSWERED_BY_SAID[notice.known])
        return None  # Transferred: the socket closes next


ANSWERED_BY_SAID = {
    "human": "The call was answered by a person.",
    "machine_start": "The call was answered by an answering machine; its greeting is still "
                     "playing.",
    "machine_end_beep": "The call was answered by an answering machine; its greeting has ended "
                        "(beep): leave your message now.",
    "machine_end_silence": "The call was answered by an answering machine; its greeting has "
                           "ended: leave your message now.",
    "machine_end_other": "The call was answered by an answering machine; its greeting has "
                         "ended: leave your message now.",
    "fax": "The call was answered by a fax machine.",
    "unknown": "It is not known whether a person or a machine answered the call.",
}
"""What the agent is told (a contextual update) for each of Twilio's AnsweredBy values."""

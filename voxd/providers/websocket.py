"""`assistant.provider = "websocket"`: a self-hosted assistant behind a plain WebSocket.

The protocol (documented in README.md, "Generic WebSocket assistants"):
- voxd connects to `websocket.url` with the `websocket.headers` and, if configured, the secret
  `websocket_auth` as the `Authorization` header;
- voxd first sends one text frame `{"type":"start", "callSid", "streamSid", "from", "to",
  "parameters", "audio"}`, then caller audio as binary frames (20 ms each, `assistant.audio`
  format) and, when the caller hangs up, `{"type":"end"}` before closing;
- the assistant sends its speech as binary frames (any size, same format) and may send text
  frames `{"type":"interrupted"}` (drop its queued speech), `{"type":"speech-started"}` (the
  caller started talking: an interruption if its speech is playing) and
  `{"type":"end","reason":"..."}` (end the call), `{"type":"transfer","to":NAME,
  "announce":"..."}` (hand the caller to the [transfer.to] entry NAME; "" or no `to` for
  transfer.default), `{"type":"send-dtmf","digits":"1w2#"}` (press keys; w = 500 ms pause) and
  `{"type":"transcript","role":"user"|"assistant","text":"..."}` (final text of what the caller
  (`user`) or the assistant said: it goes into the call's record when recording.transcripts is
  on; cut to 2,000 characters). Other types are ignored.
- voxd tells the assistant `{"type":"dtmf","digits":"123#"}` (the caller pressed keys),
  `{"type":"transferred","to":NAME}` (then `end`), `{"type":"transfer-refused","to":NAME,
  "reason":"..."}` (the call goes on) and, on an outbound call, `{"type":"answered-by",
  "value":"machine_end_beep"}` (who answered, as Twilio's answering-machine detection says:
  human, machine_start, machine_end_beep, machine_end_silence, machine_end_other, fax, unknown).
- when voxd itself hears the caller talk over the assistant (barge_in.local_vad), it stops the
  assistant's audio, drops the rest of that turn, and sends
  `{"type":"barge-in","heard_ms":N}`: how much of the turn the caller heard.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from voxd.config import Settings
from voxd.errors import ProtocolError
from voxd.providers.base import (
    MAX_TRANSCRIPT_CHARS,
    TRANSCRIPT_ROLES,
    AnsweredBy,
    AssistantEnded,
    AssistantEvent,
    AssistantInterrupted,
    BackgroundTasks,
    CallerSpeechStarted,
    CallInfo,
    CallNotice,
    DigitsRequested,
    KeypadEntry,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.control import decode_control, text_field
from voxd.providers.ws_upstream import WebSocketAssistant, open_upstream

END = '{"type":"end"}'


def translate(text: str) -> AssistantEvent | None:
    """A control frame from a generic assistant -> voxd event (None: ignored)."""
    kind, message = decode_control(text, "the assistant")
    if kind == "interrupted":
        return AssistantInterrupted()
    if kind == "speech-started":
        return CallerSpeechStarted()
    if kind == "end":
        return AssistantEnded(f"assistant:{message.get('reason') or 'ended'}")
    if kind == "transfer":
        return TransferRequested(text_field(message, "to", kind, "the assistant"),
                                 text_field(message, "announce", kind, "the assistant"))
    if kind == "send-dtmf":
        digits = text_field(message, "digits", kind, "the assistant")
        if not digits:
            raise ProtocolError("the assistant sent send-dtmf without digits")
        return DigitsRequested(digits)
    if kind == "transcript":
        return _transcript(message)
    return None


def _transcript(message: dict[str, object]) -> Transcript | None:
    """A `transcript` message as an event (None for empty text); ProtocolError for a role
    other than user/assistant or a text that is not a string. Long text is cut, not refused:
    a long answer is not the assistant's fault."""
    role, text = message.get("role"), message.get("text")
    if not isinstance(role, str) or role not in TRANSCRIPT_ROLES:
        raise ProtocolError("the assistant sent a transcript whose 'role' is not \"user\" or "
                            "\"assistant\"")
    if not isinstance(text, str):
        raise ProtocolError("the assistant sent a transcript whose 'text' is not a string")
    return Transcript(role, text[:MAX_TRANSCRIPT_CHARS]) if text else None


def notice_message(notice: CallNotice) -> str:
    """What voxd tells a generic assistant about the phone call."""
    if isinstance(notice, KeypadEntry):
        return json.dumps({"type": "dtmf", "digits": notice.digits})
    if isinstance(notice, Transferred):
        return json.dumps({"type": "transferred", "to": notice.to})
    if isinstance(notice, AnsweredBy):
        return json.dumps({"type": "answered-by", "value": notice.known})
    assert isinstance(notice, TransferRefused)
    return json.dumps({"type": "transfer-refused", "to": notice.to, "reason": notice.reason})


def barge_in_message(heard_seconds: float) -> str:
    """voxd cut the assistant short: how much of its turn the caller heard."""
    return json.dumps({"type": "barge-in", "heard_ms": round(heard_seconds * 1000)})


def start_message(call: CallInfo, audio: str) -> str:
    """The first frame voxd sends: who is calling, and in which audio format."""
    return json.dumps({"type": "start", "callSid": call.call_sid, "streamSid": call.stream_sid,
                       "from": call.from_number, "to": call.to_number,
                       "parameters": call.parameters, "audio": audio})


class WebSocketProvider:
    """A generic upstream assistant speaking raw binary audio."""

    name = "websocket"

    def __init__(self, settings: Settings) -> None:
        config = settings.config
        self.audio = config.assistant.audio
        self.url = config.websocket.url
        self.max_message_bytes = config.assistant.max_message_bytes
        headers = dict(config.websocket.headers)
        if settings.secrets.websocket_auth is not None:
            headers["Authorization"] = settings.secrets.websocket_auth.reveal()
        self.headers = list(headers.items())

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """Nothing to start before the stream: connecting is one step."""

    async def aclose(self) -> None:
        """Nothing held across calls."""
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[WebSocketAssistant]:
        """Open the assistant's socket and introduce the call."""
        async with open_upstream(self.url, self.headers, "the assistant",
                                 self.max_message_bytes) as ws:
            assistant = WebSocketAssistant(ws, "the assistant", translate, END, barge_in_message,
                                           notice_message)
            await assistant.send(start_message(call, self.audio))
            yield assistant

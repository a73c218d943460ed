"""The provider interface: what a call needs from an assistant, whoever runs it.

A `Provider` is built once from the config; `Provider.connect(call)` opens one call's
`AssistantSession` as an async context manager (leaving it closes everything the session
opened). The session takes caller audio and yields events, in the audio format the provider
declared (`pcm16` = s16le 16 kHz, `mulaw` = G.711 8 kHz), so the call layer transcodes once
and the provider never sees Twilio's protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

AudioFormat = Literal["pcm16", "mulaw"]

BYTES_PER_SECOND: dict[AudioFormat, int] = {"pcm16": 32000, "mulaw": 8000}
"""Bytes of audio per second in each format (pcm16: 16 kHz x 2 bytes; mulaw: 8 kHz x 1)."""


@dataclass(frozen=True)
class CallInfo:
    """What is known about a call when its assistant is connected."""

    call_sid: str
    stream_sid: str
    account_sid: str = ""
    from_number: str = ""
    to_number: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


class AssistantAudio(msgspec.Struct, frozen=True):
    """A piece of the assistant's speech, in the provider's audio format, any length."""

    data: bytes


class AssistantInterrupted(msgspec.Struct, frozen=True):
    """The assistant noticed the caller talking over it: drop its queued speech now."""


class CallerSpeechStarted(msgspec.Struct, frozen=True):
    """The assistant heard the caller start speaking: an interruption if its audio is playing."""


class AssistantEnded(msgspec.Struct, frozen=True):
    """The assistant ended the call; `reason` goes into the call's summary line."""

    reason: str


class TransferRequested(msgspec.Struct, frozen=True):
    """The assistant asks voxd to hand the caller to a person. `to` names a [transfer.to]
    entry ("" for transfer.default); a platform that dialled a number or SIP URI itself (Vapi's
    transferCall tool) gives that, and it must be one of the configured destinations."""

    to: str = ""
    announce: str = ""
    """Said to the caller before dialling ("" for transfer.announce)."""


class DigitsRequested(msgspec.Struct, frozen=True):
    """The assistant asks voxd to press keys on the call (0-9 * # A-D, w = 500 ms pause)."""

    digits: str


MAX_TRANSCRIPT_CHARS = 2000
"""Longest transcript text taken from an assistant; longer ones are cut to this."""
TRANSCRIPT_ROLES = frozenset({"user", "assistant"})
"""Who spoke, in a transcript: `user` is the caller."""


class Transcript(msgspec.Struct, frozen=True):
    """What was said, as the assistant's speech recognition or its model has it (final text
    only, never partial guesses): `role` is "user" (the caller) or "assistant"; `text` is at
    most MAX_TRANSCRIPT_CHARS. Untrusted: escape it before it goes near a log line."""

    role: str
    text: str


STAGES = ("transcript", "first_token", "first_audio", "total")
"""Stages of a turn an assistant may report or let voxd time: the caller's speech end ->
the final transcript, the transcript -> the model's first token, -> the first audio
(speech synthesis), and the whole: the caller's speech end -> the first audio."""


class StageLatency(msgspec.Struct, frozen=True):
    """How long one stage of the current turn took (`stage` one of STAGES), as the
    assistant's platform reports it or its adapter timed it from the platform's events."""

    stage: str
    seconds: float


AssistantEvent = (AssistantAudio | AssistantInterrupted | CallerSpeechStarted | AssistantEnded
                  | TransferRequested | DigitsRequested | Transcript | StageLatency)


class KeypadEntry(msgspec.Struct, frozen=True):
    """voxd -> assistant: the caller pressed these keys (one key, or a collected entry)."""

    digits: str


class Transferred(msgspec.Struct, frozen=True):
    """voxd -> assistant: the caller was handed to the destination named `to`; the call is over
    for the assistant."""

    to: str


class TransferRefused(msgspec.Struct, frozen=True):
    """voxd -> assistant: the transfer to `to` was not made; the call goes on."""

    to: str
    reason: str


ANSWERED_BY = ("human", "machine_start", "machine_end_beep", "machine_end_silence",
               "machine_end_other", "fax", "unknown")
"""Twilio's AnsweredBy values (answering-machine detection of an outbound call)."""
MACHINE = frozenset({"machine_start", "machine_end_beep", "machine_end_silence",
                     "machine_end_other", "fax"})
"""The AnsweredBy values that are not a person (or unknown)."""


class AnsweredBy(msgspec.Struct, frozen=True):
    """voxd -> assistant: who answered the outbound call, as Twilio's answering-machine
    detection says (one of ANSWERED_BY; a value outside it is told as "unknown")."""

    value: str

    @property
    def known(self) -> str:
        """`value` if it is one of ANSWERED_BY, else "unknown"."""
        return self.value if self.value in ANSWERED_BY else "unknown"


CallNotice = KeypadEntry | Transferred | TransferRefused | AnsweredBy
"""What voxd tells an assistant about the phone call (each provider says it its own way)."""


class AssistantSession(Protocol):
    """One call's live connection to an assistant."""

    async def send_audio(self, chunk: bytes) -> None:
        """Deliver caller audio (provider format, in order, any length)."""
        ...

    async def receive(self) -> AssistantEvent:
        """The next event from the assistant; raises UpstreamError if the connection failed."""
        ...

    async def ping(self) -> None:
        """One keep-alive round trip; returns when the assistant answered."""
        ...

    async def hang_up(self) -> None:
        """Tell the assistant the caller is gone (before the session is closed)."""
        ...

    async def barge_in(self, heard_seconds: float) -> None:
        """voxd cut the assistant's speech short (the caller talked over it) after the caller
        had heard `heard_seconds` of it; a no-op where the protocol cannot say so."""
        ...

    async def tell(self, notice: CallNotice) -> None:
        """Tell the assistant what happened on the phone call (see `CallNotice`)."""
        ...


class BackgroundTasks(Protocol):
    """Where a provider starts work that outlives the request (see `voxd.background`): each
    task is supervised, and whatever it raises is logged and counted, never spread."""

    def start(self, what: str, call_sid: str, fn: Callable[..., Awaitable[Any]],
              *args: Any) -> None:
        """Run `fn(*args)`; `what` and `call_sid` name it in the log line if it fails."""
        ...


class EarlyStarts:
    """What providers began for calls at the webhook, by CallSid, until the call's media
    stream claims it. One is shared by every provider object the server builds, so a stream
    arriving after a reload finds what the replaced provider started."""

    def __init__(self, remote: Any = None) -> None:
        self._by_call: dict[str, object] = {}
        self.remote = remote
        """Where early starts are shared with other hosts (`voxd.shared_state.RedisState`), or
        None: this process only."""

    def __contains__(self, call_sid: str) -> bool:
        return call_sid in self._by_call

    def add(self, call_sid: str, started: object) -> None:
        """Remember what was started for `call_sid`."""
        self._by_call[call_sid] = started

    def claim(self, call_sid: str) -> object | None:
        """Take what was started for `call_sid` (None if nothing, or claimed already)."""
        return self._by_call.pop(call_sid, None)

    def forget(self, call_sid: str, started: object) -> None:
        """Drop `started` if it is still unclaimed."""
        if self._by_call.get(call_sid) is started:
            del self._by_call[call_sid]


class Provider(Protocol):
    """A kind of assistant (echo, vapi, websocket, ...), configured once, connected per call."""

    name: str
    audio: AudioFormat

    def connect(self, call: CallInfo) -> AbstractAsyncContextManager[AssistantSession]:
        """Open the assistant for one call; leaving the context closes it. Raises UpstreamError
        when the assistant cannot be reached."""
        ...

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """The voice webhook has seen `call`: start whatever can start before the media stream
        arrives (as `tasks`). `connect` must still work if this was never called, or was
        called in another process."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds across calls (the server is stopping)."""
        ...

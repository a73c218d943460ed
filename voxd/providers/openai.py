"""`assistant.provider = "openai"`: OpenAI Realtime over one WebSocket per call.

voxd connects to `{openai.base_url}/v1/realtime?model={openai.model}` with the secret
`openai_api_key` as `Authorization: Bearer`, sends a GA `session.update` (audio formats,
voice, instructions, turn detection, function tools) and, with `openai.greeting`, a
`response.create` so the model speaks first. The protocol's messages and the bookkeeping of
what the caller heard are in `openai_protocol.py`; this module does the I/O.

- Caller audio: `input_audio_buffer.append`, one per frame, on the direct path of
  `WebSocketAssistant` (no task switch while the socket takes it). mulaw passes through;
  pcm16 is resampled 16 -> 24 kHz (OpenAI's only PCM rate), and its audio back 24 -> 16 kHz.
- Barge-in: `input_audio_buffer.speech_started` is AssistantInterrupted (the server's VAD
  cancels its response itself, unless turn_detection.interrupt_response is false: then it is
  not an interruption). voxd then reports how much of the turn the caller heard
  (`barge_in(heard_seconds)`, also after its own VAD noticed first), and the item playing at
  that moment is truncated to it (`conversation.item.truncate`, clamped to the audio that
  arrived for that item; a truncate only ever shortens an item). When voxd noticed first and
  a response is still being generated, `response.cancel` stops it.
- Tools: `response.function_call_arguments.done` of openai.transfer_tool / dtmf_tool /
  end_call_tool -> TransferRequested / DigitsRequested / AssistantEnded. Each call gets its
  `function_call_output`: a transfer's when voxd says how it went (refused: the model is asked
  to go on); keys at once (the other side answers them; no new response); end_call at once.
  A tool voxd does not run gets an error output and a new response.
- Notices: keys pressed are a user message (keypad.template) and a response; a refused
  transfer with no pending call, and who answered an outbound call, are system messages.
- Keep-alive: WebSocket pings (the server answers them). Hang-up: the socket closes.
- Errors: `error` events are logged (escaped, the first few per call); the fatal ones
  (FATAL_ERROR_CODES: a bad key, an expired session...) end the call as an upstream error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import msgspec
import trio

from voxd.audio.rational import RationalResampler
from voxd.config import Settings
from voxd.errors import UpstreamError
from voxd.net.websocket import WebSocket
from voxd.observability.untrusted import show
from voxd.providers.base import (
    AnsweredBy,
    AssistantAudio,
    AssistantEnded,
    AssistantEvent,
    AssistantInterrupted,
    AudioFormat,
    BackgroundTasks,
    CallInfo,
    CallNotice,
    DigitsRequested,
    KeypadEntry,
    StageLatency,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.control import keypad_text, tool_argument, transfer_refused_text
from voxd.providers.openai_protocol import (
    RESPONSE_CANCEL,
    RESPONSE_CREATE,
    VENDOR_BYTES_PER_MS,
    AssistantTranscript,
    AudioDelta,
    FunctionCall,
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
from voxd.providers.vapi import ANSWERED_BY_SAID
from voxd.providers.ws_upstream import WebSocketAssistant, open_upstream

log = logging.getLogger("voxd.providers.openai")

WHAT = "OpenAI"
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
"""Transcribes the caller's audio when the call's record keeps transcripts
(recording.enabled and recording.transcripts): OpenAI's Realtime model hears audio natively
and transcribes it only when asked."""
CHECK_KEY = "check OPENAI_API_KEY or the openai_api_key credential"
MAX_ERROR_LINES = 5
"""`error` events logged per call as warnings; further ones at debug level."""


class _Nothing(msgspec.Struct, frozen=True):
    """Not an event: something was queued to send (a tool's answer), nothing to return."""


_NOTHING = cast(AssistantEvent, _Nothing())


class OpenAISession(WebSocketAssistant):
    """One call's OpenAI Realtime session (an AssistantSession with the direct audio path)."""

    def __init__(self, ws: WebSocket, provider: OpenAIProvider) -> None:
        super().__init__(ws, WHAT, self._translate, None)
        self._tools = provider.tools
        self._template = provider.keypad_template
        self._interrupts = provider.interrupts
        self._pcm = provider.audio == "pcm16"
        self._up = RationalResampler(16000, 24000) if self._pcm else None
        self._down = RationalResampler(24000, 16000) if self._pcm else None
        self.spoken = Spoken(VENDOR_BYTES_PER_MS[provider.audio])
        self._truncated: dict[str, int] = {}
        """item id -> where it was truncated (a later truncate may only shorten it)."""
        self._outbox: list[str] = []
        self._responding = False
        self._cut_by_server = False
        """OpenAI's VAD heard the caller: it cancels its response itself."""
        self._want_response = False
        """A response is wanted once the current one is done (one at a time)."""
        self._pending_transfer = ""
        """The call id of a transfer tool call waiting for voxd's verdict."""
        self._speech_stopped: float | None = None
        """When OpenAI's VAD heard the caller stop, until the answer's first audio."""
        self._transcript_from: float | None = None
        """The same, until the caller's transcript arrives."""
        self._errors_logged = 0

    # -- caller audio --

    def _append(self, chunk: bytes) -> str:
        if self._up is not None:
            chunk = self._up.process_bytes(chunk)
        return append_audio(chunk)

    async def send_audio(self, chunk: bytes) -> None:  # type: ignore[override]
        """Caller audio as one `input_audio_buffer.append`."""
        await self.send(self._append(chunk))

    def send_audio_nowait(self, chunk: bytes) -> bool:
        """Caller audio without waiting (see WebSocketAssistant.send_audio_nowait)."""
        with self._errors:
            return self._ws.send_nowait(self._append(chunk))

    # -- events --

    async def receive(self) -> AssistantEvent:
        """The next event; what the last server event asked for (a tool's answer, a
        truncate) is sent first."""
        while True:
            event = await super().receive()
            outbox, self._outbox = self._outbox, []
            for message in outbox:
                await self.send(message)
            if event is not _NOTHING:
                return event

    def _translate(self, text: str) -> AssistantEvent | tuple[AssistantEvent, ...] | None:
        event = parse_event(text)
        now = trio.current_time()
        if type(event) is AudioDelta:
            return self._audio(event, now)
        if type(event) is SpeechStarted:
            if not self._interrupts:
                return None
            self._cut_by_server = True  # its VAD cancels the response itself
            return AssistantInterrupted()
        if type(event) is SpeechStopped:
            self._speech_stopped = self._transcript_from = now
            return None
        if type(event) is FunctionCall:
            return self._tool(event)
        if type(event) is UserTranscript:
            timed: tuple[AssistantEvent, ...] = ()
            if self._transcript_from is not None:  # the turn's first transcript
                timed = (StageLatency("transcript", now - self._transcript_from),)
                self._transcript_from = None
            return (*timed, Transcript("user", event.text)) if event.text else timed
        if type(event) is AssistantTranscript:
            return Transcript("assistant", event.text) if event.text else None
        if type(event) is ResponseCreated:
            self._responding, self._cut_by_server = True, False
            return None
        if type(event) is ResponseDone:
            self._responding = False
            if event.status == "failed":
                log.warning("OpenAI's response failed (see its error event, if any)")
            if self._want_response:  # asked for while this one ran: its turn now
                self._want_response = False
                self._outbox.append(RESPONSE_CREATE)
                return _NOTHING
            return None
        if type(event) is ServerError:
            self._error(event)
            return None
        log.debug("OpenAI event %s (not acted on)", show(getattr(event, "type", ""), 80))
        return None

    def _audio(self, event: AudioDelta, now: float) -> AssistantEvent | tuple[
            AssistantEvent, ...] | None:
        self.spoken.audio(event.item_id, len(event.audio), now)
        data = self._down.process_bytes(event.audio) if self._down is not None else event.audio
        audio: tuple[AssistantEvent, ...] = (AssistantAudio(data),) if data else ()
        if self._speech_stopped is not None:  # the first audio of the answer
            audio = (StageLatency("total", now - self._speech_stopped), *audio)
            self._speech_stopped = None
        return audio or None

    def _error(self, event: ServerError) -> None:
        said = f"{show(event.kind, 60)}/{show(event.code, 60)}: {show(event.message, 300)}"
        if event.fatal:
            hint = f" ({CHECK_KEY})" if event.code == "invalid_api_key" else ""
            raise UpstreamError(f"OpenAI ended the session: {said}{hint}")
        self._errors_logged += 1
        if self._errors_logged <= MAX_ERROR_LINES:
            log.warning("OpenAI reported an error (the call goes on): %s%s", said,
                        "; further ones are logged at debug level"
                        if self._errors_logged == MAX_ERROR_LINES else "")
        else:
            log.debug("OpenAI reported an error: %s", said)

    # -- barge-in --

    def _truncate(self, located: tuple[str, int] | None) -> None:
        if located is None:
            return
        item_id, end_ms = located
        before = self._truncated.get(item_id)
        if before is not None and end_ms >= before:
            return  # truncated there or shorter already
        if len(self._truncated) >= 64:
            self._truncated.pop(next(iter(self._truncated)))
        self._truncated[item_id] = end_ms
        self._outbox.append(truncate(item_id, end_ms))

    async def barge_in(self, heard_seconds: float) -> None:
        """voxd cut the turn after `heard_seconds` (its own VAD, or OpenAI's speech_started):
        stop the response still being generated (unless the server's VAD did), and truncate
        the item that was playing at that moment to what the caller heard. Nothing when the
        turn had played out and its response was done: nothing was cut."""
        now = trio.current_time()
        if self._responding and not self._cut_by_server:
            self._outbox.append(RESPONSE_CANCEL)
        if self._responding or now < self.spoken.play_end:
            self._truncate(self.spoken.locate(heard_seconds * 1000))
        self._responding = self._cut_by_server = False
        self.spoken.interrupted(now)
        outbox, self._outbox = self._outbox, []
        for message in outbox:
            await self.send(message)
        await trio.lowlevel.checkpoint()

    # -- tools and notices --

    def _tool(self, call: FunctionCall) -> AssistantEvent:
        tools, arguments = self._tools, call.arguments
        if tools.transfer and call.name == tools.transfer:
            self._pending_transfer = call.call_id
            return TransferRequested(tool_argument(arguments, "destination"),
                                     tool_argument(arguments, "announce"))
        if tools.dtmf and call.name == tools.dtmf:
            digits = tool_argument(arguments, "digits")
            if digits:
                # The other side answers the keys (a phone menu speaks): no new response.
                self._outbox.append(function_call_output(
                    call.call_id, f"Pressed {' '.join(digits)} on the phone line."))
                return DigitsRequested(digits)
            self._answer(call.call_id, "Error: no digits were given; nothing was pressed.")
            return _NOTHING
        if tools.end_call and call.name == tools.end_call:
            self._outbox.append(function_call_output(call.call_id, "The call is ending."))
            return AssistantEnded("openai:end-call-tool")
        log.debug("OpenAI called tool %s, which voxd does not run", show(call.name, 80))
        self._answer(call.call_id, f"Error: the tool {call.name[:80]} is not available.")
        return _NOTHING

    def _answer(self, call_id: str, output: str) -> None:
        """A tool's answer, and a new response so the model goes on."""
        self._outbox += [function_call_output(call_id, output), *self._respond()]

    def _respond(self) -> list[str]:
        """`response.create` now, or once the response in progress is done (the server runs
        one at a time: a second one now would be refused)."""
        if self._responding:
            self._want_response = True
            return []
        return [RESPONSE_CREATE]

    def notice_messages(self, notice: CallNotice) -> list[str]:
        """What OpenAI is told about the phone call (messages, in order)."""
        if isinstance(notice, KeypadEntry):
            return [user_text(keypad_text(self._template, notice.digits)),
                    *self._respond()]
        if isinstance(notice, Transferred):
            call_id, self._pending_transfer = self._pending_transfer, ""
            return [function_call_output(call_id, f"Transferred to {notice.to}.")] \
                if call_id else []
        if isinstance(notice, TransferRefused):
            call_id, self._pending_transfer = self._pending_transfer, ""
            said = transfer_refused_text(notice.to, notice.reason)
            first = function_call_output(call_id, said) if call_id else system_text(said)
            return [first, *self._respond()]
        assert isinstance(notice, AnsweredBy)
        value = notice.known
        told = [system_text(ANSWERED_BY_SAID[value])]
        return [*told, *self._respond()] if value.startswith("machine_end") else told

    async def tell(self, notice: CallNotice) -> None:
        """Tell OpenAI what happened on the phone call."""
        messages = self.notice_messages(notice)
        for message in messages:
            await self.send(message)
        if not messages:
            await trio.lowlevel.checkpoint()


class OpenAIProvider:
    """`assistant.provider = "openai"`."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        config = settings.config
        key = settings.secrets.openai_api_key
        if key is None:  # config.check_settings reports this first; this guards direct use
            raise UpstreamError("the OpenAI API key is not configured")
        self.openai = openai = config.openai
        self.audio: AudioFormat = config.assistant.audio
        self.max_message_bytes = config.assistant.max_message_bytes
        self.keypad_template = config.keypad.template
        self.tools = ToolSet(openai.transfer_tool, openai.dtmf_tool, openai.end_call_tool)
        self.interrupts = openai.turn_detection.get("interrupt_response", True) is not False \
            if openai.turn_detection else False
        self._headers = [("Authorization", f"Bearer {key.reveal()}")]
        self.url = realtime_url(openai.base_url, openai.model)
        transfer = config.transfer
        destinations = [*transfer.to, ""] if transfer.default else list(transfer.to)
        transcribe = config.recording.enabled and config.recording.transcripts
        self.session_update = session_update(
            audio=self.audio, model=openai.model, voice=openai.voice,
            instructions=openai.instructions, turn_detection=openai.turn_detection or None,
            tools=self.tools, extra_tools=openai.tools, destinations=destinations,
            transcription_model=TRANSCRIPTION_MODEL if transcribe else "")

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """Nothing to start before the stream: connecting is one step."""

    async def aclose(self) -> None:
        """Nothing held across calls."""
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[OpenAISession]:
        """Open the Realtime socket and set the session up."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                ws = await stack.enter_async_context(open_upstream(
                    self.url, self._headers, WHAT, self.max_message_bytes))
            except UpstreamError as exc:
                if "(HTTP 401)" in str(exc) or "(HTTP 403)" in str(exc):
                    raise UpstreamError(f"{exc}: {CHECK_KEY}") from None
                raise
            session = OpenAISession(ws, self)
            await session.send(self.session_update)
            if self.openai.greeting:
                await session.send(RESPONSE_CREATE)
            log.debug("OpenAI Realtime session set up (model %s, audio %s)",
                      show(self.openai.model, 80), self.audio)
            yield session

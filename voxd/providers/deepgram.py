"""`assistant.provider = "deepgram"`: Deepgram's Voice Agent API over one WebSocket.

The protocol lives in `deepgram_protocol` (no I/O); here is the connection: open the socket
(`Authorization: Token <deepgram_api_key>`), send `Settings`, wait for `SettingsApplied`
(bounded: CONNECT_TIMEOUT; an `Error` instead fails the call naming Deepgram's words), then
hand the call a `DeepgramAssistant`. Audio needs no translation at all: raw samples in binary
frames both ways, so caller audio takes WebSocketAssistant's direct path unchanged.

The session answers each client-side function call the way Deepgram expects (a
`FunctionCallResponse`), sent from the receiving task right after the call is handed to voxd
as an event. A transfer is answered with its outcome: refused (the model hears why and tells
the caller) or made. Deepgram may ask for a function while the words said with it are still
streaming (between AgentStartedSpeaking and AgentAudioDone): the call-control event is held
until AgentAudioDone, so a goodbye, a transfer's lead-in or the words before keys are heard
first. When the caller interrupts that reply, what it asked for stays held until Deepgram
voids it (FunctionCallCancelled: dropped, never answered) or its next reply starts (then it
stands).

A `KeepAlive` goes out from a small timer that lives in `connect`'s own nursery, only when no
caller audio went out for `deepgram.keepalive_interval` (Deepgram wants it only on an idle
socket); `ping` is a WebSocket ping, which Deepgram answers.

Never logged: the API key, the keys the caller pressed (they go to the agent only).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from voxd.config import DeepgramConfig, Settings
from voxd.errors import ProtocolError, UpstreamError
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
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.control import keypad_text, tool_argument, transfer_refused_text
from voxd.providers.deepgram_protocol import (
    KEEP_ALIVE,
    MAX_FUNCTION_CALLS,
    PATH,
    AgentAudioDone,
    AgentError,
    AgentStartedSpeaking,
    AgentWarning,
    ConversationText,
    DeepgramEvent,
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
from voxd.providers.ws_upstream import CONNECT_TIMEOUT, WebSocketAssistant, open_upstream

log = logging.getLogger("voxd.providers.deepgram")

WHAT = "Deepgram"
MAX_PENDING_TRANSFERS = 4
"""Transfer calls awaiting their outcome, at most (older ones are answered as superseded)."""

ANSWERED_BY_SAID = {
    "human": "The call was answered by a person.",
    "machine_start": "The call was answered by an answering machine; its greeting is still "
                     "playing. Wait for it to end.",
    "machine_end_beep": "The call was answered by an answering machine and its greeting has "
                        "ended (beep): leave your message now.",
    "machine_end_silence": "The call was answered by an answering machine and its greeting "
                           "has ended: leave your message now.",
    "machine_end_other": "The call was answered by an answering machine and its greeting has "
                         "ended: leave your message now.",
    "fax": "The call was answered by a fax machine.",
    "unknown": "It is not known whether a person or a machine answered the call.",
}
"""What the agent learns for each of Twilio's AnsweredBy values: added to its prompt, and said
to it as the caller's turn (so it speaks at once) only when a machine's greeting has ended."""


class _Answered:
    """Internal: a message was handled (an answer may be owed) but the call has no event."""


_NOTHING: Any = _Answered()


class DeepgramAssistant(WebSocketAssistant):
    """One call's Deepgram agent: WebSocketAssistant's audio path, Deepgram's control
    messages, its function calls answered, its notices said as Deepgram messages."""

    def __init__(self, ws: WebSocket, config: DeepgramConfig, template: str) -> None:
        super().__init__(ws, WHAT, self._translate, None)
        self._config = config
        self._template = template
        self._outbox: list[str] = []
        self._transfers: deque[FunctionCall] = deque()
        self._held: list[tuple[str, AssistantEvent]] = []
        """(function call id, its event) asked for while the agent's words still arrive."""
        self._speaking = False
        self._turn_reported = False
        self.audio_sent = False
        """Caller audio went out since the keep-alive timer last looked."""

    # -- caller audio (the direct path of WebSocketAssistant, noting that audio flows) --

    def send_audio_nowait(self, chunk: bytes) -> bool:
        """Caller audio without waiting (see WebSocketAssistant.send_audio_nowait)."""
        self.audio_sent = True
        with self._errors:
            return self._ws.send_nowait(chunk)

    async def send_audio(self, chunk: bytes) -> None:  # type: ignore[override]
        """Caller audio as one binary frame, waiting for the socket."""
        self.audio_sent = True
        await self.send(chunk)

    async def keep_alive(self, interval: float) -> None:
        """Every `interval`, a KeepAlive if no caller audio went out meanwhile (Deepgram closes
        a socket idle ~10 s). Ends quietly when the socket fails: the receiver reports that."""
        while True:
            await trio.sleep(interval)
            if self.audio_sent:
                self.audio_sent = False
                continue
            try:
                await self.send(KEEP_ALIVE)
            except UpstreamError:
                return

    async def apply_settings(self, settings: str) -> None:
        """Send the Settings and wait for SettingsApplied; UpstreamError for an Error, a close
        or no answer within CONNECT_TIMEOUT. What comes before it is kept for the call."""
        await self.send(settings)
        with trio.move_on_after(CONNECT_TIMEOUT):
            while True:
                with self._errors:
                    message = await self._ws.receive()
                if isinstance(message, bytes):
                    if message:
                        self._pending.append(AssistantAudio(message))
                    continue
                try:
                    event = parse_server(message)
                except ProtocolError as exc:
                    log.warning("%s (ignored)", show(exc, 200))
                    continue
                if isinstance(event, SettingsApplied):
                    return
                if isinstance(event, Welcome):
                    log.info("Deepgram agent session %s", show(event.request_id) or "(no id)")
                    continue
                if isinstance(event, AgentError):
                    raise UpstreamError(f"Deepgram refused the Settings "
                                        f"({show(event.code, 80)}): "
                                        f"{show(event.description, 300)}")
                translated = self.translate_event(event)
                if isinstance(translated, tuple):
                    self._pending.extend(translated)
                elif translated is not None and translated is not _NOTHING:
                    self._pending.append(translated)
        raise UpstreamError(f"Deepgram did not apply the Settings within "
                            f"{CONNECT_TIMEOUT:.0f}s")

    # -- Deepgram -> voxd --

    async def receive(self) -> AssistantEvent:
        """The next event for the call; answers owed to Deepgram (function call results) go
        out first."""
        while True:
            event = await super().receive()
            if self._outbox:
                await self._send_outbox()
            if event is not _NOTHING:
                return event

    async def _send_outbox(self) -> None:
        messages, self._outbox = self._outbox, []
        for message in messages:
            await self.send(message)

    def _translate(self, text: str) -> AssistantEvent | tuple[AssistantEvent, ...] | None:
        """One control message -> voxd event(s) (None: nothing to act on; _NOTHING: nothing
        to act on, but an answer is owed). UpstreamError for Deepgram's `Error`."""
        return self.translate_event(parse_server(text))

    def translate_event(self, event: DeepgramEvent
                        ) -> AssistantEvent | tuple[AssistantEvent, ...] | None:
        """A parsed Deepgram message -> voxd event(s); see `_translate`."""
        if isinstance(event, UserStartedSpeaking):
            # What the interrupted reply asked for stays held: FunctionCallCancelled may follow.
            self._turn_reported = self._speaking = False
            return AssistantInterrupted()
        if isinstance(event, AgentAudioDone):
            self._speaking = False
            return self._release() or None
        if isinstance(event, ConversationText):
            said = transcript(event)
            if said is None:
                log.debug("Deepgram ConversationText with role %s (not taken)",
                          show(event.role, 40))
                return None
            return Transcript(*said)
        if isinstance(event, FunctionCallRequest):
            asked = [(call.id, e) for call in event.functions
                     if (e := self._function_call(call)) is not None]
            if asked and self._speaking:  # after the words that come with the call
                self._held = [*self._held, *asked][-MAX_FUNCTION_CALLS:]
                asked = []
            if asked:
                return tuple(e for _, e in asked)
            return _NOTHING if self._outbox else None
        if isinstance(event, FunctionCallCancelled):
            self._cancel(set(event.ids))
            return None
        if isinstance(event, AgentStartedSpeaking | LatencyReport):
            released: tuple[AssistantEvent, ...] = ()
            if isinstance(event, AgentStartedSpeaking):
                released = self._release()  # a new reply: the last one's calls stand
                self._speaking = True
            figures = stages(event, turn_reported=self._turn_reported)
            self._turn_reported = isinstance(event, AgentStartedSpeaking) and bool(figures)
            return (*released, *figures) or None
        if isinstance(event, AgentError):
            raise UpstreamError(f"Deepgram reported an error ({show(event.code, 80)}): "
                                f"{show(event.description, 300)}")
        if isinstance(event, AgentWarning):
            log.warning("Deepgram warns (%s): %s", show(event.code, 80),
                        show(event.description, 300))
            return None
        if isinstance(event, Welcome | SettingsApplied):
            return None
        assert isinstance(event, OtherMessage)
        log.debug("Deepgram message %s (not acted on)", show(event.type, 80))
        return None

    def _release(self) -> tuple[AssistantEvent, ...]:
        """The call-control events held while the agent's words were still arriving."""
        held, self._held = tuple(e for _, e in self._held), []
        return held

    def _cancel(self, ids: set[str]) -> None:
        """Deepgram voided these function calls: drop what is held of them, and answer none
        (a transfer's outcome is owed to no one). One already acted on stays done."""
        held = [(call_id, e) for call_id, e in self._held if call_id not in ids]
        dropped = len(self._held) - len(held)
        self._held = held
        self._transfers = deque(c for c in self._transfers if c.id not in ids)
        log.info("Deepgram cancelled %d function call(s)%s", len(ids),
                 f"; dropped {dropped} not yet acted on" if dropped else "")

    def _function_call(self, call: FunctionCall) -> AssistantEvent | None:
        """One function call as a voxd event (None: not one voxd acts on); its answer is queued
        (a transfer's waits for the outcome)."""
        if not call.client_side:
            return None  # Deepgram runs it and says so itself
        config = self._config
        if not call.arguments_ok:
            self._answer(call, "Error: the arguments are not a JSON object.")
            return None
        if call.name and call.name == config.transfer_tool:
            self._transfers.append(call)
            while len(self._transfers) > MAX_PENDING_TRANSFERS:
                self._answer(self._transfers.popleft(), "Superseded by a later transfer.")
            return TransferRequested(tool_argument(call.arguments, "destination"),
                                     tool_argument(call.arguments, "announce"))
        if call.name and call.name == config.dtmf_tool:
            digits = tool_argument(call.arguments, "digits")
            if not digits:
                self._answer(call, "Error: no digits given.")
                return None
            self._answer(call, "The keys are being pressed.")
            return DigitsRequested(digits)
        if call.name and call.name == config.end_call_tool:
            self._answer(call, "The call ends after your last words.")
            return AssistantEnded("deepgram:end-call-tool")
        log.info("Deepgram asked for a client-side function voxd does not have: %s",
                 show(call.name, 80))
        self._answer(call, f"Error: there is no function named {call.name[:80]} here.")
        return None

    def _answer(self, call: FunctionCall, content: str) -> None:
        self._outbox.append(function_call_response(call.id, call.name, content))

    # -- voxd -> Deepgram --

    async def tell(self, notice: CallNotice) -> None:
        """Tell the agent what happened on the phone call: keys as the caller's words, a
        transfer's outcome as the answer to its function call, who answered as context."""
        for message in self.notice_messages(notice):
            await self.send(message)
        await trio.lowlevel.checkpoint()

    def notice_messages(self, notice: CallNotice) -> list[str]:
        """The Deepgram messages that say `notice` (none: nothing to say)."""
        if isinstance(notice, KeypadEntry):
            return [inject_user_message(
                keypad_text(self._template, notice.digits))]
        if isinstance(notice, TransferRefused):
            said = transfer_refused_text(notice.to, notice.reason)
            call = self._pending_transfer(notice.to)
            return [function_call_response(call.id, call.name, said) if call is not None
                    else update_prompt(said)]
        if isinstance(notice, Transferred):
            call = self._pending_transfer(notice.to)
            return [] if call is None else [function_call_response(
                call.id, call.name, f"The caller was transferred to {notice.to}.")]
        assert isinstance(notice, AnsweredBy)
        value = notice.known
        said = ANSWERED_BY_SAID[value]
        messages = [update_prompt(said)]
        if value.startswith("machine_end"):
            messages.append(inject_user_message(f"[system note] {said}"))
        return messages

    def _pending_transfer(self, to: str) -> FunctionCall | None:
        """The oldest transfer call awaiting its outcome, the one to `to` if there is one."""
        for call in self._transfers:
            if tool_argument(call.arguments, "destination")[:64] == to:
                self._transfers.remove(call)
                return call
        return self._transfers.popleft() if self._transfers else None


class DeepgramProvider:
    """`assistant.provider = "deepgram"`."""

    name = "deepgram"

    def __init__(self, settings: Settings) -> None:
        config = settings.config
        key = settings.secrets.deepgram_api_key
        if key is None:  # config.check_settings reports this first; this guards direct use
            raise UpstreamError("Deepgram needs its API key (DEEPGRAM_API_KEY or the systemd "
                                "credential deepgram_api_key)")
        self.audio: AudioFormat = config.assistant.audio
        self.config = config.deepgram
        self.template = config.keypad.template
        self.max_message_bytes = config.assistant.max_message_bytes
        self.url = self.config.base_url.rstrip("/") + PATH
        self._headers = [("Authorization", f"Token {key.reveal()}")]
        functions = function_definitions(self.config.transfer_tool, self.config.dtmf_tool,
                                         self.config.end_call_tool,
                                         sorted(config.transfer.to))
        self.settings = settings_message(settings_body(self.config.settings, self.audio,
                                                       functions))
        """The Settings text every call sends (built once: the config is frozen)."""

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """Nothing to start before the stream: connecting is one step."""

    async def aclose(self) -> None:
        """Nothing held across calls."""
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[DeepgramAssistant]:
        """Open the agent's socket, apply the Settings, and keep the socket alive while the
        call runs."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                ws = await stack.enter_async_context(
                    open_upstream(self.url, self._headers, WHAT, self.max_message_bytes))
            except UpstreamError as exc:
                raise _with_hint(exc) from None
            assistant = DeepgramAssistant(ws, self.config, self.template)
            await assistant.apply_settings(self.settings)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(assistant.keep_alive, self.config.keepalive_interval)
                try:
                    yield assistant
                finally:
                    nursery.cancel_scope.cancel()


def _with_hint(exc: UpstreamError) -> UpstreamError:
    """A refused upgrade for a bad key says which secret to check."""
    text = str(exc)
    if "(HTTP 401)" in text or "(HTTP 403)" in text:
        return UpstreamError(f"{text}: check DEEPGRAM_API_KEY or the deepgram_api_key "
                             "credential")
    return exc

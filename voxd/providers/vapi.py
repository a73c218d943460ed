"""Vapi over its WebSocket transport: create the call over HTTPS, then one socket per call.

Early start: the voice webhook already knows the call, so `prepare` begins `POST /call` while
Twilio is still reading the TwiML and opening the media stream; `connect` then only opens the
socket. The early call lives in this process's memory, keyed by CallSid, in the server's
`EarlyStarts` (which outlives a reload: a stream after a SIGHUP claims the call made before
it). If the stream lands on another worker or host, that one creates its own call at stream
start (always correct, just slower), and the unclaimed early call here is ended after
EARLY_CLAIM_SECONDS so it is never left running on Vapi's side. Creating and ending early
calls runs as supervised background work: whatever fails there is one log line, never more.

Secrets: the API key and the websocketCallUrl are never logged (the call id is).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from voxd.config import KeypadConfig, Settings, VapiConfig
from voxd.errors import UpstreamError
from voxd.net.websocket import WebSocket
from voxd.observability.untrusted import show
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
    EarlyStarts,
    KeypadEntry,
    Transcript,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.control import keypad_text, tool_argument, transfer_refused_text
from voxd.providers.vapi_protocol import (
    END_CALL,
    CreatedCall,
    SpeechUpdate,
    StatusUpdate,
    ToolCall,
    ToolCalls,
    TranscriptMessage,
    TransferUpdate,
    UserInterrupted,
    VapiCreateError,
    add_message,
    create_call_body,
    parse_control,
    parse_create_response,
)
from voxd.providers.ws_upstream import (
    CONNECT_TIMEOUT,
    WebSocketAssistant,
    assistant_errors,
    open_upstream,
)
from voxd.shared_state import EarlyCall

log = logging.getLogger("voxd.providers.vapi")

EARLY_CLAIM_SECONDS = 30.0
"""How long an early-created call waits for its media stream before it is ended."""
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0


@dataclass(eq=False)
class _EarlyCall:
    auth: list[tuple[str, str]]
    """The headers it was created with (a reload may change the key; its call keeps it)."""
    done: trio.Event = field(default_factory=trio.Event)
    claimed: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)
    """The stream that claimed it opened its socket, or gave up first (`abandoned`)."""
    abandoned: bool = False
    created: CreatedCall | None = None
    error: UpstreamError | None = None


class VapiMessages:
    """Vapi's control messages <-> voxd's events and notices, for one configuration (the
    names of the client-side tools, the keypad template)."""

    def __init__(self, vapi: VapiConfig, keypad: KeypadConfig) -> None:
        self.vapi = vapi
        self.template = keypad.template

    def translate(self, text: str) -> AssistantEvent | tuple[AssistantEvent, ...] | None:
        """Vapi control message -> voxd event(s) (None: nothing to act on)."""
        event = parse_control(text)
        if isinstance(event, UserInterrupted):
            return AssistantInterrupted()
        if isinstance(event, SpeechUpdate):
            if event.role == "user" and event.status == "started":
                return CallerSpeechStarted()
            return None
        if isinstance(event, StatusUpdate):
            if event.status == "ended":
                return AssistantEnded(f"vapi:{event.ended_reason or 'ended'}")
            return None
        if isinstance(event, ToolCalls):
            return tuple(e for e in map(self._tool, event.calls) if e is not None)
        if isinstance(event, TranscriptMessage):
            return self._transcript(event)
        if isinstance(event, TransferUpdate):
            if not event.destination:
                return None  # to another assistant: Vapi's own business
            return TransferRequested(event.destination, event.message)
        log.debug("Vapi message %r (not acted on)", event.type)
        return None

    @staticmethod
    def _transcript(event: TranscriptMessage) -> Transcript | None:
        """A final transcript as an event (cut to MAX_TRANSCRIPT_CHARS); partial ones, empty
        ones and roles other than user/assistant are not."""
        if not event.final or not event.text:
            return None
        if event.role not in TRANSCRIPT_ROLES:
            log.debug("Vapi transcript with role %s (not taken)", show(event.role, 40))
            return None
        return Transcript(event.role, event.text[:MAX_TRANSCRIPT_CHARS])

    def _tool(self, call: ToolCall) -> AssistantEvent | None:
        """One client-side tool call as a voxd event (None: not one of voxd's tools)."""
        arguments = call.arguments
        if call.name == self.vapi.transfer_tool:
            return TransferRequested(tool_argument(arguments, "destination"),
                                     tool_argument(arguments, "announce"))
        if call.name == self.vapi.dtmf_tool:
            return DigitsRequested(tool_argument(arguments, "digits"))
        if call.name == self.vapi.end_call_tool:
            return AssistantEnded("vapi:end-call-tool")
        log.debug("Vapi tool call %s is not one of voxd's tools (not acted on)",
                  show(call.name, 80))
        return None

    def notice(self, notice: CallNotice) -> str | None:
        """What voxd tells Vapi about the phone call (as a system message it answers)."""
        if isinstance(notice, KeypadEntry):
            return add_message(keypad_text(self.template, notice.digits))
        if isinstance(notice, TransferRefused):
            return add_message(transfer_refused_text(notice.to, notice.reason))
        if isinstance(notice, AnsweredBy):
            value = notice.known
            return add_message(ANSWERED_BY_SAID[value], respond=value.startswith("machine_end"))
        return None  # Transferred: end-call follows


ANSWERED_BY_SAID = {
    "human": "The call was answered by a person.",
    "machine_start": "The call was answered by an answering machine; its greeting is still "
                     "playing.",
    "machine_end_beep": "The call was answered by an answering machine; its greeting has ended "
                        "(beep).",
    "machine_end_silence": "The call was answered by an answering machine; its greeting has "
                           "ended (silence).",
    "machine_end_other": "The call was answered by an answering machine; its greeting has "
                         "ended.",
    "fax": "The call was answered by a fax machine.",
    "unknown": "It is not known whether a person or a machine answered the call.",
}
"""What Vapi's assistant is told for each of Twilio's AnsweredBy values. It is asked to answer
at once only when a machine's greeting has ended (time to leave the message); for a person or
a greeting still playing it is told, and goes on as it was."""


class VapiProvider:
    """`assistant.provider = "vapi"`."""

    name = "vapi"

    def __init__(self, settings: Settings, early: EarlyStarts | None = None) -> None:
        config = settings.config
        key = settings.secrets.vapi_api_key
        if key is None:  # config.check_settings reports this first; this guards direct use
            raise UpstreamError("the Vapi API key is not configured")
        self.audio = config.assistant.audio
        self.vapi = config.vapi
        self.max_message_bytes = config.assistant.max_message_bytes
        self._auth = {"Authorization": f"Bearer {key.reveal()}"}
        self._early = early if early is not None else EarlyStarts()
        self.messages = VapiMessages(config.vapi, config.keypad)
        self._client: httpx.AsyncClient | None = None

    # -- creating calls --

    def _http(self) -> httpx.AsyncClient:
        # One client for the process: its connection pool keeps TLS to Vapi warm between calls.
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.vapi.base_url.rstrip("/"),
                                             headers=self._auth)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def create_call(self, call: CallInfo) -> CreatedCall:
        """`POST /call`, retrying 429/5xx/timeouts with backoff within `vapi.create_timeout`."""
        body = create_call_body(
            audio=self.audio, assistant_id=self.vapi.assistant_id,
            assistant=self.vapi.assistant or None, call_sid=call.call_sid,
            from_number=call.from_number, to_number=call.to_number,
            parameters={k: v for k, v in call.parameters.items() if k not in ("from", "to")},
        )
        started = trio.current_time()
        deadline = started + self.vapi.create_timeout
        delay = FIRST_RETRY_DELAY
        for attempt in range(1, self.vapi.create_attempts + 1):
            try:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    response = await self._http().post("/call", json=body)
                created = parse_create_response(response.status_code, response.content)
                log.info("call_sid=%s Vapi call %s created in %.0f ms (attempt %d)",
                         call.call_sid, created.id, (trio.current_time() - started) * 1000,
                         attempt)
                return created
            except VapiCreateError as exc:
                if not exc.retryable:
                    raise
                failure: UpstreamError = exc
                wait = _retry_after(response, delay)
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                failure = UpstreamError(f"cannot reach Vapi at {self.vapi.base_url}: "
                                        f"{type(exc).__name__} {exc}".rstrip())
                wait = delay
            left = deadline - trio.current_time()
            if attempt == self.vapi.create_attempts or wait >= left:
                break
            log.warning("call_sid=%s Vapi create-call attempt %d failed: %s; retrying in "
                        "%.0f ms", call.call_sid, attempt, failure, wait * 1000)
            await trio.sleep(wait)
            delay = min(delay * 2, MAX_RETRY_DELAY)
        raise UpstreamError(f"{failure} (gave up after {attempt} attempt(s) in "
                            f"{trio.current_time() - started:.1f}s)")

    # -- early start --

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """Start creating the Vapi call now (from the voice webhook)."""
        if not self.vapi.early_start or call.call_sid in self._early:
            return
        early = _EarlyCall(list(self._auth.items()))
        self._early.add(call.call_sid, early)
        try:
            tasks.start("creating the Vapi call early", call.call_sid, self._create_early,
                        call, early)
        except BaseException:
            self._early.forget(call.call_sid, early)
            raise

    async def _create_early(self, call: CallInfo, early: _EarlyCall) -> None:
        remote = self._early.remote  # other hosts, when they share state (Redis)
        share_for = EARLY_CLAIM_SECONDS + self.vapi.create_timeout
        try:
            if remote is not None:
                await remote.announce_early(call.call_sid, share_for)
            try:
                early.created = await self.create_call(call)
            except UpstreamError as exc:
                early.error = exc
            finally:
                early.done.set()
            if remote is not None and not early.claimed.is_set():
                created = early.created
                await remote.publish_early(call.call_sid, None if created is None else
                                           EarlyCall(created.id, created.websocket_call_url),
                                           share_for)
            with trio.move_on_after(EARLY_CLAIM_SECONDS):
                await early.claimed.wait()
            if early.claimed.is_set():
                # Its stream may still end before the socket opens (the caller hangs up
                # while the call is being created): then the call is this task's to end.
                with trio.move_on_after(self.vapi.create_timeout + CONNECT_TIMEOUT + 2):
                    await early.settled.wait()
                if not early.abandoned:
                    return
        finally:
            # Claimed, or nobody came for it (the stream went elsewhere, or the caller hung
            # up first), or the server is stopping: it is no longer anyone's to claim.
            self._early.forget(call.call_sid, early)
        if early.created is None:
            return
        if early.abandoned:
            log.info("call_sid=%s the stream that claimed Vapi call %s ended before its socket "
                     "opened; ending it", call.call_sid, early.created.id)
            await self._end_unclaimed(call.call_sid, early)
            return
        if remote is not None and await remote.take_early(call.call_sid, 0.0) is None:
            log.info("call_sid=%s Vapi call %s created early was taken by a stream on "
                     "another host", call.call_sid, early.created.id)
            return
        log.info("call_sid=%s Vapi call %s created early was never claimed by a media "
                 "stream; ending it", call.call_sid, early.created.id)
        await self._end_unclaimed(call.call_sid, early)

    async def _end_unclaimed(self, call_sid: str, early: _EarlyCall) -> None:
        """Open the call's socket only to say end-call: Vapi may have ended an idle call
        already (its socket closed with the 101, or reset right after it), which is fine."""
        assert early.created is not None
        created = early.created
        with trio.move_on_after(5) as scope:
            try:
                async with open_upstream(created.websocket_call_url, early.auth, "Vapi",
                                         self.max_message_bytes) as ws:
                    with assistant_errors("Vapi"):
                        await ws.send(END_CALL)
            except UpstreamError as exc:
                log.info("call_sid=%s the unclaimed Vapi call %s could not be told to end "
                         "(%s); Vapi ends idle calls itself", call_sid, created.id, exc)
        if scope.cancelled_caught:
            log.info("call_sid=%s ending the unclaimed Vapi call %s timed out", call_sid,
                     created.id)

    # -- one call --

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[WebSocketAssistant]:
        """Create (or claim the early-created) Vapi call and open its socket."""
        early = self._early.claim(call.call_sid)
        if not isinstance(early, _EarlyCall):
            created, auth = await self._other_hosts_or_new(call)
            async with open_upstream(created.websocket_call_url, auth, "Vapi",
                                     self.max_message_bytes) as ws:
                yield self._assistant(ws)
            return
        early.claimed.set()
        try:
            if self._early.remote is not None and early.done.is_set():  # published: take back
                await self._early.remote.take_early(call.call_sid, 0.0)
            await early.done.wait()
            if early.error is not None:
                raise UpstreamError(str(early.error))
            assert early.created is not None
            log.info("using the Vapi call %s created early by the webhook", early.created.id)
            async with open_upstream(early.created.websocket_call_url, early.auth, "Vapi",
                                     self.max_message_bytes) as ws:
                early.settled.set()  # the socket is open: ending it is the call's own work
                yield self._assistant(ws)
        finally:
            if not early.settled.is_set():  # gave up first: the early task ends it
                early.abandoned = True
                early.settled.set()

    def _assistant(self, ws: WebSocket) -> WebSocketAssistant:
        messages = self.messages
        return WebSocketAssistant(ws, "Vapi", messages.translate, END_CALL,
                                  notice_message=messages.notice)

    async def _other_hosts_or_new(self, call: CallInfo) -> tuple[CreatedCall,
                                                                   list[tuple[str, str]]]:
        """The call another host's webhook created early (shared state), or a new one."""
        remote = self._early.remote
        if remote is not None:
            shared = await remote.take_early(call.call_sid, self.vapi.create_timeout)
            if shared is not None:
                log.info("using the Vapi call %s created early by another host's webhook",
                         shared.id)
                return CreatedCall(shared.id, shared.websocket_call_url), list(self._auth.items())
        return await self.create_call(call), list(self._auth.items())


def _retry_after(response: httpx.Response, default: float) -> float:
    """Honour a 429's Retry-After (seconds) when Vapi sends one."""
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 10.0)
    except ValueError:
        return default

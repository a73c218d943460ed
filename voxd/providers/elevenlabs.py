"""`assistant.provider = "elevenlabs"`: an ElevenLabs Agents (Conversational AI) agent over its
WebSocket (the protocol: `providers/elevenlabs_protocol.py`).

One call, in order:
1. the socket's URL: a public agent's `{base_url}/v1/convai/conversation?agent_id=ID`, or (with
   `elevenlabs.signed_url`) a signed URL fetched with the API key (429/5xx/timeouts retried with
   backoff within SIGNED_URL_SECONDS). The voice webhook already starts that fetch (`prepare`),
   so the stream usually finds it done; a stream on another worker fetches its own. A signed
   URL is a credential: it is never logged.
2. `conversation_initiation_client_data` (dynamic variables: the call's facts and parameters;
   `elevenlabs.conversation_config_override` as configured), then the session waits (within
   CONNECT_TIMEOUT, answering pings) for `conversation_initiation_metadata`: the agent's audio
   formats decide whether audio is converted. Meanwhile the caller's audio is held by the call's
   UpstreamFeed (bounded: call.preconnect_buffer_seconds) and delivered in order once the
   session is yielded.
3. the session: caller audio out as `user_audio_chunk` on the socket's no-wait fast path;
   ElevenLabs' messages in, each ping answered with its pong from the receiving task (no task
   per ping), audio numbered at or below the last interruption dropped, client tool calls
   turned into voxd's call control and answered with `client_tool_result`.

Audio formats: voxd's `assistant.audio` is "mulaw" (G.711 8 kHz) or "pcm16" (s16le 16 kHz);
the agent's are set in its ElevenLabs settings (ulaw_8000, pcm_16000 (the default), pcm_8000,
pcm_22050, pcm_24000, pcm_44100, pcm_48000). When they match, bytes pass untouched; otherwise
the session converts, and says so once per process at INFO.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import trio

from voxd.config import Settings
from voxd.errors import ProtocolError, UpstreamError
from voxd.net.websocket import ConnectionClosed, WebSocket
from voxd.observability.untrusted import show
from voxd.providers.base import (
    AssistantAudio,
    AssistantEnded,
    AssistantEvent,
    AssistantInterrupted,
    AudioFormat,
    BackgroundTasks,
    CallInfo,
    CallNotice,
    StageLatency,
    Transcript,
    Transferred,
    TransferRefused,
)
from voxd.providers.elevenlabs_protocol import (
    CONVERSATION_PATH,
    SIGNED_URL_PATH,
    VOXD_FORMATS,
    AgentResponse,
    AgentResponseCorrection,
    Audio,
    ElevenLabsMessages,
    Interruption,
    Metadata,
    Ping,
    ServerEvent,
    SignedUrl,
    SignedUrlError,
    ToolCall,
    UserTranscript,
    check_format,
    client_tool_result,
    converter,
    dynamic_variables,
    initiation_message,
    parse_server_message,
    parse_signed_url_response,
    pong,
    user_audio_chunk,
)
from voxd.providers.ws_upstream import (
    CONNECT_TIMEOUT,
    MAX_CONTROL_WARNINGS,
    WebSocketAssistant,
    assistant_errors,
    open_upstream,
)

log = logging.getLogger("voxd.providers.elevenlabs")

WHAT = "ElevenLabs"
SIGNED_URL_SECONDS = 8.0
"""Deadline for getting a signed URL, retries included."""
SIGNED_URL_ATTEMPTS = 3
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0
EARLY_CLAIM_SECONDS = 60.0
"""How long a signed URL fetched by the webhook waits for its stream (the URL itself is valid
for 15 minutes; nothing needs ending when it is not used)."""
MAX_EARLY = 1000
"""Signed URLs fetched early and not yet claimed, at most (more: no early fetch)."""
MAX_EARLY_MESSAGES = 64
"""Messages (other than pings) taken before the metadata, at most."""
MAX_FIRST_AUDIO_SECONDS = 60.0

_conversions_logged: set[tuple[str, str, str]] = set()


@dataclass(eq=False)
class _EarlyUrl:
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    url: SignedUrl | None = None
    error: UpstreamError | None = None


class ElevenLabsSession(WebSocketAssistant):
    """One call's conversation with an ElevenLabs agent."""

    def __init__(self, ws: WebSocket, messages: ElevenLabsMessages, metadata: Metadata,
                 session_format: str, early: list[str]) -> None:
        super().__init__(ws, WHAT, _unused, None)
        self._messages = messages
        self._to_agent = converter(session_format, metadata.user_input_audio_format)
        self._from_agent = converter(metadata.agent_output_audio_format, session_format)
        self._early: deque[str] = deque(early)
        self._void_up_to = -1
        """Audio events numbered up to this belong to an interrupted turn."""
        self._transfer_call: str | None = None
        """The tool call id of a transfer voxd has not answered yet (its outcome is)."""
        self._transcript_at: float | None = None
        """When the caller's last transcript arrived, until the agent's first audio."""

    # -- caller audio --

    def _audio_text(self, chunk: bytes) -> str | None:
        if self._to_agent is not None:
            chunk = self._to_agent.process(chunk)
            if not chunk:
                return None  # the resampler holds it for now
        return user_audio_chunk(chunk)

    async def send_audio(self, chunk: bytes) -> None:  # type: ignore[override]
        """Caller audio (voxd's format) to the agent, converted if the agent wants another."""
        text = self._audio_text(chunk)
        if text is None:
            await trio.lowlevel.checkpoint()
            return
        await self.send(text)

    def send_audio_nowait(self, chunk: bytes) -> bool:
        """Caller audio without waiting (see WebSocketAssistant.send_audio_nowait)."""
        text = self._audio_text(chunk)
        if text is None:
            return True
        with self._errors:
            return self._ws.send_nowait(text)

    # -- the agent --

    async def receive(self) -> AssistantEvent:
        """The next event for the call; pings are answered and tool calls acknowledged on the
        way, and messages that break the protocol are logged (a few) and skipped."""
        if self._pending:
            return self._pending.popleft()
        while True:
            text = self._early.popleft() if self._early else await self._receive_text()
            if text is None:
                continue
            if isinstance(text, AssistantEnded):
                return text
            try:
                event = parse_server_message(text)
            except ProtocolError as exc:
                self._skip(exc)
                continue
            result = await self._handle(event)
            if result is not None:
                return result

    async def _receive_text(self) -> str | AssistantEnded | None:
        with self._errors:
            try:
                message = await self._ws.receive()
            except ConnectionClosed as exc:
                if exc.code == 1000:  # ElevenLabs ended the conversation (its end_call tool)
                    return AssistantEnded("elevenlabs:closed")
                raise
        if isinstance(message, bytes):
            self._skip(ProtocolError(f"{WHAT} sent a binary frame (its protocol is JSON text)"))
            return None
        return message

    def _skip(self, exc: ProtocolError) -> None:
        self._warnings += 1
        if self._warnings <= MAX_CONTROL_WARNINGS:
            log.warning("%s (ignored)%s", show(exc, 200), "; further ones are not logged"
                        if self._warnings == MAX_CONTROL_WARNINGS else "")

    async def _handle(self, event: ServerEvent) -> AssistantEvent | None:
        kind = type(event)
        if kind is Audio:
            assert isinstance(event, Audio)
            return self._audio(event)
        if kind is Ping:
            assert isinstance(event, Ping)
            await self.send(pong(event.event_id))
            return None
        if kind is Interruption:
            assert isinstance(event, Interruption)
            self._void_up_to = max(self._void_up_to, event.event_id)
            self._transcript_at = None
            return AssistantInterrupted()
        if kind is ToolCall:
            assert isinstance(event, ToolCall)
            return await self._tool(event)
        if kind is UserTranscript:
            assert isinstance(event, UserTranscript)
            self._transcript_at = trio.current_time()
            return Transcript("user", event.text) if event.text else None
        if kind is AgentResponse or kind is AgentResponseCorrection:
            assert isinstance(event, AgentResponse | AgentResponseCorrection)
            return Transcript("assistant", event.text) if event.text else None
        if kind is Metadata:
            log.debug("ElevenLabs sent its conversation metadata again (ignored)")
            return None
        log.debug("ElevenLabs message %s (not acted on)", show(getattr(event, "type", ""), 80))
        return None

    def _audio(self, event: Audio) -> AssistantEvent | None:
        if event.event_id <= self._void_up_to:
            return None  # part of the turn the caller interrupted
        data = event.data
        if self._from_agent is not None:
            data = self._from_agent.process(data)
        if not data:
            return None
        if self._transcript_at is not None:  # the first audio of the agent's answer
            seconds = trio.current_time() - self._transcript_at
            self._transcript_at = None
            if seconds < MAX_FIRST_AUDIO_SECONDS:
                self._pending.append(AssistantAudio(data))
                return StageLatency("first_audio", seconds)
        return AssistantAudio(data)

    async def _tool(self, call: ToolCall) -> AssistantEvent | None:
        answer = self._messages.tool(call)
        if answer.result is not None:
            await self.send(client_tool_result(call.call_id, answer.result,
                                               is_error=answer.is_error))
        else:  # a transfer: answered once voxd knows whether it was made (`tell`)
            self._transfer_call = call.call_id
        if answer.event is None:
            log.info("ElevenLabs called the client tool %s, which is not one of voxd's "
                     "(answered as an error)", show(call.name, 80))
        return answer.event

    # -- what voxd tells the agent --

    async def tell(self, notice: CallNotice) -> None:
        """Tell the agent what happened on the phone call: a transfer's outcome as the result
        of its tool call; keys as the caller's words; the rest as contextual updates."""
        if isinstance(notice, Transferred | TransferRefused) and self._transfer_call:
            call_id, self._transfer_call = self._transfer_call, None
            text, is_error = self._messages.transfer_outcome(notice)
            await self.send(client_tool_result(call_id, text, is_error=is_error))
            return
        message = self._messages.notice(notice)
        if message is None:
            await trio.lowlevel.checkpoint()
            return
        await self.send(message)


def _unused(text: str) -> AssistantEvent | None:  # pragma: no cover - receive is overridden
    raise AssertionError("ElevenLabsSession reads its own messages")


class ElevenLabsProvider:
    """`assistant.provider = "elevenlabs"`."""

    name = "elevenlabs"

    def __init__(self, settings: Settings) -> None:
        config = settings.config
        self.audio = config.assistant.audio
        self.elevenlabs = config.elevenlabs
        self.max_message_bytes = config.assistant.max_message_bytes
        key = settings.secrets.elevenlabs_api_key
        if self.elevenlabs.signed_url and key is None:  # check_settings reports this first
            raise UpstreamError("elevenlabs.signed_url needs the ElevenLabs API key")
        self._key_headers = {} if key is None else {"xi-api-key": key.reveal()}
        self.messages = ElevenLabsMessages(self.elevenlabs.transfer_tool,
                                           self.elevenlabs.dtmf_tool,
                                           self.elevenlabs.end_call_tool,
                                           config.keypad.template)
        self._client: httpx.AsyncClient | None = None
        self._early: dict[str, _EarlyUrl] = {}

    # -- the socket's URL --

    def _http(self) -> httpx.AsyncClient:
        # One client for the process: its pool keeps TLS to ElevenLabs warm between calls.
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.elevenlabs.api_base_url.rstrip("/"),
                                             headers=self._key_headers)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def signed_url(self, call_sid: str) -> SignedUrl:
        """A signed conversation URL, retrying 429/5xx/timeouts with backoff within
        SIGNED_URL_SECONDS."""
        started = trio.current_time()
        deadline = started + SIGNED_URL_SECONDS
        delay = FIRST_RETRY_DELAY
        failure: UpstreamError
        for attempt in range(1, SIGNED_URL_ATTEMPTS + 1):
            response: httpx.Response | None = None
            try:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    response = await self._http().get(
                        SIGNED_URL_PATH, params={"agent_id": self.elevenlabs.agent_id})
                url = _parse_signed(response)
                log.info("call_sid=%s ElevenLabs signed URL in %.0f ms (attempt %d)", call_sid,
                         (trio.current_time() - started) * 1000, attempt)
                return url
            except SignedUrlError as exc:
                if not exc.retryable:
                    raise
                failure = exc
                wait = _retry_after(response, delay)
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                failure = UpstreamError(f"cannot reach ElevenLabs at "
                                        f"{self.elevenlabs.api_base_url}: {type(exc).__name__}")
                wait = delay
            if attempt == SIGNED_URL_ATTEMPTS or wait >= deadline - trio.current_time():
                break
            log.warning("call_sid=%s ElevenLabs signed-URL attempt %d failed: %s; retrying in "
                        "%.0f ms", call_sid, attempt, failure, wait * 1000)
            await trio.sleep(wait)
            delay = min(delay * 2, MAX_RETRY_DELAY)
        raise UpstreamError(f"{failure} (gave up after {attempt} attempt(s) in "
                            f"{trio.current_time() - started:.1f}s)")

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """A private agent: start fetching the signed URL now (from the voice webhook)."""
        if not self.elevenlabs.signed_url or call.call_sid in self._early:
            return
        now = trio.current_time()
        for sid, early in list(self._early.items()):  # forget those no stream came for
            if early.done.is_set() and now - early.started > EARLY_CLAIM_SECONDS:
                del self._early[sid]
        if len(self._early) >= MAX_EARLY:
            return
        early = self._early[call.call_sid] = _EarlyUrl(now)
        try:
            tasks.start("fetching the ElevenLabs signed URL early", call.call_sid,
                        self._fetch_early, call.call_sid, early)
        except BaseException:
            self._early.pop(call.call_sid, None)
            raise

    async def _fetch_early(self, call_sid: str, early: _EarlyUrl) -> None:
        try:
            early.url = await self.signed_url(call_sid)
        except UpstreamError as exc:
            early.error = exc
        finally:
            early.done.set()

    async def _socket(self, call: CallInfo) -> tuple[str, list[tuple[str, str]]]:
        """The socket's URL and headers for one call."""
        if not self.elevenlabs.signed_url:
            url = (f"{self.elevenlabs.base_url.rstrip('/')}{CONVERSATION_PATH}"
                   f"?agent_id={quote(self.elevenlabs.agent_id, safe='')}")
            # A public agent needs no key; where one is configured it goes along (ElevenLabs
            # takes it as the upgrade's xi-api-key header for server-side clients).
            return url, list(self._key_headers.items())
        early = self._early.pop(call.call_sid, None)
        if early is not None:
            with trio.move_on_after(SIGNED_URL_SECONDS):
                await early.done.wait()
            if early.url is not None:
                log.debug("using the signed URL fetched early by the webhook")
                return early.url.url, []
            if early.error is not None:
                raise UpstreamError(str(early.error))
        return (await self.signed_url(call.call_sid)).url, []

    # -- one call --

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[ElevenLabsSession]:
        """Open the agent's socket, start the conversation, learn its audio formats."""
        url, headers = await self._socket(call)
        variables = dynamic_variables(call_sid=call.call_sid, from_number=call.from_number,
                                      to_number=call.to_number, parameters=call.parameters)
        async with open_upstream(url, headers, WHAT, self.max_message_bytes) as ws:
            await _send(ws, initiation_message(variables,
                                               self.elevenlabs.conversation_config_override))
            metadata, early = await _metadata(ws)
            session_format = VOXD_FORMATS[self.audio]
            log.info("ElevenLabs conversation %s started (agent audio: in %s, out %s)",
                     show(metadata.conversation_id, 80), metadata.user_input_audio_format,
                     metadata.agent_output_audio_format)
            _log_conversion(self.audio, metadata)
            yield ElevenLabsSession(ws, self.messages, metadata, session_format, early)


async def _send(ws: WebSocket, text: str) -> None:
    with assistant_errors(WHAT):
        await ws.send(text)


async def _metadata(ws: WebSocket) -> tuple[Metadata, list[str]]:
    """Wait for `conversation_initiation_metadata` (answering pings; keeping, bounded, what
    else comes first for the session); UpstreamError if it does not come in time, or the agent's
    formats cannot be converted."""
    early: list[str] = []
    with trio.move_on_after(CONNECT_TIMEOUT):
        while True:
            with assistant_errors(WHAT):
                message = await ws.receive()
            if isinstance(message, bytes):
                continue
            try:
                event = parse_server_message(message)
            except ProtocolError as exc:
                raise UpstreamError(f"{WHAT} broke its protocol starting the conversation: "
                                    f"{exc}") from None
            if isinstance(event, Metadata):
                check_format(event.user_input_audio_format)
                check_format(event.agent_output_audio_format)
                return event, early
            if isinstance(event, Ping):
                await _send(ws, pong(event.event_id))
                continue
            if len(early) >= MAX_EARLY_MESSAGES:
                raise UpstreamError(f"{WHAT} sent {MAX_EARLY_MESSAGES} messages before its "
                                    "conversation metadata")
            early.append(message)
    raise UpstreamError(f"{WHAT} did not start the conversation within {CONNECT_TIMEOUT:.0f}s "
                        "(no conversation_initiation_metadata)")


def _log_conversion(audio: AudioFormat, metadata: Metadata) -> None:
    """Say once per process (per combination of formats) which conversion runs, and how to
    need none."""
    session_format = VOXD_FORMATS[audio]
    inbound, outbound = metadata.user_input_audio_format, metadata.agent_output_audio_format
    key = (audio, inbound, outbound)
    if key in _conversions_logged:
        return
    _conversions_logged.add(key)
    if audio == "mulaw" and inbound == outbound == "ulaw_8000":
        log.info("ElevenLabs audio passes through untouched (mu-law 8 kHz end to end)")
        return
    steps = []
    if inbound != session_format:
        steps.append(f"caller audio {session_format} -> {inbound}")
    if outbound != session_format:
        steps.append(f"agent audio {outbound} -> {session_format}")
    done = ("the adapter converts " + " and ".join(steps) if steps else
            f"the agent's formats match assistant.audio = \"{audio}\" (voxd converts to and "
            "from Twilio's mu-law)")
    log.info("ElevenLabs audio: %s; for no transcoding at all set the agent's input and output "
             "audio formats to ulaw_8000 and assistant.audio = \"mulaw\"", done)


def _parse_signed(response: httpx.Response) -> SignedUrl:
    return parse_signed_url_response(response.status_code, response.content)


def _retry_after(response: httpx.Response | None, default: float) -> float:
    """Honour a 429's Retry-After (seconds) when ElevenLabs sends one."""
    value = "" if response is None else response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 10.0)
    except ValueError:
        return default

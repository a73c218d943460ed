"""An assistant reached over one WebSocket: binary audio both ways, JSON control as text.

Vapi's transport and the generic `websocket` provider share this; each supplies how its
control messages map onto voxd's events and what to send when the caller hangs up.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from voxd.errors import ErrorMap, ProtocolError, UpstreamError, VoxdError
from voxd.net import websocket
from voxd.net.websocket import ConnectionClosed, WebSocket
from voxd.observability.untrusted import show
from voxd.providers.base import AssistantAudio, AssistantEnded, AssistantEvent, CallNotice

log = logging.getLogger("voxd.providers")

CONNECT_TIMEOUT = 5.0
DISCONNECT_TIMEOUT = 0.5
MAX_CONTROL_WARNINGS = 3


def assistant_errors(what: str) -> ErrorMap:
    """The assistant boundary's one table: every way its connection can fail, as UpstreamError
    naming `what` (never the URL, which may carry a secret)."""

    def too_big(e: BaseException) -> VoxdError:
        return UpstreamError(f"{what} sent a message over the size limit "
                             f"(assistant.max_message_bytes): {e}")

    def closed(e: BaseException) -> VoxdError:
        assert isinstance(e, ConnectionClosed)
        return UpstreamError(f"{what} connection closed ({_reason(e)})")

    def refused(e: BaseException) -> VoxdError:
        assert isinstance(e, websocket.HandshakeError)
        if e.status is not None:
            return UpstreamError(f"{what} refused the WebSocket (HTTP {e.status})")
        return UpstreamError(f"cannot connect to {what}: {e}")

    def broke_protocol(e: BaseException) -> VoxdError:
        return UpstreamError(f"{what} broke its protocol: {e}")

    def too_slow(e: BaseException) -> VoxdError:
        return UpstreamError(f"{what} did not accept the WebSocket within "
                             f"{CONNECT_TIMEOUT:.0f}s")

    def unreachable(e: BaseException) -> VoxdError:
        return UpstreamError(f"cannot reach {what}: {type(e).__name__}: {e}")

    return ErrorMap([
        (websocket.MessageTooBig, too_big),
        (ConnectionClosed, closed),
        (websocket.HandshakeError, refused),
        (ProtocolError, broke_protocol),
        (trio.TooSlowError, too_slow),
        ((OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError),
         unreachable),
    ])


@asynccontextmanager
async def open_upstream(
    url: str, headers: list[tuple[str, str]], what: str, max_message_bytes: int
) -> AsyncIterator[WebSocket]:
    """Connect to an assistant's WebSocket (voxd's own, `voxd.net.websocket`: no reader task
    or queue between the socket and the call); UpstreamError (naming `what`, never the URL,
    which may carry a secret) when it cannot be opened. Closed on exit, within a deadline."""
    with assistant_errors(what), trio.fail_after(CONNECT_TIMEOUT):
        ws = await websocket.connect(url, headers, max_message_bytes=max_message_bytes,
                                     close_wait=DISCONNECT_TIMEOUT)
    try:
        yield ws
    finally:
        # Bounded even if the peer stopped reading (the close frame could not be written).
        with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT + 1.0):
            await ws.close()


Translate = Callable[[str], AssistantEvent | tuple[AssistantEvent, ...] | None]
"""A provider's control frame -> voxd event(s) (None: nothing to act on); ProtocolError for a
frame that breaks its protocol."""


class WebSocketAssistant:
    """One call's assistant on a WebSocket (the AssistantSession of ws-based providers)."""

    def __init__(
        self,
        ws: WebSocket,
        what: str,
        translate: Translate,
        end_message: str | None,
        barge_in_message: Callable[[float], str] | None = None,
        notice_message: Callable[[CallNotice], str | None] | None = None,
    ) -> None:
        self._barge_in_message = barge_in_message
        self._notice_message = notice_message
        self._pending: deque[AssistantEvent] = deque()
        self._ws = ws
        self._what = what
        self._translate = translate
        self._end_message = end_message
        self._warnings = 0
        self._errors = assistant_errors(what)

    async def send(self, message: bytes | str) -> None:
        """One frame to the assistant (binary for bytes, text for str)."""
        with self._errors:
            await self._ws.send(message)

    send_audio = send
    """Caller audio as one binary frame (the same method: no extra layer per frame)."""

    def send_audio_nowait(self, chunk: bytes) -> bool:
        """Caller audio without waiting, when `ready_nowait`: the socket takes what it can now;
        False if part of it is owed (then `flush` must follow before anything else)."""
        with self._errors:
            return self._ws.send_nowait(chunk)

    @property
    def ready_nowait(self) -> bool:
        """`send_audio_nowait` may be called: no task is writing and nothing is owed."""
        ws = self._ws
        return not ws.writing and not ws.owes

    async def flush(self) -> None:
        """Write what `send_audio_nowait` left owed (as long as the assistant takes)."""
        with self._errors:
            await self._ws.flush()

    async def receive(self) -> AssistantEvent:
        """The next audio or control event; unreadable control messages are logged, skipped."""
        if self._pending:
            return self._pending.popleft()
        while True:
            with self._errors:
                try:
                    message = await self._ws.receive()
                except ConnectionClosed as exc:
                    if exc.code == 1000:  # a normal close: the assistant ended the call
                        return AssistantEnded(f"{self._what} closed the call")
                    raise
            if isinstance(message, bytes):
                if message:
                    return AssistantAudio(message)
                continue
            try:
                event = self._translate(message)
            except ProtocolError as exc:
                self._warnings += 1
                if self._warnings <= MAX_CONTROL_WARNINGS:
                    log.warning("%s (ignored)%s", show(exc, 200), "; further ones are not logged"
                                if self._warnings == MAX_CONTROL_WARNINGS else "")
                continue
            if isinstance(event, tuple):
                if not event:
                    continue
                self._pending.extend(event[1:])
                return event[0]
            if event is not None:
                return event

    async def ping(self) -> None:
        """A WebSocket ping; returns when the pong arrives."""
        with self._errors:
            await self._ws.ping()

    async def barge_in(self, heard_seconds: float) -> None:
        """Tell the assistant how much of its interrupted turn was heard, if it can be told."""
        if self._barge_in_message is None:
            await trio.lowlevel.checkpoint()
            return
        await self.send(self._barge_in_message(heard_seconds))

    async def tell(self, notice: CallNotice) -> None:
        """Tell the assistant what happened on the phone call, in its protocol's words (if it
        has words for it)."""
        message = None if self._notice_message is None else self._notice_message(notice)
        if message is None:
            await trio.lowlevel.checkpoint()
            return
        await self.send(message)

    async def hang_up(self) -> None:
        """Tell the assistant the call is over (then the socket is closed)."""
        if self._end_message is None:
            await trio.lowlevel.checkpoint()
            return
        with contextlib.suppress(UpstreamError), self._errors:  # gone: nothing to end
            await self._ws.send(self._end_message)


def _reason(exc: ConnectionClosed) -> str:
    if exc.code == 1006:
        return "no close frame"
    return f"code {exc.code}{': ' + show(exc.reason, 120) if exc.reason else ''}"

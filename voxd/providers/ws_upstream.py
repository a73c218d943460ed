"""An assistant reached over one WebSocket: binary audio both ways, JSON control as text.

Vapi's transport and the generic `websocket` provider share this; each supplies how its
control messages map onto voxd's events and what to send when the caller hangs up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from voxd.errors import ProtocolError, UpstreamError
from voxd.net import websocket
from voxd.net.websocket import ConnectionClosed, WebSocket
from voxd.providers.base import AssistantAudio, AssistantEnded, AssistantEvent

log = logging.getLogger("voxd.providers")

CONNECT_TIMEOUT = 5.0
DISCONNECT_TIMEOUT = 0.5
MAX_CONTROL_WARNINGS = 3


@asynccontextmanager
async def open_upstream(
    url: str, headers: list[tuple[str, str]], what: str, max_message_bytes: int
) -> AsyncIterator[WebSocket]:
    """Connect to an assistant's WebSocket (voxd's own, `voxd.net.websocket`: no reader task
    or queue between the socket and the call); UpstreamError (naming `what`, never the URL,
    which may carry a secret) when it cannot be opened. Closed on exit."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            ws = await websocket.connect(url, headers, max_message_bytes=max_message_bytes,
                                         close_wait=DISCONNECT_TIMEOUT)
    except trio.TooSlowError:
        raise UpstreamError(f"{what} did not accept the WebSocket within "
                            f"{CONNECT_TIMEOUT:.0f}s") from None
    except websocket.HandshakeError as exc:
        if exc.status is not None:
            raise UpstreamError(f"{what} refused the WebSocket (HTTP {exc.status})") from None
        raise UpstreamError(f"cannot connect to {what}: {exc}") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise UpstreamError(f"cannot connect to {what}: {type(exc).__name__}: {exc}") from None
    try:
        yield ws
    finally:
        # Bounded even if the peer stopped reading (the close frame could not be written).
        with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT + 1.0):
            await ws.close()


class WebSocketAssistant:
    """One call's assistant on a WebSocket (the AssistantSession of ws-based providers)."""

    def __init__(
        self,
        ws: WebSocket,
        what: str,
        translate: Callable[[str], AssistantEvent | None],
        end_message: str | None,
        barge_in_message: Callable[[float], str] | None = None,
    ) -> None:
        self._barge_in_message = barge_in_message
        self._ws = ws
        self._what = what
        self._translate = translate
        self._end_message = end_message
        self._warnings = 0

    async def send(self, message: bytes | str) -> None:
        """One frame to the assistant (binary for bytes, text for str)."""
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise UpstreamError(f"{self._what} connection closed ({_reason(exc)})") from None

    send_audio = send
    """Caller audio as one binary frame (the same method: no extra layer per frame)."""

    async def receive(self) -> AssistantEvent:
        """The next audio or control event; unreadable control messages are logged, skipped."""
        while True:
            try:
                message = await self._ws.receive()
            except websocket.MessageTooBig as exc:
                raise UpstreamError(f"{self._what} sent a message over the size limit: "
                                    f"{exc}") from None
            except ConnectionClosed as exc:
                if exc.code == 1000:
                    return AssistantEnded(f"{self._what} closed the call")
                raise UpstreamError(f"{self._what} connection dropped ({_reason(exc)})") from None
            if isinstance(message, bytes):
                if message:
                    return AssistantAudio(message)
                continue
            try:
                event = self._translate(message)
            except ProtocolError as exc:
                self._warnings += 1
                if self._warnings <= MAX_CONTROL_WARNINGS:
                    log.warning("%s (ignored)%s", exc, "; further ones are not logged"
                                if self._warnings == MAX_CONTROL_WARNINGS else "")
                continue
            if event is not None:
                return event

    async def ping(self) -> None:
        """A WebSocket ping; returns when the pong arrives."""
        try:
            await self._ws.ping()
        except ConnectionClosed as exc:
            raise UpstreamError(f"{self._what} connection closed ({_reason(exc)})") from None

    async def barge_in(self, heard_seconds: float) -> None:
        """Tell the assistant how much of its interrupted turn was heard, if it can be told."""
        if self._barge_in_message is None:
            await trio.lowlevel.checkpoint()
            return
        await self.send(self._barge_in_message(heard_seconds))

    async def hang_up(self) -> None:
        """Tell the assistant the call is over (then the socket is closed)."""
        if self._end_message is None:
            await trio.lowlevel.checkpoint()
            return
        with contextlib.suppress(ConnectionClosed):  # gone: nothing to end
            await self._ws.send(self._end_message)


def _reason(exc: ConnectionClosed) -> str:
    if exc.code == 1006:
        return "no close frame"
    return f"code {exc.code}{': ' + exc.reason if exc.reason else ''}"

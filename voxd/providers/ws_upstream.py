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
import trio_websocket

from voxd.errors import ProtocolError, UpstreamError
from voxd.providers.base import AssistantAudio, AssistantEnded, AssistantEvent

log = logging.getLogger("voxd.providers")

CONNECT_TIMEOUT = 5.0
DISCONNECT_TIMEOUT = 0.5
MESSAGE_QUEUE = 64
"""Messages read ahead from the assistant: bursts faster than real time wait here (bounded)."""
MAX_CONTROL_WARNINGS = 3


@asynccontextmanager
async def open_upstream(
    url: str, headers: list[tuple[str, str]], what: str, max_message_bytes: int
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect to an assistant's WebSocket; UpstreamError (naming `what`, never the URL, which
    may carry a secret) when it cannot be opened."""
    try:
        async with trio_websocket.open_websocket_url(
            url,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
            message_queue_size=MESSAGE_QUEUE,
            max_message_size=max_message_bytes,
            connect_timeout=CONNECT_TIMEOUT,
            disconnect_timeout=DISCONNECT_TIMEOUT,
        ) as ws:
            yield ws
    except trio_websocket.ConnectionRejected as exc:
        raise UpstreamError(f"{what} refused the WebSocket (HTTP {exc.status_code})") from None
    except trio_websocket.ConnectionTimeout:
        raise UpstreamError(f"{what} did not accept the WebSocket within "
                            f"{CONNECT_TIMEOUT:.0f}s") from None
    except (trio_websocket.HandshakeError, OSError) as exc:
        raise UpstreamError(f"cannot connect to {what}: {type(exc).__name__}: {exc}") from None


class WebSocketAssistant:
    """One call's assistant on a WebSocket (the AssistantSession of ws-based providers)."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
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

    async def send_audio(self, chunk: bytes) -> None:
        """Caller audio as one binary frame."""
        await self.send(chunk)

    async def send(self, message: bytes | str) -> None:
        """One frame to the assistant (binary for bytes, text for str)."""
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise UpstreamError(f"{self._what} connection closed ({_reason(exc)})") from None

    async def receive(self) -> AssistantEvent:
        """The next audio or control event; unreadable control messages are logged, skipped."""
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                if reason is not None and reason.code == 1000:
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
        except trio_websocket.ConnectionClosed as exc:
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
        with contextlib.suppress(trio_websocket.ConnectionClosed):  # gone: nothing to end
            await self._ws.send_message(self._end_message)


def _reason(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}{': ' + reason.reason if reason.reason else ''}"

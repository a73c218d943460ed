"""Twilio's media WebSocket as a call sees it: the Twilio boundary.

Everything the transport can raise crosses here once, through one table: a closed or broken
socket becomes `CallerDisconnected`, an oversized message a `ProtocolError` naming the limit.
"""

from __future__ import annotations

import trio

from voxd.errors import CallerDisconnected, ErrorMap, ProtocolError
from voxd.net.websocket import ConnectionClosed, MessageTooBig, WebSocket

TWILIO_ERRORS = ErrorMap([
    (MessageTooBig, lambda e: ProtocolError(f"{e} (call.max_message_bytes)")),
    (ConnectionClosed, lambda e: CallerDisconnected(f"socket closed ({e})")),
    ((OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError),
     lambda e: CallerDisconnected(f"socket broke ({type(e).__name__}: {e})")),
])


class TwilioMediaSocket:
    """The media WebSocket on voxd's own path, text frames only (`CallSession`'s
    `TwilioSocket`, and `voxd.call.playback.Direct`)."""

    __slots__ = ("_ws",)

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def receive(self) -> str:
        """The next text frame from Twilio."""
        with TWILIO_ERRORS:
            message = await self._ws.receive()
        if type(message) is not str:
            raise ProtocolError("binary frame received; Twilio sends only text frames")
        return message

    async def send(self, text: str) -> None:
        """Send one text frame to Twilio."""
        with TWILIO_ERRORS:
            await self._ws.send(text)

    @property
    def writing(self) -> bool:
        """A send is in progress (see `voxd.call.playback.Direct`)."""
        return self._ws.writing

    def send_nowait(self, text: str) -> bool:
        """Send one text frame to Twilio without waiting; False if part of it is owed."""
        with TWILIO_ERRORS:
            return self._ws.send_nowait(text)

    async def flush(self) -> None:
        """Write what `send_nowait` left owed."""
        with TWILIO_ERRORS:
            await self._ws.flush()

    async def close(self, code: int = 1000) -> None:
        """Close the socket once (quietly, if the peer is already gone)."""
        await self._ws.close(code)

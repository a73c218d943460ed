"""A self-hosted assistant speaking voxd's generic WebSocket protocol (README, "Generic
WebSocket assistants"): it plays the caller's audio straight back (a loopback), and can be
scripted to interrupt, to end the call, to refuse the connection, or to send any control
message at a given time (a transfer, keys to press)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket


@dataclass
class FakeAssistant:
    """Start with `await nursery.start(fake.serve)`; point websocket.url at `url`."""

    refuse_with: int | None = None
    end_after: float | None = None
    interrupt_after: float | None = None
    loopback: bool = True
    """Play the caller's audio straight back."""
    reply: bytes = b""
    reply_at: float = 0.5
    """Speak `reply` (20 ms frames in real time) this long after the call starts, whatever
    the caller does: an assistant with no barge-in of its own."""
    reply_in_one_message: bool = False
    """Send `reply` as one binary message (a whole utterance at once) instead of frames."""
    reply_if: Callable[[dict[str, Any]], bool] | None = None
    messages_at: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    close_after: float | None = None
    """Close the socket (normally) this long after the start message."""
    """(seconds after the start message, control message) sent as scripted."""
    """Speak `reply` only on calls whose start message passes this (default: every call)."""
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)
    control_in: list[dict[str, Any]] = field(default_factory=list)
    audio_in: bytearray = field(default_factory=bytearray)
    closed: trio.Event = field(default_factory=trio.Event)

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._handle,
                                         "127.0.0.1", 0, None)
            self.url = f"ws://127.0.0.1:{server.port}/assistant"
            task_status.started(self.url)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        if self.refuse_with is not None:
            await request.reject(self.refuse_with)
            return
        ws = await request.accept()
        try:
            self.start = start = json.loads(await ws.get_message())
            async with trio.open_nursery() as nursery:
                if self.end_after is not None:
                    nursery.start_soon(self._later, ws, self.end_after,
                                       {"type": "end", "reason": "done"})
                if self.interrupt_after is not None:
                    nursery.start_soon(self._later, ws, self.interrupt_after,
                                       {"type": "interrupted"})
                for at, message in self.messages_at:
                    nursery.start_soon(self._later, ws, at, message)
                if self.close_after is not None:
                    nursery.start_soon(self._close_later, ws, self.close_after)
                if self.reply and (self.reply_if is None or self.reply_if(start)):
                    nursery.start_soon(self._speak, ws, start)
                while True:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        self.audio_in += message
                        if self.loopback:
                            await ws.send_message(message)  # straight back
                    else:
                        self.control_in.append(json.loads(message))
        except* trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def _speak(self, ws: trio_websocket.WebSocketConnection,
                     call: dict[str, Any]) -> None:
        await trio.sleep(self.reply_at)
        if self.reply_in_one_message:
            await ws.send_message(self.reply)
            return
        start = trio.current_time()
        size = 640 if call.get("audio") == "pcm16" else 160
        for i in range(0, len(self.reply), size):
            await trio.sleep_until(start + i // size * 0.02)
            await ws.send_message(self.reply[i:i + size])

    async def _close_later(self, ws: trio_websocket.WebSocketConnection, delay: float) -> None:
        await trio.sleep(delay)
        await ws.aclose()

    async def _later(self, ws: trio_websocket.WebSocketConnection, delay: float,
                     message: dict[str, Any]) -> None:
        await trio.sleep(delay)
        await ws.send_message(json.dumps(message))

"""A simulated assistant speaking voxd's generic WebSocket protocol (README "Generic WebSocket
assistants"), playing a `Script` (voxd/sim/vendors/script.py) in that protocol's words: for
`voxd demo --provider websocket` and the conformance suite (the daemon never uses it; the load
tests' lean echo is voxd/sim/echo_upstream.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
import trio_websocket

from voxd.sim.vendors.script import Echo, Script
from voxd.sim.vendors.vapi import reset

__all__ = ["TOOL_MESSAGES", "GenericFake"]

TOOL_MESSAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "transfer_call": lambda args: {"type": "transfer", "to": args.get("destination", ""),
                                   "announce": args.get("announce", "")},
    "send_dtmf": lambda args: {"type": "send-dtmf", "digits": args.get("digits", "")},
    "end_call": lambda args: {"type": "end", "reason": "tool"},
}
"""The conformance suite's tool names, as the generic protocol's messages."""


class GenericFake:
    """A generic WebSocket assistant following a Script (see `ConformantFake`)."""

    def __init__(self, audio_format: str = "pcm16") -> None:
        self.script = Script()
        self.secrets: dict[str, str] = {}
        self.audio_format = audio_format
        self.url = ""
        self.audio_in = bytearray()
        self.control_in: list[dict[str, Any]] = []
        self.tool_results: dict[str, str] = {}
        self.heard: list[float] = []
        self.closed = trio.Event()

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"websocket": {"url": self.url}}

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._handle,
                                         "127.0.0.1", 0, None)
            self.url = f"ws://127.0.0.1:{server.port}/assistant"
            task_status.started(self.url)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        script = self.script
        if script.refuse_with is not None:
            await request.reject(script.refuse_with)
            return
        ws = await request.accept()
        self.audio_in, self.control_in, self.heard = bytearray(), [], []
        self.closed = trio.Event()
        try:
            start = json.loads(await ws.get_message())
            self.control_in.append(start)
            echo = Echo(script, start.get("audio", self.audio_format) == "mulaw")
            async with trio.open_nursery() as nursery:
                self._scripted(nursery, ws, script)
                silent = trio.current_time() + script.silent_after \
                    if script.silent_after is not None else None
                while True:
                    if silent is not None and trio.current_time() >= silent:
                        await trio.sleep_forever()  # reads and answers nothing any more
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        self.audio_in += message
                        for piece in echo(message):
                            await ws.send_message(piece)
                    else:
                        decoded = json.loads(message)
                        self.control_in.append(decoded)
                        if decoded.get("type") == "barge-in":
                            self.heard.append(float(decoded.get("heard_ms", 0)))
        except* trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def _scripted(self, nursery: trio.Nursery, ws: trio_websocket.WebSocketConnection,
                  script: Script) -> None:
        def later(at: float, message: dict[str, Any] | str) -> None:
            async def send() -> None:
                await trio.sleep(at)
                await ws.send_message(message if isinstance(message, str)
                                      else json.dumps(message))
            nursery.start_soon(send)

        speaking = trio.CancelScope()
        if script.reply:
            nursery.start_soon(self._speak, ws, script.reply, script.reply_at, speaking)
        if script.interrupt_at is not None:
            async def interrupt() -> None:
                await trio.sleep(script.interrupt_at or 0)
                speaking.cancel()  # the assistant stops its own speech, and says so
                await ws.send_message(json.dumps({"type": "interrupted"}))
            nursery.start_soon(interrupt)
        for at, tool, arguments in script.tool_calls:
            later(at, TOOL_MESSAGES[tool](arguments))
        if script.end_at is not None:
            later(script.end_at, {"type": "end", "reason": "done"})
        if script.garbage_at is not None:
            later(script.garbage_at, "{not json")
            later(script.garbage_at, {"type": "no-such-type"})
        if script.drop_after is not None:
            async def drop() -> None:
                await trio.sleep(script.drop_after or 0)
                reset(ws)  # no close frame: the TCP connection just ends
            nursery.start_soon(drop)

    async def _speak(self, ws: trio_websocket.WebSocketConnection, audio: bytes,
                     at: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(at)
            start = trio.current_time()
            size = 640 if self.audio_format == "pcm16" else 160
            for i in range(0, len(audio), size):
                await trio.sleep_until(start + i // size * 0.02)
                await ws.send_message(audio[i:i + size])

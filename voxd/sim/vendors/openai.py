"""A simulated OpenAI Realtime server that follows the documented WebSocket protocol (GA
shape), scripted by the common `Script` (voxd/sim/vendors/script.py): a stand-in for the vendor,
for `voxd demo --provider openai`, the benchmarks and the conformance suite (the daemon never
uses it).

What it checks, as the real server would:
- the upgrade: path /v1/realtime with a `model` query parameter (400 without), the
  `Authorization: Bearer <key>` header (401 with OpenAI's JSON error body otherwise; or, with
  `key_check="event"`, the in-band variant some clients see: the socket opens, an `error`
  event with code invalid_api_key follows, and a close with code 3000);
- the first client event is a `session.update` whose session.type is "realtime", with
  audio.input/output.format `audio/pcmu` or `audio/pcm` at rate 24000 (the only PCM rate);
  anything else gets an `error` event and is listed in `problems`;
- `input_audio_buffer.append` carries base64 audio; `conversation.item.truncate` must name an
  assistant item it sent, content_index 0 and an audio_end_ms no longer than the audio it sent
  for that item (else an `error` event, as the real server answers, and nothing recorded);
  a `function_call_output` must answer a call it made; a `response.create` while a response
  is in progress is refused (one response at a time).

What it sends: `session.created` at once, `session.updated` for each update; the script's
speech as `response.output_audio.delta` inside a response (response.created,
response.output_item.added, deltas, response.output_audio.done,
response.output_audio_transcript.done, response.done); its interruption as
`input_audio_buffer.speech_started` (the response cancelled: response.done status cancelled),
then `speech_stopped` and, when the session asked for transcription, the caller's transcript;
its tool calls as `response.function_call_arguments.done` inside a response; its ending as a
call of the end-call tool (OpenAI has no other way to end a session).

Recorded (ConformantFake): `audio_in` (the caller's audio in voxd's format: mu-law as sent,
or 24 kHz PCM resampled to 16 kHz), `control_in` (every client event but the audio appends),
`tool_results`, `heard` (truncates' audio_end_ms), `closed`. Also `audio_in_vendor` (the bytes
as they came), `headers`, `query`, `session` (the last session.update's session), `problems`,
`rejected_truncates`, `responses_requested`.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import soxr
import trio
import trio_websocket

from voxd.sim.vendors.script import Echo, Script
from voxd.sim.vendors.vapi import reset

__all__ = ["API_KEY", "BAD_KEY_BODY", "FRAME_BYTES", "PCMU", "FakeOpenAI"]

API_KEY = "sk-test-openai-key"
PCMU = {"type": "audio/pcmu"}
FRAME_BYTES = {"mulaw": 160, "pcm16": 960}
"""Bytes of 20 ms on OpenAI's side: pcmu 8 kHz, pcm 24 kHz x 2."""
BAD_KEY_BODY = {"error": {"message": "Incorrect API key provided.", "type":
                          "invalid_request_error", "param": None, "code": "invalid_api_key"}}


class FakeOpenAI:
    """Start with `await nursery.start(fake.serve)`; configure voxd with `sections()` and
    `secrets`."""

    def __init__(self, script: Script | None = None, *, api_key: str = API_KEY,
                 key_check: str = "http", end_call_tool: str = "end_call",
                 direct: bool = False) -> None:
        """`direct`: no proxy in front (a benchmark's lean simulator; `silent_after` then
        silences the session's messages but not its pongs)."""
        self.script = script or Script()
        self.direct = direct
        self.api_key = api_key
        self.key_check = key_check
        self.end_call_tool = end_call_tool
        self.secrets = {"openai_api_key": api_key}
        self.audio_format = "mulaw"
        self.port = 0
        self.proxy = _Proxy()
        self.sessions = 0
        self.upgrades = 0
        self._reset()

    def _reset(self) -> None:
        self.audio_in = bytearray()
        self.audio_in_vendor = bytearray()
        self.control_in: list[dict[str, Any]] = []
        self.tool_results: dict[str, str] = {}
        self.heard: list[float] = []
        self.closed = trio.Event()
        self.connected = trio.Event()
        self.headers: dict[str, str] = {}
        self.query: dict[str, list[str]] = {}
        self.session: dict[str, Any] = {}
        self.problems: list[str] = []
        self.rejected_truncates: list[dict[str, Any]] = []
        self.responses_requested = 0
        self.interruptions = 0

    def sections(self) -> dict[str, dict[str, Any]]:
        """The voxd config that points at this fake."""
        return {"openai": {"base_url": f"ws://127.0.0.1:{self.port}"}}

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._handle,
                                         "127.0.0.1", 0, None)
            self.port = (server.port if self.direct else
                         await nursery.start(self.proxy.serve, server.port))
            task_status.started(self.port)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.upgrades += 1
        self._reset()
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        parts = urlsplit(request.path)
        self.query = parse_qs(parts.query)
        script = self.script
        if script.refuse_with is not None:
            await request.reject(script.refuse_with)
            return
        if parts.path != "/v1/realtime":
            await request.reject(404)
            return
        if not self.query.get("model"):
            await request.reject(400, body=json.dumps({"error": {
                "message": "Missing required parameter: 'model'.",
                "type": "invalid_request_error", "code": "missing_required_parameter"}
            }).encode())
            return
        authorized = self.headers.get("authorization") == f"Bearer {self.api_key}"
        if not authorized and self.key_check == "http":
            await request.reject(401, body=json.dumps(BAD_KEY_BODY).encode())
            return
        ws = await request.accept()
        self.connected.set()
        try:
            if not authorized:
                await ws.send_message(json.dumps({"type": "error", "event_id": "event_0",
                                                  **BAD_KEY_BODY}))
                await ws.aclose(3000, "invalid_request_error.invalid_api_key")
                return
            self.sessions += 1
            await _Session(self, ws).run()
        except* trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed.set()


class _Session:
    """One Realtime session as the fake plays it."""

    def __init__(self, fake: FakeOpenAI, ws: trio_websocket.WebSocketConnection) -> None:
        self.fake = fake
        self.script = fake.script
        self.ws = ws
        self.events = 0
        self.sent_ms: dict[str, float] = {}
        """Assistant item id -> ms of audio sent for it."""
        self.calls: set[str] = set()
        self.echo_item: str | None = None
        self.speaking: trio.CancelScope | None = None
        self.down: soxr.ResampleStream | None = None
        self.mode = "mulaw"
        self.echo = Echo(self.script, ulaw=True)
        self.transcribe = False
        self.started = 0.0
        self.silent = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.silent:
            return
        self.events += 1
        await self.ws.send_message(json.dumps({"event_id": f"event_{self.events}", **message}))

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": {
            "type": "realtime", "object": "realtime.session", "id": "sess_fake",
            "model": self.fake.query["model"][0], "output_modalities": ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000},
                                 "voice": "alloy"}}}})
        first = json.loads(await self.ws.get_message())
        self.fake.control_in.append(first)
        self.started = trio.current_time()
        if first.get("type") != "session.update":
            self.fake.problems.append(f"first event is {first.get('type')!r}, not "
                                      "session.update")
        else:
            await self.session_update(first)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.listen, nursery.cancel_scope)
            nursery.start_soon(self.timeline, nursery)

    async def session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict) or session.get("type") != "realtime":
            await self.error("invalid_request_error", "missing_required_parameter",
                             "Missing required parameter: 'session.type'.", event)
            return
        audio = session.get("audio", {})
        formats = [audio.get("input", {}).get("format"), audio.get("output", {}).get("format")]
        modes = {("mulaw" if f == PCMU else "pcm16" if isinstance(f, dict)
                  and f.get("type") == "audio/pcm" and f.get("rate", 24000) == 24000 else None)
                 for f in formats}
        if len(modes) != 1 or None in modes:
            await self.error("invalid_request_error", "invalid_value",
                             f"Invalid audio formats {formats}.", event)
            return
        self.fake.session = session
        self.mode = self.fake.audio_format = modes.pop()  # type: ignore[assignment]
        self.echo = Echo(self.script, ulaw=self.mode == "mulaw")
        if self.mode == "pcm16" and self.down is None:
            self.down = soxr.ResampleStream(24000, 16000, 1, dtype="int16")
        self.transcribe = bool(audio.get("input", {}).get("transcription"))
        await self.send({"type": "session.updated", "session": session})

    async def error(self, kind: str, code: str, message: str,
                    event: dict[str, Any] | None = None) -> None:
        self.fake.problems.append(f"{code}: {message}")
        await self.send({"type": "error", "error": {
            "type": kind, "code": code, "message": message, "param": None,
            "event_id": (event or {}).get("event_id")}})

    # -- what voxd sends --

    async def listen(self, scope: trio.CancelScope) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                scope.cancel()
                return
            if self.silent:
                continue
            event = json.loads(message)
            kind = event.get("type")
            if kind == "input_audio_buffer.append":
                await self.audio(event)
                continue
            self.fake.control_in.append(event)
            if kind == "session.update":
                await self.session_update(event)
            elif kind == "conversation.item.truncate":
                await self.truncate(event)
            elif kind == "conversation.item.create":
                await self.item_create(event)
            elif kind == "response.create":
                if self.speaking is not None or self.echo_item is not None:
                    await self.error("invalid_request_error",
                                     "conversation_already_has_active_response",
                                     "Conversation already has an active response in "
                                     "progress.", event)
                    continue
                self.fake.responses_requested += 1
                await self.send({"type": "response.created", "response": {"id": _id("resp")}})
                await self.send({"type": "response.done", "response": {
                    "id": _id("resp"), "status": "completed", "output": []}})
            elif kind == "response.cancel":
                if self.speaking is None and self.echo_item is None:
                    await self.error("invalid_request_error", "response_cancel_not_active",
                                     "Cancellation failed: no active response found.", event)
                else:
                    await self.stop_speaking("client_cancelled")
            else:
                await self.error("invalid_request_error", "invalid_value",
                                 f"Invalid value: '{kind}'.", event)

    async def audio(self, event: dict[str, Any]) -> None:
        try:
            chunk = base64.b64decode(event.get("audio", ""), validate=True)
        except (binascii.Error, TypeError):
            await self.error("invalid_request_error", "invalid_value",
                             "Invalid 'audio'. Expected base64-encoded audio.", event)
            return
        fake = self.fake
        fake.audio_in_vendor += chunk
        if self.down is not None:
            samples = np.frombuffer(chunk[: len(chunk) & ~1], dtype="<i2")
            fake.audio_in += self.down.resample_chunk(samples).astype("<i2").tobytes()
        else:
            fake.audio_in += chunk
        pieces = self.echo(chunk)
        if pieces:
            if self.echo_item is None:
                self.echo_item = await self.open_item()
            item = self.echo_item
            for piece in pieces:
                await self.delta(item, piece)
            if self.script.echo_after > 0:  # a turn said back: its response is done
                self.echo_item = None
                await self.close_item(item, "completed")

    async def truncate(self, event: dict[str, Any]) -> None:
        item_id, end = event.get("item_id"), event.get("audio_end_ms")
        sent = self.sent_ms.get(item_id) if isinstance(item_id, str) else None
        problem = ("Only assistant message items can be truncated." if sent is None else
                   "content_index must be 0." if event.get("content_index") != 0 else
                   "audio_end_ms must be an integer >= 0." if not isinstance(end, int)
                   or end < 0 else
                   f"Audio content of {sent:.0f}ms is shorter than {end}ms." if end > sent
                   else None)
        if problem is not None:
            self.fake.rejected_truncates.append(event)
            await self.error("invalid_request_error", "invalid_value", problem, event)
            return
        self.fake.heard.append(float(end))  # type: ignore[arg-type]
        self.sent_ms[item_id] = float(end)  # type: ignore[arg-type,index]
        await self.send({"type": "conversation.item.truncated", "item_id": item_id,
                         "content_index": 0, "audio_end_ms": end})

    async def item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self.error("invalid_request_error", "missing_required_parameter",
                             "Missing required parameter: 'item'.", event)
            return
        if item.get("type") == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if call_id not in self.calls or not isinstance(output, str):
                await self.error("invalid_request_error", "invalid_value",
                                 f"No function call with call_id {call_id!r}.", event)
                return
            self.fake.tool_results[call_id] = output
        elif item.get("type") == "message":
            content = item.get("content")
            if item.get("role") not in ("user", "system", "assistant") or not (
                    isinstance(content, list) and content
                    and all(isinstance(c, dict) and c.get("type") == "input_text"
                            and isinstance(c.get("text"), str) for c in content)):
                await self.error("invalid_request_error", "invalid_value",
                                 "Invalid message item.", event)
                return
        else:
            await self.error("invalid_request_error", "invalid_value",
                             f"Invalid item type {item.get('type')!r}.", event)
            return
        await self.send({"type": "conversation.item.created", "item": {"id": _id("item"),
                                                                        **item}})

    # -- what the script says --

    async def open_item(self) -> str:
        item_id = _id("item")
        self.sent_ms[item_id] = 0.0
        await self.send({"type": "response.created", "response": {"id": _id("resp"),
                                                                  "status": "in_progress"}})
        await self.send({"type": "response.output_item.added", "output_index": 0, "item": {
            "id": item_id, "type": "message", "role": "assistant", "status": "in_progress"}})
        return item_id

    async def delta(self, item_id: str, chunk: bytes) -> None:
        self.sent_ms[item_id] = self.sent_ms.get(item_id, 0.0) + len(chunk) / (
            8 if self.mode == "mulaw" else 48)
        await self.send({"type": "response.output_audio.delta", "item_id": item_id,
                         "response_id": "resp", "output_index": 0, "content_index": 0,
                         "delta": base64.b64encode(chunk).decode()})

    async def close_item(self, item_id: str, status: str, reason: str | None = None) -> None:
        await self.send({"type": "response.output_audio.done", "item_id": item_id,
                         "output_index": 0, "content_index": 0})
        await self.send({"type": "response.output_audio_transcript.done", "item_id": item_id,
                         "output_index": 0, "content_index": 0, "transcript": "a reply"})
        details = {"type": status, "reason": reason} if reason else None
        await self.send({"type": "response.done", "response": {
            "id": _id("resp"), "status": status, "status_details": details}})

    async def speak(self, audio: bytes) -> None:
        if self.mode == "pcm16":
            samples = np.frombuffer(audio[: len(audio) & ~1], dtype="<i2")
            audio = soxr.resample(samples, 16000, 24000).astype("<i2").tobytes()
        size = FRAME_BYTES[self.mode]
        scope = self.speaking = trio.CancelScope()
        item_id = await self.open_item()
        with scope:
            start = trio.current_time()
            for i in range(0, len(audio), size):
                await trio.sleep_until(start + i // size * 0.020)
                await self.delta(item_id, audio[i:i + size])
        if self.speaking is scope:
            self.speaking = None
            await self.close_item(item_id, "completed")

    async def stop_speaking(self, reason: str) -> None:
        """The response being spoken is cancelled (the server's VAD, or the client)."""
        for item_id in [i for i in (self.echo_item,) if i is not None]:
            await self.close_item(item_id, "cancelled", reason)
        self.echo_item = None
        if self.speaking is not None:
            self.speaking.cancel()
            self.speaking = None
            await self.send({"type": "response.done", "response": {
                "id": _id("resp"), "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": reason}}})

    async def interrupt(self) -> None:
        self.fake.interruptions += 1
        user_item = _id("item")
        at_ms = int((trio.current_time() - self.started) * 1000)
        await self.send({"type": "input_audio_buffer.speech_started", "item_id": user_item,
                         "audio_start_ms": at_ms})
        await self.stop_speaking("turn_detected")
        await trio.sleep(0.3)
        await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": user_item,
                         "audio_end_ms": at_ms + 300})
        if self.transcribe:
            await trio.sleep(0.05)
            await self.send({"type": "conversation.item.input_audio_transcription.completed",
                             "item_id": user_item, "content_index": 0,
                             "transcript": "the caller's words",
                             "usage": {"type": "duration", "seconds": 0.3}})

    async def tool_call(self, name: str, arguments: dict[str, Any]) -> None:
        call_id, item_id, response_id = _id("call"), _id("item"), _id("resp")
        self.calls.add(call_id)
        item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name}
        await self.send({"type": "response.created", "response": {"id": response_id}})
        await self.send({"type": "response.output_item.added", "response_id": response_id,
                         "output_index": 0, "item": {**item, "arguments": ""}})
        await self.send({"type": "response.function_call_arguments.done", "item_id": item_id,
                         "response_id": response_id, "output_index": 0, "call_id": call_id,
                         "name": name, "arguments": json.dumps(arguments)})
        await self.send({"type": "response.output_item.done", "response_id": response_id,
                         "output_index": 0, "item": {**item,
                                                     "arguments": json.dumps(arguments)}})
        await self.send({"type": "response.done", "response": {"id": response_id,
                                                               "status": "completed"}})

    async def timeline(self, nursery: trio.Nursery) -> None:
        """The script's actions, each at its time since the session.update."""
        script = self.script
        actions: list[tuple[float, Any]] = []
        if script.reply:
            actions.append((script.reply_at,
                            lambda: nursery.start_soon(self.speak, script.reply)))
        if script.interrupt_at is not None:
            actions.append((script.interrupt_at,
                            lambda: nursery.start_soon(self.interrupt)))
        for at, name, arguments in script.tool_calls:
            actions.append((at, lambda n=name, a=arguments: self.tool_call(n, a)))
        if script.end_at is not None:
            actions.append((script.end_at, lambda: self.tool_call(self.fake.end_call_tool,
                                                                  {})))
        if script.garbage_at is not None:
            actions.append((script.garbage_at, self.garbage))
        if script.drop_after is not None:
            actions.append((script.drop_after, lambda: self.drop(nursery)))
        if script.silent_after is not None:
            actions.append((script.silent_after, self.go_silent))
        for at, action in sorted(actions, key=lambda a: a[0]):
            await trio.sleep_until(self.started + at)
            result = action()
            if result is not None:
                await result

    async def garbage(self) -> None:
        await self.ws.send_message("{this is not json")
        await self.send({"type": "response.brand_new_event", "x": {"y": [1, 2]}})

    async def drop(self, nursery: trio.Nursery) -> None:
        reset(self.ws)  # no close frame: voxd sees the connection lost
        nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    async def go_silent(self) -> None:
        self.silent = True
        if self.speaking is not None:
            self.speaking.cancel()
        self.fake.proxy.freeze()  # not even pongs
        await trio.lowlevel.checkpoint()


class _Proxy:
    """Forwards each connection to the fake; `freeze` silences the newest one (nothing
    forwarded either way, not even pongs) while it still notices voxd closing it."""

    def __init__(self) -> None:
        self.newest: list[bool] = [False]
        """The newest connection's frozen flag (a cell, shared with its pipes)."""
        self.target = 0

    def freeze(self) -> None:
        self.newest[0] = True

    async def serve(self, target: int,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        self.target = target
        await trio.serve_listeners(self._link, listeners)

    async def _link(self, client: trio.SocketStream) -> None:
        frozen = self.newest = [False]
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server, frozen, nursery.cancel_scope)
            nursery.start_soon(self._pipe, server, client, frozen, nursery.cancel_scope)

    @staticmethod
    async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream, frozen: list[bool],
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                if not frozen[0]:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side is gone: so is the link


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"

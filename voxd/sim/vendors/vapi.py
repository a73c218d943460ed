"""A simulated Vapi that follows its documented WebSocket transport (shared/reference/...):
a stand-in for the vendor, for `voxd demo --provider vapi`, the benchmarks and the tests (the
daemon never uses it).

- `POST /call` (HTTP, Quart-Trio on Hypercorn): checks `Authorization: Bearer`, validates the
  body the way Vapi documents it, answers `{"id", "status", "transport": {"provider",
  "websocketCallUrl"}}`, or the scripted failure (statuses, delay, no answer at all).
- The call socket (trio-websocket, its own port, optionally behind a FreezableProxy): audio in
  the negotiated format as binary frames both ways, JSON control as text. Its "assistant"
  answers each caller utterance with that same audio after `response_delay`, bracketed by
  speech-update messages, and says `user-interrupted` when the caller talks over it.
  Scripted faults: abrupt drop, clean end (status-update ended), garbage, silence (freeze).
  Scripted in-call control: client-side `tool-calls` (transfer, keys, end) and any other
  message (`transfer-update`) at given times; what voxd sends back (`add-message`, `end-call`)
  is kept in `control_in`. Optionally (`transcripts`) the transcripts of both sides.
"""

from __future__ import annotations

import collections
import json
import socket
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import hypercorn.trio
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio

from voxd.audio.vad import (
    SpeechDetector,
    SpeechEdge,
    frame_energy_dbfs_pcm16,
    frame_energy_dbfs_ulaw,
)
from voxd.sim.vendors.proxy import FreezableProxy
from voxd.sim.vendors.script import Script

__all__ = [
    "FORMATS",
    "ConformantVapi",
    "FakeCall",
    "FakeVapi",
    "VapiScript",
    "reset",
    "tool_calls_message",
    "transcript",
]

FORMATS = {("pcm_s16le", 16000): 640, ("mulaw", 8000): 160}
"""(format, sampleRate) Vapi accepts -> bytes per 20 ms frame."""


@dataclass
class VapiScript:
    """How the fake behaves; tests change fields before (or during) a call."""

    api_key: str = "vapi-test-key"
    create_statuses: list[int] = field(default_factory=list)
    """Statuses answered (in order) before the call is created, e.g. [429, 503]."""
    create_delay: float = 0.0
    create_hangs: bool = False
    retry_after: str | None = None
    response_delay: float = 0.2
    burst: bool = False
    """Send each reply as fast as possible instead of in real time."""
    first_message: bytes = b""
    interrupt_message: str = "user-interrupted"
    """'user-interrupted' or 'speech-update' (the documented fallback)."""
    drop_after: float | None = None
    end_after: float | None = None
    garbage: bool = False
    socket_at_accept: str | None = None
    """'close' (a close frame right after the 101) or 'reset' (TCP reset right after it): a
    call Vapi already ended by itself."""
    tool_calls_at: list[tuple[float, list[tuple[str, Any]]]] = field(default_factory=list)
    """(seconds after the socket opened, [(tool name, arguments)]): the model calls
    client-side function tools (`tool-calls`, as Vapi sends them to the client)."""
    messages_at: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(seconds, message): any other control message, e.g. a `transfer-update`."""
    echo_frames: bool = False
    """Say every piece of caller audio straight back as it arrives (a load test's echo),
    instead of answering each utterance after `response_delay`."""
    transcripts: bool = False
    """Send `transcript` messages as Vapi does: for each caller utterance a partial then a
    final one (role user, "caller utterance N"), and for each reply a final one (role
    assistant, "reply N"); also one with a role that is neither."""


@dataclass
class FakeCall:
    """One call as the fake saw it."""

    id: str
    body: dict[str, Any]
    frame_bytes: int
    socket_headers: dict[str, str] = field(default_factory=dict)
    audio_in: bytearray = field(default_factory=bytearray)
    control_in: list[dict[str, Any]] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    reply_started: list[float] = field(default_factory=list)
    frame_arrivals: list[float] = field(default_factory=list)
    """When each whole frame of caller audio arrived."""
    turn_ends: list[int] = field(default_factory=list)
    """For each reply to the caller: the index of the last voiced frame it answers."""
    interruptions: int = 0
    frames_out: int = 0
    """Audio messages sent to voxd."""
    connected: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)


class FakeVapi:
    """Start with `await nursery.start(fake.serve)`; then point vapi.base_url at `base_url`."""

    def __init__(self, script: VapiScript | None = None, *, via_proxy: bool = False) -> None:
        self.script = script or VapiScript()
        self.via_proxy = via_proxy
        self.calls: dict[str, FakeCall] = {}
        self.create_requests: list[dict[str, Any]] = []
        self.created = trio.Event()
        """Set once the first call has been created."""
        self.base_url = ""
        self.proxy: FreezableProxy | None = None
        self._ws_port = 0

    @property
    def last_call(self) -> FakeCall:
        return list(self.calls.values())[-1]

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(trio_websocket.serve_websocket, self._transport,
                                            "127.0.0.1", 0, None)
            self._ws_port = ws_server.port
            if self.via_proxy:
                self.proxy = FreezableProxy(self._ws_port)
                self._ws_port = await nursery.start(self.proxy.serve)
            config = HypercornConfig()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            config.errorlog = None
            binds = await nursery.start(hypercorn.trio.serve, self._http_app(), config)
            self.base_url = binds[0]
            task_status.started(self.base_url)

    # -- POST /call --

    def _http_app(self) -> QuartTrio:
        app = QuartTrio("fake-vapi")

        @app.post("/call")
        async def create_call() -> tuple[dict[str, Any], int] | tuple[str, int, dict[str, str]]:
            script = self.script
            body = await request.get_json(force=True, silent=True)
            self.create_requests.append({"headers": dict(request.headers), "body": body})
            if script.create_hangs:
                await trio.sleep_forever()
            await trio.sleep(script.create_delay)
            if request.headers.get("Authorization") != f"Bearer {script.api_key}":
                return {"message": "Invalid Key. Hot tip, you may be using the private key "
                        "instead of the public key, or vice versa.", "statusCode": 401}, 401
            status = script.create_statuses.pop(0) if script.create_statuses else None
            if status is not None:
                headers = {"Retry-After": script.retry_after} if script.retry_after else {}
                return json.dumps({"message": "try later", "statusCode": status}), status, headers
            problem = _validate(body)
            if problem:
                return {"message": [problem], "error": "Bad Request", "statusCode": 400}, 400
            fmt = body["transport"]["audioFormat"]
            call = FakeCall(id=str(uuid.uuid4()), body=body,
                            frame_bytes=FORMATS[(fmt["format"], fmt["sampleRate"])])
            self.calls[call.id] = call
            self.created.set()
            url = f"ws://127.0.0.1:{self._ws_port}/{call.id}/transport"
            return {"id": call.id, "status": "queued", "type": "vapi.websocketCall",
                    "transport": {"provider": "vapi.websocket", "websocketCallUrl": url}}, 201

        return app

    # -- the call socket --

    async def _transport(self, req: trio_websocket.WebSocketRequest) -> None:
        call_id = req.path.strip("/").split("/")[0]
        call = self.calls.get(call_id)
        headers = {k.decode(): v.decode() for k, v in req.headers}
        if call is None or headers.get("authorization") != f"Bearer {self.script.api_key}":
            await req.reject(404 if call is None else 401)
            return
        ws = await req.accept()
        call.socket_headers = headers
        call.connected.set()
        if self.script.socket_at_accept is not None:
            if self.script.socket_at_accept == "reset":
                reset(ws)
            else:
                await ws.aclose(1000, "call already ended")
            call.closed.set()
            return
        try:
            async with trio.open_nursery() as nursery:
                assistant = _Assistant(self.script, call, ws, nursery)
                nursery.start_soon(assistant.listen)
                nursery.start_soon(assistant.faults, nursery.cancel_scope)
                nursery.start_soon(assistant.scripted)
                if self.script.first_message:
                    nursery.start_soon(assistant.speak, self.script.first_message)
        except* trio_websocket.ConnectionClosed:
            pass  # voxd hung up, or the script closed the socket
        finally:
            call.closed.set()


class _Assistant:
    def __init__(self, script: VapiScript, call: FakeCall,
                 ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        self.script = script
        self.call = call
        self.ws = ws
        self.nursery = nursery
        pcm = call.frame_bytes == 640
        self.energy = frame_energy_dbfs_pcm16 if pcm else frame_energy_dbfs_ulaw
        self.detector = SpeechDetector(min_speech_ms=60, hangover_ms=300)
        self.utterance: list[bytes] = []
        self.recent: collections.deque[bytes] = collections.deque(maxlen=10)
        self.speaking: trio.CancelScope | None = None
        self.pending = b""

    async def listen(self) -> None:
        size = self.call.frame_bytes
        while True:
            message = await self.ws.get_message()
            if isinstance(message, str):
                control = json.loads(message)
                self.call.control_in.append(control)
                if control.get("type") == "end-call":
                    await self.ws.aclose()
                    self.nursery.cancel_scope.cancel()
                    return
                continue
            self.call.audio_in += message
            if self.script.echo_frames:
                await self.ws.send_message(message)
                self.call.frames_out += 1
                continue
            self.pending += message
            while len(self.pending) >= size:
                frame, self.pending = self.pending[:size], self.pending[size:]
                self.call.frame_arrivals.append(trio.current_time())
                await self.on_frame(frame)

    async def on_frame(self, frame: bytes) -> None:
        detector = self.detector
        edge = detector.update(self.energy(frame))
        if edge is SpeechEdge.STARTED:
            late = detector.frames_seen - 1 - (detector.speech_started_at_frame or 0)
            self.utterance = list(self.recent)[len(self.recent) - late:] if late else []
            if self.speaking is not None:  # the caller talks over the assistant
                self.speaking.cancel()
                self.speaking = None
                self.call.interruptions += 1
                if self.script.interrupt_message == "speech-update":
                    await self.send({"type": "speech-update", "status": "started",
                                     "role": "user", "turn": 1})
                else:
                    await self.send({"type": "user-interrupted", "turnId": "t1"})
        if detector.in_speech or edge is SpeechEdge.STOPPED:
            self.utterance.append(frame)
        self.recent.append(frame)
        if edge is SpeechEdge.STOPPED:
            self.call.turn_ends.append(detector.speech_ended_at_frame or 0)
            if self.script.transcripts:
                said = f"caller utterance {len(self.call.turn_ends)}"
                await self.send(transcript("user", said[:9], final=False))
                await self.send(transcript("user", said, final=True))
                await self.send(transcript("system", "not a party", final=True))
            hangover = detector.frames_seen - 1 - (detector.speech_ended_at_frame or 0)
            self.nursery.start_soon(self.reply, b"".join(self.utterance[:-hangover]))

    async def reply(self, audio: bytes) -> None:
        await trio.sleep(self.script.response_delay)
        await self.speak(audio)

    async def speak(self, audio: bytes) -> None:
        scope = self.speaking = trio.CancelScope()
        with scope:
            self.call.replies.append(audio)
            self.call.reply_started.append(trio.current_time())
            await self.send({"type": "speech-update", "status": "started", "role": "assistant"})
            if self.script.transcripts:
                await self.send(transcript("assistant", f"reply {len(self.call.replies)}",
                                           final=True))
            size = self.call.frame_bytes
            start = trio.current_time()
            for i in range(0, len(audio), size):
                if not self.script.burst:
                    await trio.sleep_until(start + (i // size) * 0.020)
                await self.ws.send_message(audio[i:i + size])
                self.call.frames_out += 1
            await self.send({"type": "speech-update", "status": "stopped", "role": "assistant"})
        if self.speaking is scope:
            self.speaking = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))
        if self.script.garbage:
            await self.ws.send_message("{this is not json")
            await self.ws.send_message('{"no_type": true}')

    async def scripted(self) -> None:
        """The script's tool calls and messages, each at its time."""
        start = trio.current_time()
        timed = [(at, tool_calls_message(calls)) for at, calls in self.script.tool_calls_at]
        timed += self.script.messages_at
        for at, message in sorted(timed, key=lambda item: item[0]):
            await trio.sleep_until(start + at)
            await self.send(message)

    async def faults(self, scope: trio.CancelScope) -> None:
        script = self.script
        if script.garbage:
            await self.ws.send_message("garbage!")
            await self.send({"type": "transcript", "role": "user", "transcriptType": "partial",
                             "transcript": "hel"})
            await self.send({"type": "something-new", "x": 1})
        if script.drop_after is not None:
            await trio.sleep(script.drop_after)
            await self.ws._stream.aclose()  # abrupt: no close frame (code 1006 at voxd)
            scope.cancel()
        elif script.end_after is not None:
            await trio.sleep(script.end_after)
            await self.send({"type": "status-update", "status": "ended",
                             "endedReason": "assistant-ended-call"})
            await self.ws.aclose()
            scope.cancel()


def transcript(role: str, text: str, *, final: bool) -> dict[str, Any]:
    """A `transcript` message as Vapi sends it to the client."""
    return {"type": "transcript", "role": role,
            "transcriptType": "final" if final else "partial", "transcript": text}


def tool_calls_message(calls: list[tuple[str, Any]]) -> dict[str, Any]:
    """A `tool-calls` client message as Vapi documents it (ClientMessageToolCalls)."""
    listed = []
    for name, arguments in calls:
        call = {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": name, "arguments": arguments}}
        listed.append({"type": "function", "function": {"name": name}, "toolCall": call})
    return {"type": "tool-calls", "toolCallList": [item["toolCall"] for item in listed],
            "toolWithToolCallList": listed, "timestamp": 0}


def _validate(body: Any) -> str | None:
    """The checks Vapi documents for a websocket call (what a 400 would name)."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if bool(body.get("assistantId")) == bool(body.get("assistant")):
        return "exactly one of assistantId or assistant must be given"
    if "phoneNumberId" in body or "phoneNumber" in body:
        return "phoneNumber is not allowed with the vapi.websocket transport"
    transport = body.get("transport")
    if not isinstance(transport, dict) or transport.get("provider") != "vapi.websocket":
        return "transport.provider must be vapi.websocket"
    fmt = transport.get("audioFormat", {})
    if fmt.get("container") != "raw" or (fmt.get("format"), fmt.get("sampleRate")) not in FORMATS:
        return f"unsupported transport.audioFormat {fmt}"
    return None


def reset(ws: trio_websocket.WebSocketConnection) -> None:
    """Close the socket under a WebSocket with a TCP reset (no close frame, no FIN)."""
    sock = ws._stream.socket  # type: ignore[attr-defined]  # trio-websocket's, private
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ConformantVapi:
    """FakeVapi driven by the conformance suite's `Script` (voxd/sim/vendors/script.py), in Vapi's
    words: echo = its turn-taking reply with the caller's own words, reply = the first message
    (at once), tool calls = `tool-calls`, end = `status-update` ended, refuse / fail_first =
    the answers to `POST /call`, drop, garbage."""

    def __init__(self) -> None:
        self.script = Script()
        self.fake = FakeVapi()
        self.secrets = {"vapi_api_key": self.fake.script.api_key}
        self.audio_format = "pcm16"
        self.tool_results: dict[str, str] = {}
        self.heard: list[float] = []

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"vapi": {"base_url": self.fake.base_url, "assistant_id": "asst-conformance",
                         "early_start": False}}

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self._apply()
        await self.fake.serve(task_status)

    def _apply(self) -> None:
        """The Script as a VapiScript (re-read at each call: `script` is a property below)."""
        s = self._script
        v = self.fake.script
        v.response_delay = 0.1 if s.echo else 3600.0
        v.first_message = s.reply
        v.tool_calls_at = [(at, [(name, args)]) for at, name, args in s.tool_calls]
        v.end_after = s.end_at
        v.drop_after = s.drop_after
        v.garbage = s.garbage_at is not None
        v.create_statuses = ([s.refuse_with] * 5 if s.refuse_with is not None
                             else [503] * s.fail_first)

    @property
    def script(self) -> Any:
        return self._script

    @script.setter
    def script(self, value: Any) -> None:
        self._script = value
        if hasattr(self, "fake"):
            self._apply()

    def _call(self) -> FakeCall | None:
        return self.fake.last_call if self.fake.calls else None

    @property
    def audio_in(self) -> bytearray:
        call = self._call()
        return call.audio_in if call is not None else bytearray()

    @property
    def control_in(self) -> list[dict[str, Any]]:
        """voxd's JSON messages, after a placeholder for the session's opening message that
        other vendors have (Vapi's call is set up by `POST /call` instead)."""
        call = self._call()
        return [{}, *call.control_in] if call is not None else []

    @property
    def closed(self) -> trio.Event:
        call = self._call()
        return call.closed if call is not None else trio.Event()

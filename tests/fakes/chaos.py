"""Misbehaving peers for bench/chaos.py: a Twilio side and two assistants (the generic
`websocket` protocol, and Vapi on top of tests/fakes/vapi.py) that do, per call, what a plan
says: behave, or hang up at any moment, drop, reset (SO_LINGER 0), stall, flood or send garbage.

Everything here is written on raw trio sockets with `websockets`' sans-I/O protocol (not voxd's
own net layer, which is what is under test), so each side can end a connection in every way
TCP allows. All traffic is to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import struct
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from twilio.request_validator import RequestValidator
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tests.fakes.vapi import FORMATS, FakeCall, FakeVapi, _validate
from voxd.sim.caller import SimulatorError, parse_twiml

FRAME_SECONDS = 0.020
PEER_BOUND = 30.0
"""No misbehaving peer holds a connection longer than this (a stall ends here)."""
SMALL_RCVBUF = 16384
"""Receive buffer of the fakes' sockets: a peer that stops reading blocks its sender soon."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)


# -- plans ------------------------------------------------------------------------------------

TWILIO_FAULTS = (
    "webhook-only", "tcp-close", "garbage-head", "close-at-101", "reset-at-101", "no-start",
    "silent-after-connect", "close-mid-turn", "drop-mid-turn", "reset-mid-turn", "stall-send",
    "stall-read", "flood", "garbage-json", "binary-frame", "huge-message", "huge-payload",
    "bad-token", "forged-from", "unsigned-upgrade",
)
ASSISTANT_FAULTS = (
    "refuse", "close-at-101", "reset-at-101", "close-later", "error-close-later",
    "drop-later", "reset-later", "stall-read", "stall-send", "flood", "flood-big",
    "flood-too-big", "garbage", "end-later", "reset-after-end",
)
CREATE_FAULTS = ("429-once", "500-always", "timeout", "bad-json", "slow")
"""Vapi `POST /call` misbehaviours."""

FORGED_FROM = "+19990000666"


@dataclass
class Plan:
    """What one call's peers do. `at` is when (seconds into the stream) a timed fault hits."""

    call_sid: str
    twilio: str = "good"
    assistant: str = "good"
    create: str = "ok"
    seconds: float = 4.0
    """How long the Twilio side streams (before hanging up normally, if it gets that far)."""
    at: float = 1.0
    variant: int = 0
    """Picks among a fault's flavours (which garbage, close code, ...)."""

    @property
    def good(self) -> bool:
        return self.twilio == "good" and self.assistant == "good" and self.create == "ok"


def make_plan(rng: random.Random, good_share: float, vapi: bool) -> Plan:
    """A seeded plan: good, or one side misbehaving (sometimes both)."""
    seconds = rng.uniform(2.0, 9.0)
    plan = Plan(f"CA{rng.getrandbits(128):032x}", seconds=seconds,
                at=rng.uniform(0.0, min(3.0, seconds - 0.5)), variant=rng.randrange(1000))
    if rng.random() < good_share:
        return plan
    roll = rng.random()
    # hanging up before the stream is the commonest fault of real callers: weighted up
    twilio = rng.choices(TWILIO_FAULTS, [4 if f == "webhook-only" else 1 for f in TWILIO_FAULTS])
    if roll < 0.45:
        plan.twilio = twilio[0]
    elif roll < 0.9:
        plan.assistant = rng.choice(ASSISTANT_FAULTS)
    else:
        plan.twilio = twilio[0]
        plan.assistant = rng.choice(ASSISTANT_FAULTS)
    if vapi and rng.random() < 0.15:
        plan.create = rng.choice(CREATE_FAULTS)
    if plan.twilio == "webhook-only" and vapi and rng.random() < 0.5:
        # the early call is never claimed; voxd ends it after 30 s on a socket that may be dead
        plan.assistant = rng.choice(("reset-at-101", "close-at-101", "reset-after-end",
                                     "refuse"))
    return plan


# -- a WebSocket on a raw socket --------------------------------------------------------------


def reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET, not a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class RawWs:
    """A WebSocket on a trio socket, framed by `websockets`' sans-I/O protocol."""

    def __init__(self, stream: trio.SocketStream, proto: ClientProtocol | ServerProtocol,
                 pending: list[object] | None = None) -> None:
        self.stream = stream
        self.proto = proto
        self.messages: deque[str | bytes] = deque()
        self.closed_event = trio.Event()
        self._parts: list[bytes] = []
        self.reading = False
        self._lock = trio.StrictFIFOLock()
        self._take(pending or [])

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set()

    def _closed(self) -> None:
        self.closed_event.set()

    def _take(self, events: list[object]) -> None:
        for frame in events:
            if not isinstance(frame, Frame):
                continue
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                if frame.opcode is not Opcode.CONT:
                    self._parts = [frame.opcode.name.encode()]
                self._parts.append(bytes(frame.data))
                if frame.fin:
                    kind, *data = self._parts
                    body = b"".join(data)
                    self.messages.append(body.decode("utf-8", "replace") if kind == b"TEXT"
                                         else body)
            elif frame.opcode is Opcode.CLOSE:
                self._closed()

    async def receive(self) -> str | bytes | None:
        """The next message; None once the connection is closed or broken. One task reads."""
        self.reading = True
        try:
            while not self.messages:
                if self.closed:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except _GONE:
                    data = b""
                try:
                    if data:
                        self.proto.receive_data(data)
                    else:
                        self.proto.receive_eof()
                        self._closed()
                except EOFError:  # data after the end: the connection is over anyway
                    self._closed()
                self._take(self.proto.events_received())
                await self._flush()  # pongs and close replies
            return self.messages.popleft()
        finally:
            self.reading = False

    async def _flush(self) -> None:
        data = b"".join(self.proto.data_to_send())
        if data:
            await self.write(data)

    async def write(self, data: bytes) -> None:
        """Raw bytes on the socket (garbage included); a broken socket marks it closed."""
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except _GONE:
                self._closed()

    async def send(self, message: str | bytes, *, text_bytes: bytes | None = None) -> None:
        """One message (str: text, bytes: binary; `text_bytes`: a text frame of raw bytes)."""
        try:
            if text_bytes is not None:
                self.proto.send_text(text_bytes)
            elif isinstance(message, str):
                self.proto.send_text(message.encode())
            else:
                self.proto.send_binary(message)
        except InvalidState:
            self._closed()
            return
        await self._flush()

    async def close(self, code: int = 1000) -> None:
        """A clean close: close frame, the peer's answer (briefly), then FIN."""
        with contextlib.suppress(InvalidState):
            self.proto.send_close(code, "")
        await self._flush()
        with trio.move_on_after(1):
            if self.reading:  # another task reads: it sees the answer
                await self.closed_event.wait()
            else:
                while await self.receive() is not None:
                    pass
        await self.drop()

    async def drop(self) -> None:
        """FIN without a close frame."""
        self._closed()
        with contextlib.suppress(*_GONE):
            await self.stream.aclose()

    def reset(self) -> None:
        self._closed()
        reset(self.stream)


async def read_request(stream: trio.SocketStream) -> tuple[ServerProtocol, Request] | None:
    """Read a WebSocket upgrade request (server side); None if the peer went away first."""
    proto = ServerProtocol(max_size=None)
    with trio.move_on_after(10):
        while True:
            try:
                data = await stream.receive_some(65536)
            except _GONE:
                return None
            if not data:
                return None
            proto.receive_data(data)
            for event in proto.events_received():
                if isinstance(event, Request):
                    return proto, event
    return None


async def accept(stream: trio.SocketStream, proto: ServerProtocol, request: Request) -> RawWs:
    proto.send_response(proto.accept(request))
    ws = RawWs(stream, proto)
    await ws._flush()
    return ws


async def refuse(stream: trio.SocketStream, proto: ServerProtocol, status: int) -> None:
    proto.send_response(proto.reject(status, "refused by the chaos fake\n"))
    with contextlib.suppress(*_GONE):
        await stream.send_all(b"".join(proto.data_to_send()))
        await stream.aclose()


async def listen(handler: Any, task_status: trio.TaskStatus[int]) -> None:
    """Serve `handler(stream)` on a free loopback port with small receive buffers."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for listener in listeners:
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


# -- the assistant side -----------------------------------------------------------------------


@dataclass
class AssistantRecord:
    """One call as an assistant fake saw it (keyed by CallSid)."""

    connections: int = 0
    started: bool = False
    start: dict[str, Any] = field(default_factory=dict)
    frames_in: int = 0
    frames_out: int = 0
    fault: str = ""
    ended_by_voxd: bool = False


GARBAGE_CONTROL: tuple[str | bytes, ...] = (
    "{not json", "[]", "null", '"a string"', '{"type": 7}', '{"type": "end-call-ish"}',
    '{"type": "interrupted", "extra": {"deep": [1, 2, 3]}}', '{"type": "speech-started"}',
    "x" * 70000, '{"type": "status-update", "status": 5}', '{"type":"speech-update"}',
    b"\x01", b"",
)


class Behaviour:
    """Runs one accepted assistant connection as the plan says, loopback-echoing otherwise."""

    def __init__(self, ws: RawWs, plan: Plan, record: AssistantRecord, frame_bytes: int,
                 end_message: str, ended: str) -> None:
        self.ws = ws
        self.plan = plan
        self.record = record
        self.frame_bytes = frame_bytes
        self.end_message = end_message
        """What voxd sends when the caller hangs up."""
        self.ended = ended
        """What this assistant sends to end the call itself."""
        self.echo = True
        self.stalled = False

    async def run(self) -> None:
        fault = self.plan.assistant
        with trio.move_on_after(PEER_BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fault, fault, nursery.cancel_scope)
                await self._loop(fault)
                nursery.cancel_scope.cancel()
        if not self.ws.closed:
            self.ws.reset()

    async def _loop(self, fault: str) -> None:
        ws = self.ws
        while (message := await ws.receive()) is not None:
            if self.stalled:  # stop reading (pings go unanswered too); the socket stays up
                await trio.sleep(PEER_BOUND)
                return
            if isinstance(message, bytes):
                self.record.frames_in += 1
                if self.echo:
                    await ws.send(message)
                    self.record.frames_out += 1
            elif message == self.end_message or _type(message) == _type(self.end_message):
                self.record.ended_by_voxd = True
                if fault == "reset-after-end":
                    ws.reset()
                else:
                    await ws.close()
                return

    async def _fault(self, fault: str, scope: trio.CancelScope) -> None:
        ws, plan = self.ws, self.plan
        await trio.sleep(plan.at + (plan.variant % 7) * 0.3)
        self.record.fault = fault
        if fault in ("close-later", "error-close-later"):
            await ws.close(1000 if fault == "close-later" else 1011)
        elif fault == "drop-later":
            await ws.drop()
        elif fault == "reset-later":
            ws.reset()
        elif fault == "stall-read":
            self.stalled = True
            return
        elif fault == "stall-send":
            self.echo = False
            return
        elif fault == "flood":
            chunk = bytes(range(256)) * (self.frame_bytes // 256 + 1)
            for _ in range(1500 + plan.variant):  # 30 s and more of audio at once
                await ws.send(chunk[:self.frame_bytes])
                if ws.closed:
                    break
            return
        elif fault in ("flood-big", "flood-too-big"):
            size = 300_000 if fault == "flood-big" else 3 * 1024 * 1024
            await ws.send(bytes(size - size % self.frame_bytes))
            return
        elif fault == "garbage":
            for i, item in enumerate(GARBAGE_CONTROL):
                if (plan.variant + i) % 3 == 0:
                    continue
                await ws.send(item)
            await ws.send("", text_bytes=b"\xff\xfe bad utf-8")
            return
        elif fault == "end-later":
            await ws.send(self.ended)
            return
        else:
            return
        scope.cancel()


def _type(text: str) -> object:
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message.get("type") if isinstance(message, dict) else None


class ChaosAssistant:
    """The generic `websocket` provider's assistant. Its upgrade request does not say which
    call it is for, so faults before the 101 are drawn per connection (`connection_faults`
    counts them; the plan's own faults apply once the `start` message names the call)."""

    END = '{"type":"end"}'

    def __init__(self, plans: dict[str, Plan], seed: int, connection_fault_rate: float = 0.04,
                 audio: str = "pcm16") -> None:
        self.plans = plans
        self.rng = random.Random(seed)
        self.rate = connection_fault_rate
        self.frame_bytes = 640 if audio == "pcm16" else 160
        self.records: dict[str, AssistantRecord] = {}
        self.connection_faults = 0
        self.url = ""

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(listen, self._handle)
            self.url = f"ws://127.0.0.1:{port}/assistant"
            task_status.started(self.url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(PEER_BOUND + 15):
            await self._connection(stream)
        with contextlib.suppress(*_GONE):
            await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        got = await read_request(stream)
        if got is None:
            return
        proto, request = got
        if self.rng.random() < self.rate:
            self.connection_faults += 1
            fault = self.rng.choice(("refuse", "close-before-101", "reset-before-101",
                                     "close-at-101", "reset-at-101", "not-http"))
            if fault == "refuse":
                await refuse(stream, proto, self.rng.choice((401, 404, 500, 503)))
            elif fault == "close-before-101":
                await stream.aclose()
            elif fault == "reset-before-101":
                reset(stream)
            elif fault == "not-http":
                with contextlib.suppress(*_GONE):
                    await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff")
                    await stream.aclose()
            else:
                ws = await accept(stream, proto, request)
                ws.reset() if fault == "reset-at-101" else await ws.drop()
            return
        ws = await accept(stream, proto, request)
        with trio.move_on_after(5):
            first = await ws.receive()
        if not isinstance(first, str):
            ws.reset()
            return
        start = json.loads(first)
        sid = str(start.get("callSid", ""))
        plan = self.plans.get(sid) or Plan(sid)
        record = self.records.setdefault(sid, AssistantRecord())
        record.connections += 1
        record.started = True
        record.start = start
        fault = plan.assistant
        if fault in ("refuse", "close-at-101", "reset-at-101"):
            # known only now (after `start`): the nearest this protocol allows
            record.fault = fault
            await ws.close(1011) if fault == "refuse" else (
                ws.reset() if fault == "reset-at-101" else await ws.drop())
            return
        await Behaviour(ws, plan, record, self.frame_bytes, self.END,
                        '{"type":"end","reason":"chaos"}').run()


class ChaosVapi(FakeVapi):
    """tests/fakes/vapi.py's API (`POST /call`, validated as Vapi documents it) with per-call
    faults on create, and call sockets (one URL per call, so every fault is the call's own)
    served on raw sockets: refuse, close or reset at the 101, and the Behaviour faults."""

    def __init__(self, plans: dict[str, Plan]) -> None:
        super().__init__()
        self.plans = plans
        self.records: dict[str, AssistantRecord] = {}
        self.created_for: dict[str, list[str]] = {}
        """CallSid -> ids of the Vapi calls created for it."""
        self.sid_of: dict[str, str] = {}
        self.connect_attempts: dict[str, int] = {}
        """Vapi call id -> socket connections attempted to it."""
        self._create_attempts: dict[str, int] = {}

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        import hypercorn.trio
        from hypercorn.config import Config as HypercornConfig

        async with trio.open_nursery() as nursery:
            self._ws_port = await nursery.start(listen, self._handle)
            config = HypercornConfig()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            config.errorlog = None
            binds = await nursery.start(hypercorn.trio.serve, self._http_app(), config)
            self.base_url = binds[0]
            task_status.started(self.base_url)

    def _http_app(self) -> Any:
        from quart import request
        from quart_trio import QuartTrio

        app = QuartTrio("chaos-vapi")

        @app.post("/call")
        async def create_call() -> Any:
            body = await request.get_json(force=True, silent=True)
            sid = str(((body or {}).get("metadata") or {}).get("twilioCallSid", ""))
            plan = self.plans.get(sid) or Plan(sid)
            attempt = self._create_attempts[sid] = self._create_attempts.get(sid, 0) + 1
            if request.headers.get("Authorization") != f"Bearer {self.script.api_key}":
                return {"message": "Invalid Key", "statusCode": 401}, 401
            if plan.create == "429-once" and attempt == 1:
                return {"message": "slow down", "statusCode": 429}, 429, {"Retry-After": "0.2"}
            if plan.create == "500-always":
                return {"message": "boom", "statusCode": 500}, 500
            if plan.create == "timeout":
                await trio.sleep(PEER_BOUND)
                return {"message": "too late"}, 504
            if plan.create == "bad-json":
                return "<html>gateway</html>", 200
            if plan.create == "slow":
                await trio.sleep(1.5)
            problem = _validate(body)
            if problem:
                return {"message": [problem], "error": "Bad Request", "statusCode": 400}, 400
            fmt = body["transport"]["audioFormat"]
            call = FakeCall(id=str(uuid.uuid4()), body=body,
                            frame_bytes=FORMATS[(fmt["format"], fmt["sampleRate"])])
            self.calls[call.id] = call
            self.created_for.setdefault(sid, []).append(call.id)
            self.sid_of[call.id] = sid
            url = f"ws://127.0.0.1:{self._ws_port}/{call.id}/transport"
            return {"id": call.id, "status": "queued", "type": "vapi.websocketCall",
                    "transport": {"provider": "vapi.websocket", "websocketCallUrl": url}}, 201

        return app

    async def _handle(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(PEER_BOUND + 15):
            await self._connection(stream)
        with contextlib.suppress(*_GONE):
            await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        got = await read_request(stream)
        if got is None:
            return
        proto, request = got
        call_id = request.path.strip("/").split("/")[0]
        call = self.calls.get(call_id)
        if call is None or request.headers.get("Authorization") != \
                f"Bearer {self.script.api_key}":
            await refuse(stream, proto, 404 if call is None else 401)
            return
        self.connect_attempts[call_id] = self.connect_attempts.get(call_id, 0) + 1
        sid = self.sid_of[call_id]
        plan = self.plans.get(sid) or Plan(sid)
        record = self.records.setdefault(sid, AssistantRecord())
        record.connections += 1
        fault = plan.assistant
        if fault == "refuse":
            record.fault = fault
            await refuse(stream, proto, (404, 500, 503)[plan.variant % 3])
            return
        ws = await accept(stream, proto, request)
        record.started = True
        if fault in ("close-at-101", "reset-at-101"):
            record.fault = fault
            ws.reset() if fault == "reset-at-101" else await ws.drop()
            return
        ended = json.dumps({"type": "status-update", "status": "ended",
                            "endedReason": "assistant-ended-call"})
        await Behaviour(ws, plan, record, call.frame_bytes, '{"type":"end-call"}', ended).run()


# -- the Twilio side --------------------------------------------------------------------------


@dataclass
class CallerRecord:
    """One call as the Twilio side saw it."""

    plan: Plan
    upgrade_sent: bool = False
    got_101: bool = False
    start_sent: bool = False
    start_held: bool = False
    """The socket stayed up 0.5 s after `start` without this side ending it: voxd read it."""
    frames_sent: int = 0
    frames_back: int = 0
    stop_sent: bool = False
    closed_by_voxd: bool = False
    error: str = ""
    done: bool = False
    seconds: float = 0.0
    """How long the call took, webhook to the end."""

    @property
    def lost(self) -> int:
        return max(0, self.frames_sent - self.frames_back)


class ChaosCaller:
    """Twilio for one call, following its plan; signs the webhook and the upgrade."""

    def __init__(self, webhook_url: str, auth_token: str, plan: Plan,
                 payloads: list[str]) -> None:
        self.webhook_url = webhook_url
        self.validator = RequestValidator(auth_token)
        self.plan = plan
        self.record = CallerRecord(plan)
        self.payloads = payloads
        """The caller's audio, base64 20 ms frames (repeated as long as the call lasts)."""
        self.stream_sid = "MZ" + plan.call_sid[2:]

    async def run(self, client: httpx.AsyncClient) -> None:
        began = trio.current_time()
        try:
            with trio.move_on_after(PEER_BOUND + 20):
                await self._run(client)
        except (SimulatorError, httpx.HTTPError, OSError, *_GONE) as exc:
            self.record.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.record.done = True
            self.record.seconds = trio.current_time() - began

    async def _run(self, client: httpx.AsyncClient) -> None:
        plan = self.plan
        form = {"CallSid": plan.call_sid, "AccountSid": "AC" + "0" * 32,
                "From": "+15005550006", "To": "+15005550001", "CallStatus": "ringing",
                "ApiVersion": "2010-04-01", "Direction": "inbound"}
        response = await client.post(self.webhook_url, data=form, headers={
            "X-Twilio-Signature": self.validator.compute_signature(self.webhook_url, form)})
        if response.status_code != 200:
            raise SimulatorError(f"webhook answered HTTP {response.status_code}")
        stream = parse_twiml(response.text)
        fault = plan.twilio
        if fault == "webhook-only":
            return
        url = stream.url
        if fault == "bad-token":  # the per-call token is the stream URL's last path segment
            base, _, token = url.rpartition("/")
            url = base + "/" + (token + "%C3%A9", "", token[:-1] + "x", "%00%01" * 8,
                                "y" * 20000)[plan.variant % 5]
        uri = parse_uri(url)
        tcp = await trio.open_tcp_stream(uri.host, uri.port)
        try:
            await self._stream(tcp, uri, url, stream.parameters)
        finally:
            if fault not in ("reset-at-101", "reset-mid-turn"):
                with contextlib.suppress(*_GONE):
                    await tcp.aclose()
            else:
                tcp.socket.close()

    async def _stream(self, tcp: trio.SocketStream, uri: Any, url: str,
                      parameters: dict[str, str]) -> None:
        plan, record, fault = self.plan, self.record, self.plan.twilio
        if fault == "stall-read":
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if fault == "tcp-close":
            await trio.sleep(plan.at / 3)
            return
        if fault == "garbage-head":
            record.upgrade_sent = True
            junk = (b"GET /media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
                    b"GET /media-stream HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n")
            with contextlib.suppress(*_GONE):
                await tcp.send_all(junk[plan.variant % 3])
                with trio.move_on_after(2):
                    await tcp.receive_some(4096)
            return
        proto = ClientProtocol(uri, max_size=None)
        request = proto.connect()
        if fault != "unsigned-upgrade":
            request.headers["X-Twilio-Signature"] = self.validator.compute_signature(url, {})
        proto.send_request(request)
        record.upgrade_sent = True
        await tcp.send_all(b"".join(proto.data_to_send()))
        if fault == "close-at-101":
            return
        if fault == "reset-at-101" and plan.variant % 2 == 0:
            reset(tcp)
            return
        with trio.move_on_after(10):
            while proto.state.name == "CONNECTING":
                data = await tcp.receive_some(65536)
                if not data:
                    return
                proto.receive_data(data)
        if proto.state.name != "OPEN":
            return
        record.got_101 = True
        ws = RawWs(tcp, proto, proto.events_received())
        if fault == "reset-at-101":
            ws.reset()
            return
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        if fault == "no-start":
            await trio.sleep(plan.at)
            await (ws.close() if plan.variant % 2 else ws.drop())
            return
        if fault == "silent-after-connect":  # voxd's start_timeout ends it
            with trio.move_on_after(PEER_BOUND):
                while await ws.receive() is not None:
                    pass
            record.closed_by_voxd = ws.closed
            return
        with trio.move_on_after(plan.seconds + 15):  # voxd's own timeouts are shorter
            await self._call(ws, parameters)

    def _start(self, parameters: dict[str, str]) -> str:
        plan, params = self.plan, dict(parameters)
        if plan.twilio == "forged-from":
            params["from"] = FORGED_FROM
        return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid,
                           "start": {"streamSid": self.stream_sid, "callSid": plan.call_sid,
                                     "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                                     "customParameters": params,
                                     "mediaFormat": {"encoding": "audio/x-mulaw",
                                                     "sampleRate": 8000, "channels": 1}}})

    def _media(self, i: int, payload: str | None = None) -> str:
        return (f'{{"event":"media","streamSid":"{self.stream_sid}","media":{{"track":"inbound",'
                f'"chunk":"{i + 1}","timestamp":"{i * 20}",'
                f'"payload":"{payload or self.payloads[i % len(self.payloads)]}"'
                f'}}}}')

    async def _call(self, ws: RawWs, parameters: dict[str, str]) -> None:
        record = self.record
        await ws.send(self._start(parameters))
        record.start_sent = True
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, ws, nursery.cancel_scope)
            await self._send(ws, started)
            nursery.cancel_scope.cancel()
        if record.start_sent and not record.start_held and not record.closed_by_voxd:
            record.start_held = trio.current_time() - started >= 0.5

    async def _receive(self, ws: RawWs, scope: trio.CancelScope) -> None:
        stalled = self.plan.twilio == "stall-read"
        stall_at = trio.current_time() + self.plan.at
        while True:
            if stalled and trio.current_time() >= stall_at:
                await trio.sleep(PEER_BOUND)  # stop reading; the sender keeps going
            message = await ws.receive()
            if message is None:
                self.record.closed_by_voxd = True
                scope.cancel()
                return
            if isinstance(message, str):
                if message.startswith('{"event":"media"'):
                    self.record.frames_back += 1
                elif '"mark"' in message[:20]:
                    with contextlib.suppress(ValueError, KeyError):
                        name = json.loads(message)["mark"]["name"]
                        await ws.send(json.dumps({"event": "mark", "streamSid": self.stream_sid,
                                                  "mark": {"name": name}}))

    async def _send(self, ws: RawWs, started: float) -> None:
        plan, record, fault = self.plan, self.record, self.plan.twilio
        frames = max(1, round(plan.seconds / FRAME_SECONDS))
        fault_frame = round(plan.at / FRAME_SECONDS)
        for i in range(frames):
            if ws.closed:
                record.closed_by_voxd = True
                return
            if fault == "flood" and i >= fault_frame:
                await ws.send(self._media(i))
                record.frames_sent += 1
                if i % 50 == 0:
                    await trio.lowlevel.checkpoint()
                continue
            await trio.sleep_until(started + (i + 1) * FRAME_SECONDS)
            if i == fault_frame and await self._fault(ws):
                return
            if i * FRAME_SECONDS >= 0.5:
                record.start_held = True
            await ws.send(self._media(i))
            record.frames_sent += 1
        # the rest of the echo, then hang up as Twilio does
        with trio.move_on_after(3):  # polled, bounded
            while record.frames_back < record.frames_sent and not ws.closed:  # noqa: ASYNC110
                await trio.sleep(0.02)
        record.stop_sent = True
        await ws.send(f'{{"event":"stop","sequenceNumber":"9","streamSid":"{self.stream_sid}"}}')
        with trio.move_on_after(5):
            await ws.closed_event.wait()
        if not ws.closed:
            await ws.close()

    async def _fault(self, ws: RawWs) -> bool:
        """Apply the plan's mid-stream fault; True if the call is over for this side."""
        plan, fault = self.plan, self.plan.twilio
        if fault == "close-mid-turn":
            await ws.close(1000 if plan.variant % 2 else 1001)
        elif fault == "drop-mid-turn":
            await ws.drop()
        elif fault == "reset-mid-turn":
            ws.reset()
        elif fault == "stall-send":
            with trio.move_on_after(PEER_BOUND):  # voxd's media_timeout should end it
                await ws.closed_event.wait()
            self.record.closed_by_voxd = ws.closed
        elif fault == "garbage-json":
            for junk in ("{nope", "[1,2]", '{"event":"media"}', '{"event":"dance"}',
                         '{"event":"media","media":{"payload":"!!!notbase64"}}')[plan.variant % 5:]:
                await ws.send(junk)
            return False
        elif fault == "binary-frame":
            await ws.send(b"\x00" * (plan.variant + 1))
            return False
        elif fault == "huge-message":
            await ws.send("x" * (100_000 + plan.variant * 1000))
            return False
        elif fault == "huge-payload":
            big = base64.b64encode(bytes(9000)).decode()
            await ws.send(self._media(0, big))
            return False
        else:
            return False
        return True

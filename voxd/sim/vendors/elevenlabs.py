"""A simulated ElevenLabs Agents platform that follows the documented WebSocket protocol
(elevenlabs.io/docs/agents-platform/api-reference/agents-platform/websocket, the AsyncAPI file
of elevenlabs-docs, the official Python SDK), driven by the common `Script`
(voxd/sim/vendors/script.py): a `ConformantFake`. A stand-in for the vendor, for `voxd demo
--provider elevenlabs`, the benchmarks and the tests (the daemon never uses it).

- `GET /v1/convai/conversation/get-signed-url?agent_id=ID` (Quart-Trio on Hypercorn): checks the
  `xi-api-key` header (401 otherwise, with ElevenLabs' `{"detail": {...}}` body), answers
  `{"signed_url": "ws://.../v1/convai/conversation?agent_id=ID&conversation_signature=T"}`;
  Script.fail_first: 503 for the first N; Script.refuse_with: that status (a private agent).
- The conversation socket (trio-websocket behind a FreezableProxy, for Script.silent_after):
  `agent_id` must name the agent (404); a private agent (`signed=True`) needs a signature it
  issued (403); a wrong `xi-api-key` header is 401; Script.refuse_with refuses the upgrade (a
  public agent). Then the first message must be `conversation_initiation_client_data` with
  dynamic variables of strings, numbers or booleans (else a 1008 close naming the problem, as
  ElevenLabs does); the fake answers `conversation_initiation_metadata` with its
  `input_format`/`output_format`, pings every `ping_interval` (recording the pongs), takes
  `{"user_audio_chunk": b64}` (recorded in `audio_in`, said back as `audio` events if
  Script.echo), speaks Script.reply at reply_at (with a `user_transcript` and an
  `agent_response` first, if `transcripts`), sends `interruption` (and then, as a late packet
  would, one more audio event of the interrupted turn, which voxd must drop), client tool calls,
  ends the conversation by closing with 1000, drops, goes silent, or sends garbage.

What voxd sent: `control_in` (every JSON message but audio chunks and pongs, in order),
`tool_results` ({tool_call_id: result}), `tool_errors` (ids answered with is_error), `pongs`,
`initiation` (the first message), `headers` and `path` of the upgrade, `signed_url_requests`.
ElevenLabs has no way for a client to say how much of an interrupted turn was heard: `heard`
stays empty.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hypercorn.trio
import numpy as np
import soxr
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio

from voxd.audio.g711 import DECODE_TABLE, ENCODE_TABLE
from voxd.sim.vendors.proxy import FreezableProxy
from voxd.sim.vendors.script import Echo, Script

__all__ = [
    "CONVERSATION_PATH",
    "ELEVENLABS_NAMES",
    "FORMATS",
    "VOXD_NAMES",
    "Converter",
    "FakeElevenLabs",
    "bytes_per_20ms",
    "convert",
]

FORMATS = {"ulaw_8000": ("ulaw", 8000), "pcm_8000": ("pcm", 8000),
           "pcm_16000": ("pcm", 16000), "pcm_22050": ("pcm", 22050),
           "pcm_24000": ("pcm", 24000), "pcm_44100": ("pcm", 44100),
           "pcm_48000": ("pcm", 48000)}
VOXD_NAMES = {"ulaw_8000": "mulaw", "pcm_16000": "pcm16"}
ELEVENLABS_NAMES = {"mulaw": "ulaw_8000", "pcm16": "pcm_16000"}
CONVERSATION_PATH = "/v1/convai/conversation"


def bytes_per_20ms(name: str) -> int:
    encoding, rate = FORMATS[name]
    return rate // 50 * (1 if encoding == "ulaw" else 2)


class Converter:
    """A stream of audio from one ElevenLabs format to another (soxr for rates: a different
    resampler from voxd's, so the tests compare two implementations)."""

    def __init__(self, source: str, target: str) -> None:
        self.source, self.target = source, target
        src_rate, dst_rate = FORMATS[source][1], FORMATS[target][1]
        # QQ: steady output for 20 ms chunks (better qualities release it in bursts)
        self.stream = (soxr.ResampleStream(src_rate, dst_rate, 1, dtype="int16", quality="QQ")
                       if src_rate != dst_rate else None)

    def __call__(self, data: bytes) -> bytes:
        if self.source == self.target or not data:
            return data
        samples = (DECODE_TABLE.take(np.frombuffer(data, np.uint8))
                   if FORMATS[self.source][0] == "ulaw"
                   else np.frombuffer(data[:len(data) & ~1], "<i2").astype(np.int16))
        if self.stream is not None:
            samples = self.stream.resample_chunk(samples).astype(np.int16)
        if FORMATS[self.target][0] == "ulaw":
            return ENCODE_TABLE.take(samples.view(np.uint16)).tobytes()
        return samples.astype("<i2").tobytes()


def convert(data: bytes, source: str, target: str) -> bytes:
    """Audio from one ElevenLabs format to another, in one piece."""
    return Converter(source, target)(data)


@dataclass
class FakeElevenLabs:
    """Start with `await nursery.start(fake.serve)`; then `fake.sections()` and `fake.secrets`
    configure voxd for it."""

    script: Script = field(default_factory=Script)
    api_key: str = "xi-test-key"
    agent_id: str = "agent_0123test"
    signed: bool = False
    """A private agent: the socket takes only signed URLs (voxd needs elevenlabs.signed_url)."""
    input_format: str = "ulaw_8000"
    output_format: str = "ulaw_8000"
    ping_interval: float = 0.5
    transcripts: bool = True
    direct: bool = False
    """No proxy in front of the conversation socket (a benchmark's lean simulator;
    `silent_after` then silences the agent's messages but not its pongs)."""
    stale_audio_after_interrupt: bool = True
    allowed_overrides: frozenset[str] = frozenset({"agent.first_message", "agent.prompt.prompt",
                                                   "agent.language", "tts.voice_id"})
    """The fields the agent lets a conversation override (its Security settings); any other
    is refused with a 1008 close, as ElevenLabs does."""

    audio_in: bytearray = field(default_factory=bytearray)
    control_in: list[dict[str, Any]] = field(default_factory=list)
    tool_results: dict[str, str] = field(default_factory=dict)
    tool_errors: set[str] = field(default_factory=set)
    heard: list[float] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)
    connected: trio.Event = field(default_factory=trio.Event)
    initiation: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    pongs: list[int] = field(default_factory=list)
    pings_sent: int = 0
    audio_events_sent: int = 0
    interrupted_event_id: int | None = None
    connections: int = 0
    signed_url_requests: list[dict[str, str]] = field(default_factory=list)
    close_code: int | None = None
    """The code the fake closed the last conversation with (None: voxd closed it)."""

    def __post_init__(self) -> None:
        self.ws_origin = ""
        self.api_origin = ""
        self.proxy: FreezableProxy | None = None
        self._signatures: set[str] = set()
        self._failed = 0

    # -- what the conformance suite reads --

    @property
    def audio_format(self) -> str:
        """The format the agent asks voxd for (voxd's name where it has one)."""
        return VOXD_NAMES.get(self.input_format, self.input_format)

    @audio_format.setter
    def audio_format(self, value: str) -> None:
        self.input_format = self.output_format = ELEVENLABS_NAMES.get(value, value)

    @property
    def secrets(self) -> dict[str, str]:
        return {"elevenlabs_api_key": self.api_key}

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"elevenlabs": {"base_url": self.ws_origin, "api_base_url": self.api_origin,
                               "agent_id": self.agent_id, "signed_url": self.signed}}

    # -- serving --

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._conversation,
                                         "127.0.0.1", 0, None)
            self.proxy = FreezableProxy(server.port)
            port = server.port if self.direct else await nursery.start(self.proxy.serve)
            self.ws_origin = f"ws://127.0.0.1:{port}"
            config = HypercornConfig()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            config.errorlog = None
            binds = await nursery.start(hypercorn.trio.serve, self._http_app(), config)
            self.api_origin = binds[0]
            task_status.started(self.ws_origin)

    def _http_app(self) -> QuartTrio:
        app = QuartTrio("fake-elevenlabs")

        @app.get("/v1/convai/conversation/get-signed-url")
        async def get_signed_url() -> tuple[dict[str, Any], int]:
            self.signed_url_requests.append({"xi-api-key": request.headers.get("xi-api-key", ""),
                                             **request.args})
            if self.script.refuse_with is not None and self.signed:
                return _error("refused", "Scripted refusal"), self.script.refuse_with
            if self._failed < self.script.fail_first:
                self._failed += 1
                return _error("service_unavailable", "Try again later"), 503
            if request.headers.get("xi-api-key") != self.api_key:
                return _error("invalid_api_key", "Invalid API key"), 401
            if request.args.get("agent_id") != self.agent_id:
                return _error("agent_not_found", "Agent not found"), 404
            token = secrets.token_urlsafe(16)
            self._signatures.add(token)
            url = (f"{self.ws_origin}{CONVERSATION_PATH}?agent_id={self.agent_id}"
                   f"&conversation_signature={token}")
            return {"signed_url": url}, 200

        return app

    # -- one conversation --

    async def _conversation(self, req: trio_websocket.WebSocketRequest) -> None:
        self.connections += 1
        headers = {k.decode().lower(): v.decode() for k, v in req.headers}
        target = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(target.query).items()}
        self.headers, self.path = headers, req.path
        if self.script.refuse_with is not None and not self.signed:
            await req.reject(self.script.refuse_with)
            return
        if target.path != CONVERSATION_PATH or query.get("agent_id") != self.agent_id:
            await req.reject(404)
            return
        if self.signed and query.get("conversation_signature") not in self._signatures:
            await req.reject(403)
            return
        if "xi-api-key" in headers and headers["xi-api-key"] != self.api_key:
            await req.reject(401)
            return
        ws = await req.accept()
        self._reset()
        self.connected.set()
        try:
            await self._talk(ws)
        except* trio_websocket.ConnectionClosed:
            pass  # voxd hung up, or the script closed the socket
        finally:
            self.closed.set()

    def _reset(self) -> None:
        self.audio_in = bytearray()
        self.control_in = []
        self.tool_results = {}
        self.tool_errors = set()
        self.heard = []
        self.closed = trio.Event()
        self.initiation = {}
        self.pongs = []
        self.pings_sent = 0
        self.audio_events_sent = 0
        self.interrupted_event_id = None
        self.close_code = None
        if self.proxy is not None and self.proxy.frozen.is_set():
            self.proxy.frozen = trio.Event()  # a new call through a thawed proxy

    async def _talk(self, ws: trio_websocket.WebSocketConnection) -> None:
        first: str | bytes | None = None
        with trio.move_on_after(5):
            first = await ws.get_message()
        problem = "no first message" if first is None else _initiation_problem(
            first, self.allowed_overrides)
        if problem is not None or first is None:
            await self._close(ws, 1008, problem or "no first message")
            return
        self.initiation = json.loads(first)
        self.control_in.append(self.initiation)
        await ws.send_message(json.dumps({
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": {
                "conversation_id": "conv_" + secrets.token_hex(8),
                "agent_output_audio_format": self.output_format,
                "user_input_audio_format": self.input_format}}))
        agent = _Agent(self, ws)
        async with trio.open_nursery() as nursery:
            agent.nursery = nursery
            nursery.start_soon(agent.listen)
            nursery.start_soon(agent.ping)
            nursery.start_soon(agent.scripted)
        if agent.ending:  # the conversation ends: once nothing else sends, a normal close
            await self._close(ws, 1000, "Conversation ended")

    async def _close(self, ws: trio_websocket.WebSocketConnection, code: int,
                     reason: str) -> None:
        self.close_code = code
        await ws.aclose(code, reason)


class _Agent:
    """The agent's side of one conversation."""

    def __init__(self, fake: FakeElevenLabs, ws: trio_websocket.WebSocketConnection) -> None:
        self.fake = fake
        self.script = fake.script
        self.ws = ws
        self.nursery: trio.Nursery | None = None
        self.speaking: trio.CancelScope | None = None
        self.event_id = 0
        self.frozen = False
        self.ending = False
        self.echo = Converter(fake.input_format, fake.output_format)
        self.echoes = Echo(self.script, ulaw=FORMATS[fake.input_format][0] == "ulaw")

    async def send(self, message: dict[str, Any] | str) -> None:
        if self.frozen:
            return
        await self.ws.send_message(message if isinstance(message, str) else
                                   json.dumps(message))

    async def audio(self, data: bytes) -> None:
        self.event_id += 1
        self.fake.audio_events_sent += 1
        await self.send({"type": "audio", "audio_event": {
            "audio_base_64": base64.b64encode(data).decode(), "event_id": self.event_id}})

    async def listen(self) -> None:
        fake = self.fake
        while True:
            message = await self.ws.get_message()
            if isinstance(message, bytes):
                await fake._close(self.ws, 1003, "binary frames are not accepted")
                return
            data = json.loads(message)
            if "user_audio_chunk" in data:
                chunk = base64.b64decode(data["user_audio_chunk"], validate=True)
                fake.audio_in += chunk
                if self.speaking is None:
                    for piece in self.echoes(chunk):
                        await self.audio(self.echo(piece))
            elif data.get("type") == "pong":
                fake.pongs.append(data["event_id"])
            else:
                fake.control_in.append(data)
                if data.get("type") == "client_tool_result":
                    fake.tool_results[data["tool_call_id"]] = data["result"]
                    if data.get("is_error"):
                        fake.tool_errors.add(data["tool_call_id"])

    async def ping(self) -> None:
        for n in range(1, 1_000_000):
            await trio.sleep(self.fake.ping_interval)
            self.fake.pings_sent += 1
            await self.send({"type": "ping", "ping_event": {"event_id": n,
                                                            "ping_ms": 40 if n > 1 else None}})

    async def scripted(self) -> None:
        """Everything the script times, in order."""
        script = self.script
        timed: list[tuple[float, int, Any]] = []
        if script.reply:
            timed.append((script.reply_at, 0, self.reply))
        if script.interrupt_at is not None:
            timed.append((script.interrupt_at, 1, self.interrupt))
        for n, (at, name, arguments) in enumerate(script.tool_calls):
            timed.append((at, 2, _bound(self.tool_call, f"tool_{n + 1}", name, arguments)))
        if script.garbage_at is not None:
            timed.append((script.garbage_at, 3, self.garbage))
        if script.silent_after is not None:
            timed.append((script.silent_after, 4, self.silence))
        if script.end_at is not None:
            timed.append((script.end_at, 5, self.end))
        if script.drop_after is not None:
            timed.append((script.drop_after, 6, self.drop))
        start = trio.current_time()
        for at, _, action in sorted(timed, key=lambda item: (item[0], item[1])):
            await trio.sleep_until(start + at)
            await action()

    async def reply(self) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self._speak, self.script.reply)

    async def _speak(self, words: bytes) -> None:
        fake = self.fake
        audio = convert(words, ELEVENLABS_NAMES.get(fake.audio_format, fake.audio_format),
                        fake.output_format)
        scope = self.speaking = trio.CancelScope()
        with scope:
            if fake.transcripts:
                await self.send({"type": "user_transcript",
                                 "user_transcription_event": {"user_transcript": "Hello there."}})
                await trio.sleep(0.05)
                await self.send({"type": "agent_response",
                                 "agent_response_event": {"agent_response": "Hi! How can I help?"}})
            size = bytes_per_20ms(fake.output_format)
            start = trio.current_time()
            for i in range(0, len(audio), size):
                await trio.sleep_until(start + i // size * 0.020)
                await self.audio(audio[i:i + size])
        if self.speaking is scope:
            self.speaking = None

    async def interrupt(self) -> None:
        if self.speaking is not None:
            self.speaking.cancel()
            self.speaking = None
        interrupted = self.event_id
        self.fake.interrupted_event_id = interrupted
        await self.send({"type": "interruption", "interruption_event": {"event_id": interrupted}})
        if self.fake.stale_audio_after_interrupt and interrupted > 0:
            # A packet of the interrupted turn still on its way: voxd must not play it.
            loud = convert((np.full(160, 12000, np.int16)).astype("<i2").tobytes(), "pcm_8000",
                           self.fake.output_format)
            await self.send({"type": "audio", "audio_event": {
                "audio_base_64": base64.b64encode(loud).decode(), "event_id": interrupted}})
        await self.send({"type": "agent_response_correction", "agent_response_correction_event": {
            "original_agent_response": "Hi! How can I help?",
            "corrected_agent_response": "Hi!"}})

    async def tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        await self.send({"type": "client_tool_call", "client_tool_call": {
            "tool_name": name, "tool_call_id": call_id, "parameters": arguments}})

    async def garbage(self) -> None:
        await self.send("{this is not json")
        await self.send({"type": "something_new", "something_new_event": {"x": 1}})

    async def silence(self) -> None:
        self.frozen = True
        assert self.fake.proxy is not None
        self.fake.proxy.freeze()

    async def end(self) -> None:
        self.ending = True  # closed by `_talk` once every task here has stopped sending
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    async def drop(self) -> None:
        await self.ws._stream.aclose()  # abrupt: no close frame (code 1006 at voxd)
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()


def _bound(fn: Any, *args: Any) -> Any:
    async def call() -> None:
        await fn(*args)

    return call


def _error(status: str, message: str) -> dict[str, Any]:
    """ElevenLabs' error body."""
    return {"detail": {"status": status, "message": message}}


def _initiation_problem(first: str | bytes, allowed: frozenset[str]) -> str | None:
    """Why the first message is not a valid `conversation_initiation_client_data` (None: it
    is)."""
    try:
        message = json.loads(first)
    except (TypeError, ValueError):
        return "the first message is not JSON"
    if not isinstance(message, dict) or message.get("type") != \
            "conversation_initiation_client_data":
        return "the first message must be conversation_initiation_client_data"
    variables = message.get("dynamic_variables", {})
    if not isinstance(variables, dict):
        return "dynamic_variables must be an object"
    for name, value in variables.items():
        if not isinstance(value, str | int | float | bool):
            return f"dynamic variable {name} must be a string, number or boolean"
    override = message.get("conversation_config_override", {})
    if not isinstance(override, dict):
        return "conversation_config_override must be an object"
    for path in _leaves(override):
        if path not in allowed:
            return f"Override for field '{path}' is not allowed by config."
    return None


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for name, value in tree.items():
        path = prefix + name
        paths += _leaves(value, path + ".") if isinstance(value, dict) and value else [path]
    return paths

"""A simulated Deepgram Voice Agent that follows the documented protocol
(developers.deepgram.com/reference/voice-agent/voice-agent and the /docs/voice-agent-* pages): a
stand-in for the vendor, for `voxd demo --provider deepgram`, the benchmarks and the tests (the
daemon never uses it).

- `wss://…/v1/agent/converse` with `Authorization: Token <key>` (or `Bearer <token>`): a
  missing or wrong one is refused with HTTP 401, another path with 404;
- `Welcome {request_id}` as soon as the socket opens; the client's first message must be a
  valid `Settings` (the audio formats Deepgram takes, agent listen/think/speak, functions with
  only documented fields); `SettingsApplied`, or `Error` + close for a bad one (or audio before
  it);
- then raw audio as binary frames both ways, in the Settings' formats; `UserStartedSpeaking`,
  `ConversationText`, `AgentStartedSpeaking {total_latency, tts_latency, ttt_latency}`,
  `AgentAudioDone`, `LatencyReport`, `FunctionCallRequest {functions: [{id, name, arguments,
  client_side}]}` from the server; `FunctionCallResponse {id, name, content}`,
  `InjectUserMessage`, `UpdatePrompt` (-> `PromptUpdated`), `KeepAlive` from the client
  (anything else: `Error` UNPARSABLE_CLIENT_MESSAGE, as Deepgram does).

What it does on a call comes from a `voxd.sim.vendors.script.Script` (it is a `ConformantFake`);
the Deepgram-specific knobs (a Settings error, transcripts, latency reports, any message at a
time) are attributes of the fake.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from voxd.sim.vendors.proxy import FreezableProxy
from voxd.sim.vendors.script import Echo, Script

__all__ = ["FORMATS", "LATENCY", "PATH", "FakeDeepgram"]

PATH = "/v1/agent/converse"
INPUT_ENCODINGS = {"linear16", "linear32", "flac", "alaw", "mulaw", "amr-nb", "amr-wb", "opus",
                   "ogg-opus", "speex", "g729"}
OUTPUT_ENCODINGS = {"linear16", "mulaw", "alaw", "mp3", "opus", "flac", "aac"}
FUNCTION_FIELDS = {"name", "description", "parameters", "endpoint", "defer_until_eot"}
SETTINGS_FIELDS = {"type", "tags", "experimental", "flags", "mip_opt_out", "audio", "agent"}
FORMATS = {("mulaw", 8000): ("mulaw", 160), ("linear16", 16000): ("pcm16", 640)}
"""(encoding, sample_rate) voxd may ask for -> (voxd's name, bytes per 20 ms)."""
LATENCY = {"total_latency": 0.9, "tts_latency": 0.25, "ttt_latency": 0.4}


@dataclass
class FakeDeepgram:
    """Start with `await nursery.start(fake.serve)`; `fake.sections()` points voxd at it."""

    script: Script = field(default_factory=Script)
    api_key: str = "dg-test-key"
    settings_error: tuple[str, str] | None = None
    """Answer the Settings with this Error (code, description) and close."""
    transcripts: bool = False
    """ConversationText for the reply (assistant) and for each injected user message."""
    latency_report: bool = False
    """A LatencyReport after each reply (as Deepgram sends after each turn)."""
    messages_at: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(seconds, message): any other server message at a given time."""
    direct: bool = False
    """No proxy in front (a benchmark's lean simulator; `silent_after` then silences the
    agent's messages but not its pongs)."""

    base_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    audio_format: str = "mulaw"
    audio_in: bytearray = field(default_factory=bytearray)
    control_in: list[dict[str, Any]] = field(default_factory=list)
    tool_results: dict[str, str] = field(default_factory=dict)
    heard: list[float] = field(default_factory=list)
    """Stays empty: Deepgram's protocol has no way to say how much of a reply was heard."""
    closed: trio.Event = field(default_factory=trio.Event)
    sessions: int = 0
    interruptions: int = 0
    frames_out: int = 0
    errors_sent: list[str] = field(default_factory=list)
    proxy: FreezableProxy | None = None

    @property
    def secrets(self) -> dict[str, str]:
        return {"deepgram_api_key": self.api_key}

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"deepgram": {"base_url": self.base_url}}

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._handle,
                                         "127.0.0.1", 0, None)
            # Always behind a proxy that can go silent (no data, no pongs): Script.silent_after.
            self.proxy = FreezableProxy(server.port)
            port = server.port if self.direct else await nursery.start(self.proxy.serve)
            self.base_url = f"ws://127.0.0.1:{port}"
            task_status.started(self.base_url)

    # -- one session --

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.headers = headers
        script = self.script
        if script.refuse_with is not None:
            await request.reject(script.refuse_with)
            return
        if request.path.split("?")[0] != PATH:
            await request.reject(404)
            return
        if headers.get("authorization") not in (f"Token {self.api_key}",
                                                f"Bearer {self.api_key}"):
            await request.reject(401, body=b'{"err_code":"INVALID_AUTH","err_msg":"Invalid '
                                           b'credentials."}')
            return
        ws = await request.accept()
        self._reset()
        session = _Session(self, ws)
        try:
            await session.run()
        except* (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                 trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()

    def _reset(self) -> None:
        """What is recorded is the last call's."""
        self.sessions += 1
        self.audio_in = bytearray()
        self.control_in = []
        self.tool_results = {}
        self.heard = []
        if self.closed.is_set():  # a new call; one not yet closed keeps the event waited on
            self.closed = trio.Event()
        self.settings = {}
        if self.proxy is not None and self.proxy.frozen.is_set():
            self.proxy.frozen = trio.Event()  # a new call is heard again


class _Session:
    def __init__(self, fake: FakeDeepgram, ws: trio_websocket.WebSocketConnection) -> None:
        self.fake = fake
        self.script = fake.script
        self.ws = ws
        self.frame = 160
        self.echo = Echo(self.script, ulaw=True)
        self.speaking: trio.CancelScope | None = None
        self.requested: dict[str, str] = {}
        """Function call ids sent -> names, until answered."""
        self.silent = False

    async def run(self) -> None:
        await self.send({"type": "Welcome", "request_id": str(uuid.uuid4())})
        first = await self.ws.get_message()
        if isinstance(first, bytes):
            await self.error("UNPARSABLE_CLIENT_MESSAGE", "Audio was sent before Settings.")
            return
        message = json.loads(first)
        self.fake.control_in.append(message)
        problem = self.check_settings(message)
        if problem is not None:
            await self.error("UNPARSABLE_CLIENT_MESSAGE", problem)
            return
        if self.fake.settings_error is not None:
            await self.error(*self.fake.settings_error)
            return
        self.fake.settings = message
        self.echo = Echo(self.script, ulaw=self.fake.audio_format == "mulaw")
        await self.send({"type": "SettingsApplied"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.listen, nursery.cancel_scope)
            nursery.start_soon(self.scripted, nursery, nursery.cancel_scope)

    def check_settings(self, message: dict[str, Any]) -> str | None:
        """What Deepgram would refuse in a Settings message (None: nothing)."""
        if message.get("type") != "Settings":
            return f"Expected Settings first, got {message.get('type')!r}."
        extra = set(message) - SETTINGS_FIELDS
        if extra:
            return f"unknown field(s) in Settings: {sorted(extra)}"
        audio = message.get("audio", {})
        inp, out = audio.get("input", {}), audio.get("output", {})
        if inp.get("encoding") not in INPUT_ENCODINGS or not isinstance(inp.get("sample_rate"),
                                                                        int):
            return f"bad audio.input {inp}"
        if out.get("encoding") not in OUTPUT_ENCODINGS or out.get("container", "none") != "none":
            return f"bad audio.output {out}"
        fmt = FORMATS.get((inp["encoding"], inp["sample_rate"]))
        if fmt is None or (out["encoding"], out.get("sample_rate")) != (inp["encoding"],
                                                                        inp["sample_rate"]):
            return f"this fake speaks mulaw 8000 or linear16 16000 both ways, not {audio}"
        self.fake.audio_format, self.frame = fmt
        agent = message.get("agent")
        if not isinstance(agent, dict):
            return "agent must be an object"
        for part in ("listen", "speak"):
            if not isinstance(agent.get(part, {}).get("provider"), dict):
                return f"agent.{part}.provider is required"
        thinks = agent.get("think")
        for think in thinks if isinstance(thinks, list) else [thinks]:
            if not isinstance(think, dict) or not isinstance(think.get("provider"), dict):
                return "agent.think.provider is required"
            for function in think.get("functions", []):
                if not isinstance(function.get("name"), str) or set(function) - FUNCTION_FIELDS:
                    return f"bad function {function}"
        return None

    async def listen(self, scope: trio.CancelScope) -> None:
        while True:
            message = await self.ws.get_message()
            if self.silent:
                continue
            if isinstance(message, bytes):
                self.fake.audio_in += message
                for piece in self.echo(message):
                    await self.ws.send_message(piece)
                continue
            control = json.loads(message)
            self.fake.control_in.append(control)
            kind = control.get("type")
            if kind == "FunctionCallResponse":
                call_id = control.get("id")
                if self.requested.pop(call_id, None) != control.get("name") or \
                        not isinstance(control.get("content"), str):
                    await self.error("UNPARSABLE_CLIENT_MESSAGE",
                                     f"FunctionCallResponse for an unknown call: {control}")
                    scope.cancel()
                    return
                self.fake.tool_results[call_id] = control["content"]
            elif kind == "InjectUserMessage":
                if not isinstance(control.get("content"), str):
                    await self.error("UNPARSABLE_CLIENT_MESSAGE", "content must be a string")
                elif self.fake.transcripts:
                    await self.send({"type": "ConversationText", "role": "user",
                                     "content": control["content"]})
            elif kind == "UpdatePrompt":
                await self.send({"type": "PromptUpdated"})
            elif kind not in ("KeepAlive", "InjectAgentMessage", "UpdateSpeak", "UpdateThink",
                              "UpdateListen"):
                await self.error("UNPARSABLE_CLIENT_MESSAGE", f"unknown message type {kind!r}")
                scope.cancel()
                return

    async def scripted(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        """The script's events, each at its time (seconds since the Settings arrived)."""
        script = self.script
        start = trio.current_time()
        timed: list[tuple[float, str, Any]] = []
        if script.reply:
            timed.append((script.reply_at, "reply", script.reply))
        if script.interrupt_at is not None:
            timed.append((script.interrupt_at, "interrupt", None))
        timed += [(at, "tool", (name, args)) for at, name, args in script.tool_calls]
        timed += [(at, "message", message) for at, message in self.fake.messages_at]
        for at, what in ((script.end_at, "end"), (script.drop_after, "drop"),
                         (script.silent_after, "silent"), (script.garbage_at, "garbage")):
            if at is not None:
                timed.append((at, what, None))
        for at, what, arg in sorted(timed, key=lambda item: item[0]):
            await trio.sleep_until(start + at)
            if self.silent:
                return
            if what == "reply":
                nursery.start_soon(self.speak, arg)
            elif what == "interrupt":
                await self.interrupt()
            elif what == "tool":
                await self.call_function(*arg)
            elif what == "message":
                await self.send(arg)
            elif what == "garbage":
                await self.ws.send_message("{this is not json")
                await self.send({"type": "SomethingNewFromDeepgram", "x": 1})
            elif what == "end":
                await self.ws.aclose(1000, "agent ended the conversation")
                scope.cancel()
                return
            elif what == "drop":
                await self.ws._stream.aclose()  # abrupt: no close frame (1006 at voxd)
                scope.cancel()
                return
            elif what == "silent":
                self.silent = True
                assert self.fake.proxy is not None
                self.fake.proxy.freeze()
                return

    async def speak(self, audio: bytes) -> None:
        """A reply as Deepgram streams one: AgentStartedSpeaking, the audio in real time,
        AgentAudioDone (and, if asked, its transcript and a LatencyReport)."""
        scope = self.speaking = trio.CancelScope()
        with scope:
            await self.send({"type": "AgentThinking", "content": ""})
            if self.fake.transcripts:
                await self.send({"type": "ConversationText", "role": "assistant",
                                 "content": "reply"})
            await self.send({"type": "AgentStartedSpeaking", **LATENCY})
            start = trio.current_time()
            size = self.frame
            for i in range(0, len(audio), size):
                await trio.sleep_until(start + (i // size) * 0.020)
                if self.silent:
                    return
                await self.ws.send_message(audio[i:i + size])
                self.fake.frames_out += 1
            await self.send({"type": "AgentAudioDone"})
            if self.fake.latency_report:
                await self.send({"type": "LatencyReport", "stt_latency": 0.1,
                                 "ttt_token_latency": 0.35, "ttt_text_latency": 0.4,
                                 "tts_latency": 0.25, "total_latency": 0.9})
        if self.speaking is scope:
            self.speaking = None

    async def interrupt(self) -> None:
        """The caller speaks: Deepgram stops its reply and says UserStartedSpeaking."""
        if self.speaking is not None:
            self.speaking.cancel()
            self.speaking = None
        self.fake.interruptions += 1
        await self.send({"type": "UserStartedSpeaking"})

    async def call_function(self, name: str, arguments: dict[str, Any]) -> None:
        call_id = f"fc_{uuid.uuid4()}"
        self.requested[call_id] = name
        await self.send({"type": "FunctionCallRequest", "functions": [
            {"id": call_id, "name": name, "arguments": json.dumps(arguments),
             "client_side": True}]})

    async def error(self, code: str, description: str) -> None:
        """A fatal Error, then the close that follows it."""
        self.fake.errors_sent.append(code)
        await self.send({"type": "Error", "description": description, "code": code})
        await self.ws.aclose(1011, "error")

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

"""`voxd call`: a caller and Twilio in one, for testing voxd with no phone and no account.

It does what Twilio does for an inbound call with `<Connect><Stream>`: POSTs the voice webhook
with Twilio's form fields (signed when given the auth token), reads the TwiML, opens the Stream
URL (with the upgrade signed the way Twilio signs it), sends `connected` and `start` with the
TwiML's `<Parameter>`s, then streams the caller's audio as 20 ms mu-law frames paced in real
time. Assistant audio is played the way Twilio plays it: queued, one 20 ms frame per tick; a
`mark` is echoed once the audio before it has played, a `clear` empties the queue and echoes
every pending mark at once. What the caller "heard" is recorded next to what it said.
"""

from __future__ import annotations

import binascii
import json
import secrets
import wave
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soxr
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from voxd.audio.g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_decode
from voxd.audio.vad import SpeechDetector, SpeechEdge, frame_energy_dbfs_ulaw
from voxd.errors import VoxdError

RATE = 8000
FRAME_BYTES = 160
FRAME_SECONDS = 0.020


class SimulatorError(VoxdError):
    """The simulated call could not be placed or went wrong; the message says how."""


# -- audio files ----------------------------------------------------------------------------


def read_wav(path: Path) -> np.ndarray:
    """A PCM WAV file of any rate, width and channel count, as mono int16 at 8 kHz."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise SimulatorError(f"{path}: not a readable PCM WAV file ({exc})") from None
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        samples = ints.astype(np.float32) / 8388608.0
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise SimulatorError(f"{path}: unsupported sample width of {width} bytes")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != RATE:
        samples = soxr.resample(samples, rate, RATE, quality="VHQ")
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def write_stereo_wav(path: Path, left: np.ndarray, right: np.ndarray) -> None:
    """Two int16 8 kHz tracks as one stereo WAV (shorter track padded with silence)."""
    n = max(len(left), len(right))
    stereo = np.zeros((n, 2), np.int16)
    stereo[: len(left), 0] = left
    stereo[: len(right), 1] = right
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(stereo.astype("<i2").tobytes())


def to_frames(ulaw: bytes) -> list[bytes]:
    """mu-law bytes cut into 160-byte frames, the last padded with silence."""
    pad = (-len(ulaw)) % FRAME_BYTES
    ulaw += bytes([ULAW_SILENCE]) * pad
    return [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


def speech_segments(frames: list[bytes], min_speech_ms: int = 60,
                    hangover_ms: int = 300) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in a list of 20 ms mu-law frames."""
    detector = SpeechDetector(min_speech_ms=min_speech_ms, hangover_ms=hangover_ms)
    segments: list[tuple[float, float]] = []
    for frame in frames:
        edge = detector.update(frame_energy_dbfs_ulaw(frame))
        if edge is SpeechEdge.STOPPED:
            segments.append(_segment(detector.speech_started_at_frame,
                                     detector.speech_ended_at_frame))
    if detector.in_speech:
        segments.append(_segment(detector.speech_started_at_frame, detector.last_voiced_frame))
    return segments


def _segment(first: int | None, last: int | None) -> tuple[float, float]:
    return (first or 0) * FRAME_SECONDS, ((last or 0) + 1) * FRAME_SECONDS


# -- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One caller utterance and the assistant's answer as the caller heard it."""

    caller_start: float
    caller_end: float
    reply_start: float | None

    @property
    def latency(self) -> float | None:
        """End of the caller's speech -> first assistant audio heard."""
        return None if self.reply_start is None else self.reply_start - self.caller_end


@dataclass
class CallReport:
    """Everything the simulated call saw; times are seconds since the stream started."""

    call_sid: str
    stream_sid: str
    events: list[tuple[float, str]] = field(default_factory=list)
    caller_frames: list[bytes] = field(default_factory=list)
    heard_frames: list[bytes] = field(default_factory=list)
    """What the caller heard, frame by frame in real time (silence where none had arrived)."""
    received_audio: bytearray = field(default_factory=bytearray)
    """All assistant audio voxd sent, in order, whenever it arrived (cleared audio too)."""
    media_received: int = 0
    clears: int = 0
    marks_echoed: int = 0
    closed_by: str = "caller"
    after_stream: str = ""
    errors: list[str] = field(default_factory=list)
    voxd_latencies: dict[int, float] = field(default_factory=dict)
    """Turn number -> voxd's own measured response latency (from its marks)."""

    def caller_speech(self) -> list[tuple[float, float]]:
        """When the caller spoke."""
        return speech_segments(self.caller_frames)

    def assistant_speech(self) -> list[tuple[float, float]]:
        """When the caller heard the assistant."""
        return speech_segments(self.heard_frames)

    def turns(self) -> list[Turn]:
        """The caller's turns, each with the first assistant audio heard after it. Caller speech
        with no assistant audio between (a pause mid-sentence) is one turn."""
        replies = [start for start, _ in self.assistant_speech()]
        spans: list[tuple[float, float]] = []
        for start, end in self.caller_speech():
            if spans and not any(spans[-1][1] <= r < start for r in replies):
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        turns = []
        for i, (start, end) in enumerate(spans):
            next_start = spans[i + 1][0] if i + 1 < len(spans) else float("inf")
            reply = next((r for r in replies if end <= r < next_start), None)
            turns.append(Turn(start, end, reply))
        return turns

    def write_wav(self, path: Path) -> None:
        """The call as stereo: caller on the left, what the caller heard on the right."""
        left = ulaw_decode(np.frombuffer(b"".join(self.caller_frames), np.uint8))
        right = ulaw_decode(np.frombuffer(b"".join(self.heard_frames), np.uint8))
        write_stereo_wav(path, left, right)

    def render(self) -> str:
        """The timeline and per-turn latency table, for a person to read."""
        lines = [f"call {self.call_sid}  stream {self.stream_sid}"]
        rows = list(self.events)
        rows += [(s, f"caller speaks until {e:.2f}s") for s, e in self.caller_speech()]
        rows += [(s, f"assistant heard until {e:.2f}s") for s, e in self.assistant_speech()]
        for t, what in sorted(rows, key=lambda r: r[0]):
            lines.append(f"  {t:7.2f}s  {what}")
        lines.append("")
        lines.append("  turn  caller stopped  assistant heard  latency (caller)  latency (voxd)")
        turns = self.turns()
        voxd = sorted(self.voxd_latencies.items())
        for n, turn in enumerate(turns, 1):
            heard = "-" if turn.reply_start is None else f"{turn.reply_start:.2f}s"
            latency = "no reply" if turn.latency is None else f"{turn.latency * 1000:.0f} ms"
            # voxd numbers the turns it answered; match them to the caller's in order
            answered = sum(1 for t in turns[:n] if t.latency is not None)
            mine = (f"{voxd[answered - 1][1] * 1000:.0f} ms"
                    if turn.latency is not None and answered <= len(voxd) else "-")
            lines.append(f"  {n:4d}  {turn.caller_end:13.2f}s  {heard:>15}  {latency:>16}"
                         f"  {mine:>14}")
        if not turns:
            lines.append("  (the caller did not speak)")
        lines.append("")
        lines.append(
            f"  frames sent {len(self.caller_frames)}, assistant frames received "
            f"{self.media_received}, clears {self.clears}, marks echoed {self.marks_echoed}, "
            f"ended by {self.closed_by}"
        )
        if self.after_stream:
            lines.append(f"  after the stream Twilio would run: {self.after_stream}")
        lines.extend(f"  error: {e}" for e in self.errors)
        return "\n".join(lines)


# -- the call ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamInstruction:
    """What the TwiML asked for: the stream URL, its parameters, the verbs after it."""

    url: str
    parameters: dict[str, str]
    after: str


def parse_twiml(body: str) -> StreamInstruction:
    """Find `<Connect><Stream>` in a TwiML response, as Twilio would."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise SimulatorError(f"webhook answered invalid XML: {exc}") from None
    if root.tag != "Response":
        raise SimulatorError(f"webhook answered <{root.tag}>, not <Response>")
    verbs = list(root)
    for i, verb in enumerate(verbs):
        stream = verb.find("Stream") if verb.tag == "Connect" else None
        if stream is not None:
            url = stream.get("url", "")
            if not url.startswith(("ws://", "wss://")):
                raise SimulatorError(f"<Stream url={url!r}> is not a ws:// or wss:// URL")
            if "?" in url:
                raise SimulatorError(f"<Stream url={url!r}> has a query string (Twilio error "
                                     "31920: use <Parameter>)")
            params = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
            after = "".join(ET.tostring(v, encoding="unicode") for v in verbs[i + 1:])
            return StreamInstruction(url, params, after)
    answered = "".join(ET.tostring(v, encoding="unicode") for v in verbs) or "nothing"
    raise SimulatorError(f"webhook answered no <Connect><Stream> (it answered: {answered})")


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class TwilioSimulator:
    """Places one simulated call against a voxd webhook."""

    def __init__(self, webhook_url: str, *, auth_token: str | None = None,
                 from_number: str = "+15005550006", to_number: str = "+15005550001",
                 line_echo: tuple[float, float] | None = None) -> None:
        self.webhook_url = webhook_url
        self.line_echo = line_echo
        """(attenuation dB, delay ms): mix what the caller hears back into what it sends, as
        a phone line's echo does."""
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.from_number = from_number
        self.to_number = to_number
        self.call_sid = _sid("CA")
        self.account_sid = _sid("AC")
        self.stream_sid = _sid("MZ")

    def _signature(self, url: str, params: dict[str, str]) -> list[tuple[str, str]]:
        if self.validator is None:
            return []
        return [("X-Twilio-Signature", self.validator.compute_signature(url, params))]

    async def request_stream(self) -> StreamInstruction:
        """POST the voice webhook like Twilio and return the stream it asks for."""
        form = {
            "AccountSid": self.account_sid, "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid, "CallStatus": "ringing", "Direction": "inbound",
            "From": self.from_number, "To": self.to_number,
            "Caller": self.from_number, "Called": self.to_number,
        }
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.post(self.webhook_url, data=form,
                                             headers=dict(self._signature(self.webhook_url,
                                                                          form)))
        except httpx.InvalidURL as exc:
            raise SimulatorError(f"not a usable webhook URL {self.webhook_url!r}: {exc}") \
                from None
        except httpx.HTTPError as exc:
            raise SimulatorError(f"cannot reach the webhook {self.webhook_url}: {exc}") from None
        if response.status_code != 200:
            raise SimulatorError(f"webhook answered HTTP {response.status_code}: "
                                 f"{response.text.strip()[:200]}")
        return parse_twiml(response.text)

    async def call(self, caller_audio: np.ndarray, seconds: float | None = None,
                   on_event: object = None) -> CallReport:
        """Place the call: stream `caller_audio` (int16 8 kHz) then silence until `seconds`."""
        instruction = await self.request_stream()
        report = CallReport(self.call_sid, self.stream_sid, after_stream=instruction.after)
        frames = to_frames(pcm16_to_ulaw(caller_audio.astype("<i2").tobytes()))
        total = len(frames) if seconds is None else max(1, round(seconds / FRAME_SECONDS))
        frames = (frames + [bytes([ULAW_SILENCE]) * FRAME_BYTES] * total)[:total]
        headers = [(k.encode(), v.encode()) for k, v in self._signature(instruction.url, {})]
        try:
            async with trio_websocket.open_websocket_url(
                instruction.url, extra_headers=headers, connect_timeout=10,
                disconnect_timeout=2, message_queue_size=64,
            ) as ws:
                await _Stream(self, ws, instruction, frames, report).run()
        except trio_websocket.ConnectionRejected as exc:
            raise SimulatorError(
                f"voxd refused the media stream: HTTP {exc.status_code}") from None
        except (trio_websocket.HandshakeError, OSError) as exc:
            raise SimulatorError(f"cannot open the media stream {instruction.url}: {exc}") \
                from None
        return report


class _Stream:
    """One media stream of a simulated call: the paced sender and the receiver."""

    def __init__(self, sim: TwilioSimulator, ws: trio_websocket.WebSocketConnection,
                 instruction: StreamInstruction, frames: list[bytes], report: CallReport) -> None:
        self.sim = sim
        self.ws = ws
        self.instruction = instruction
        self.frames = frames
        self.report = report
        self.sequence = 0
        self.queue = bytearray()        # assistant audio Twilio has not played yet
        self.played = 0                 # bytes of assistant audio played so far
        self.queued = 0                 # bytes of assistant audio queued so far
        self.marks: list[tuple[int, str]] = []
        self.t0 = 0.0

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def send(self, message: dict[str, object]) -> None:
        self.sequence += 1
        if message["event"] != "connected":
            message["sequenceNumber"] = str(self.sequence)
        await self.ws.send_message(json.dumps(message, separators=(",", ":")))

    async def run(self) -> None:
        try:
            await self._run()
        except trio_websocket.ConnectionClosed as exc:  # closed before the call got going
            self.report.closed_by = "voxd"
            code = exc.reason.code if exc.reason else "?"
            self.report.events.append((0.0, f"voxd closed the stream at once (code {code})"))

    async def _run(self) -> None:
        sid = self.sim.stream_sid
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send({"event": "start", "streamSid": sid, "start": {
            "accountSid": self.sim.account_sid, "streamSid": sid, "callSid": self.sim.call_sid,
            "tracks": ["inbound"], "customParameters": self.instruction.parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
        }})
        self.t0 = trio.current_time()
        self.report.events.append((0.0, "stream started"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive, nursery.cancel_scope)
            await self.pace()
            nursery.cancel_scope.cancel()

    async def pace(self) -> None:
        """Every 20 ms: send the caller's frame just captured, play one frame of assistant
        audio."""
        sid = self.sim.stream_sid
        silence = bytes([ULAW_SILENCE]) * FRAME_BYTES
        echo = self.sim.line_echo
        try:
            for i, frame in enumerate(self.frames):
                # as Twilio does: a frame leaves once its 20 ms have been captured
                await trio.sleep_until(self.t0 + (i + 1) * FRAME_SECONDS)
                if echo is not None:
                    frame = _with_echo(frame, self.report.heard_frames, *echo)
                payload = binascii.b2a_base64(frame, newline=False).decode()
                await self.send({"event": "media", "streamSid": sid, "media": {
                    "track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                    "payload": payload}})
                self.report.caller_frames.append(frame)
                heard = bytes(self.queue[:FRAME_BYTES])
                del self.queue[:FRAME_BYTES]
                self.played += len(heard)
                self.report.heard_frames.append(heard + silence[len(heard):])
                await self.echo_marks(lambda pos: pos <= self.played)
            await self.send({"event": "stop", "streamSid": sid, "stop": {
                "accountSid": self.sim.account_sid, "callSid": self.sim.call_sid}})
            self.report.events.append((self.now(), "caller hung up (stop sent)"))
        except trio_websocket.ConnectionClosed as exc:
            self._closed_by_voxd(exc)

    async def echo_marks(self, reached: object) -> None:
        while self.marks and reached(self.marks[0][0]):  # type: ignore[operator]
            _, name = self.marks.pop(0)
            self.report.marks_echoed += 1
            await self.send({"event": "mark", "streamSid": self.sim.stream_sid,
                             "mark": {"name": name}})

    async def receive(self, call_scope: trio.CancelScope) -> None:
        report = self.report
        try:
            while True:
                text = await self.ws.get_message()
                if not isinstance(text, str):
                    report.errors.append(f"{self.now():.2f}s binary frame (Twilio: 31950)")
                    continue
                try:
                    message = json.loads(text)
                    event = message["event"]
                    if message.get("streamSid") != self.sim.stream_sid:
                        raise ValueError(f"wrong streamSid {message.get('streamSid')!r}")
                    if event == "media":
                        audio = binascii.a2b_base64(message["media"]["payload"])
                        if report.media_received == 0:
                            report.events.append((self.now(), "first assistant audio received"))
                        report.media_received += 1
                        report.received_audio += audio
                        self.queue += audio
                        self.queued += len(audio)
                    elif event == "mark":
                        name = message["mark"]["name"]
                        _read_voxd_mark(name, report)
                        self.marks.append((self.queued, name))
                        await self.echo_marks(lambda pos: pos <= self.played)
                    elif event == "clear":
                        report.clears += 1
                        report.events.append(
                            (self.now(), f"clear: {len(self.queue) / 8:.0f} ms of queued "
                                         "assistant audio dropped"))
                        self.queue.clear()
                        self.queued = self.played
                        await self.echo_marks(lambda pos: True)
                    else:
                        raise ValueError(f"unknown event {event!r}")
                except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                    report.errors.append(f"{self.now():.2f}s bad message from voxd (Twilio "
                                         f"warning 31951): {exc}")
        except trio_websocket.ConnectionClosed as exc:
            self._closed_by_voxd(exc)
            call_scope.cancel()

    def _closed_by_voxd(self, exc: trio_websocket.ConnectionClosed) -> None:
        """The socket closed: if the caller had not hung up, voxd ended the call (noted once,
        by whichever of the sender and the receiver sees it first)."""
        report = self.report
        if report.closed_by == "caller" and not _stop_sent(report):
            report.closed_by = "voxd"
            reason = exc.reason
            report.events.append((self.now(), f"voxd closed the stream (code "
                                              f"{reason.code if reason else '?'})"))


def _with_echo(frame: bytes, heard: list[bytes], attenuation_db: float,
               delay_ms: float) -> bytes:
    """The caller's frame plus the line's echo of what it heard `delay_ms` earlier."""
    back = round(delay_ms / 20)
    if back < 1 or len(heard) < back:
        return frame
    gain = 10 ** (-attenuation_db / 20)
    mixed = (ulaw_decode(np.frombuffer(frame, np.uint8)).astype(np.float32)
             + gain * ulaw_decode(np.frombuffer(heard[-back], np.uint8)))
    return pcm16_to_ulaw(np.clip(mixed, -32768, 32767).astype("<i2").tobytes())


def _read_voxd_mark(name: str, report: CallReport) -> None:
    """voxd names the mark ahead of each answer `voxd:turn=N;latency_ms=X`: its own figure."""
    if not name.startswith("voxd:turn="):
        return
    try:
        fields = dict(part.split("=", 1) for part in name[5:].split(";"))
        report.voxd_latencies[int(fields["turn"])] = int(fields["latency_ms"]) / 1000
    except (ValueError, KeyError):
        report.errors.append(f"unreadable voxd mark {name!r}")


def _stop_sent(report: CallReport) -> bool:
    return any(what.startswith("caller hung up") for _, what in report.events)

"""One phone call, from Twilio's `start` to the summary line: the heart of voxd.

Shape of a call (every task lives in the nursery opened in `CallSession._bridge`, or in the
assistant side's nursery nested in it):

    inbound pump    Twilio text frame -> MediaStream.receive -> (transcode) -> UpstreamFeed
                    (held, bounded, while the assistant connects; then straight to its socket
                    when the socket takes it at once, else queued: the pump never waits)
    watchdog        Twilio silent, Twilio not reading, assistant not reading, max duration
    playout         queued assistant audio -> Twilio, paced
    machines        (outbound calls with answering-machine detection) Twilio's verdict ->
                    go on, hang up, or leave outbound.machine_message (`outbound.on_machine`)
    assistant side  connect the assistant, then run:
      feeder          held and queued caller audio -> the assistant, in order
      outbound pump   assistant event -> (transcode) -> Playback -> Twilio
      keep-alive      assistant.ping() every keepalive_interval, dead after keepalive_timeout
      barge-in watch  caller speech started (local VAD, when enabled) while audio plays -> clear
      keypad          the caller's key presses (from the inbound pump) -> the assistant
      notices         what voxd learns about the phone call meanwhile (`answered_by`) -> the
                      assistant

The assistant may also ask for a transfer (the outbound pump lets its last words play, then
moves the call: `call/phone.py`) or for keys to be pressed (DTMF tones, queued with its audio).
How the call ends decides, through one table (`call/ending.py`), what the caller gets next,
what the assistant is told and which outcome is counted.

A recorded call also keeps its record (`voxd.call_record`): start, turns, barge-ins, keys,
transfer, transcripts, who answered, end, each at its time on the recording's timeline
(`_stream_time`). Events are appended where they happen (never per frame); the summary hands
the record to the recording's writer thread with the end.

Invariants:
- Whichever task finishes first decides the end reason (`_end`) and cancels the rest; nothing
  outlives the call, and exactly one summary line is logged.
- Errors of one call (bad input, a failing assistant) end that call with one clear log line;
  they never propagate to the server, so other calls never notice.
- Per-frame work stays in the pumps' own task (no channel hop per frame); the only channel
  carries rare events (caller speech edges) to the barge-in watcher.
- Both sockets are closed within `TEARDOWN_SECONDS` of the end, even if a peer stalls; when
  the end's policy row needs Twilio's REST API (a hang-up, a transfer's `<Dial>`), the
  caller's socket waits for that request first, so it closes within `REST_SECONDS +
  TEARDOWN_SECONDS` (every shield here has one of these deadlines).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import trio

from voxd.audio import dtmf
from voxd.audio.line import FRAME_SECONDS
from voxd.audio.transcode import InboundTranscoder, OutboundTranscoder
from voxd.audio.vad import ENERGY_FLOOR_DBFS, frame_energy_dbfs_ulaw
from voxd.call.ending import Caller, Tell, policy
from voxd.call.keypad import Keypad
from voxd.call.phone import PhoneLeg, TransferRefusal, destination
from voxd.call.playback import Direct, Playback
from voxd.call.recording import CallRecorder, RecordingRefused
from voxd.call.turns import TurnTimer
from voxd.call.upstream_feed import UpstreamFeed
from voxd.call_record import CallRecord
from voxd.config import Settings
from voxd.errors import CallerDisconnected, ProtocolError, UpstreamError, VoxdError
from voxd.observability import metrics
from voxd.observability.logging import CallLogContext, bind_call
from voxd.observability.untrusted import show
from voxd.providers.base import (
    ANSWERED_BY,
    BYTES_PER_SECOND,
    MACHINE,
    STAGES,
    AnsweredBy,
    AssistantAudio,
    AssistantEnded,
    AssistantInterrupted,
    AssistantSession,
    CallerSpeechStarted,
    CallInfo,
    CallNotice,
    DigitsRequested,
    Provider,
    StageLatency,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.twilio import stream_token
from voxd.twilio.protocol import (
    Connected,
    Dtmf,
    MarkPlayed,
    MediaFrame,
    MediaStream,
    StreamStart,
    StreamStop,
)

log = logging.getLogger("voxd.call")

TEARDOWN_SECONDS = 1.0
REST_SECONDS = 10.0
"""Longest a REST call-control request (hang up, redirect) may hold the teardown."""
METRICS_INTERVAL = 5.0
"""Seconds between additions of a live call's frame counts to the metrics."""
MACHINE_VERDICT_SECONDS = 60.0
"""How long an outbound call waits for Twilio's answering-machine verdict (Twilio gives up
after its MachineDetectionTimeout, 30 s by default)."""
MACHINE_POLL_SECONDS = 0.5
"""How often a verdict left in the shared state is looked for."""
MAX_STAGE_SAMPLES = 1000
"""A stage's durations kept per call for the summary line (one a turn)."""
NOTICES = 8
"""Notices (`answered_by`) held for an assistant still connecting; more are dropped."""


class Ending(NamedTuple):
    """How a task of the call ended it: the reason (`kind` or `kind:detail`, a row of
    `call.ending.POLICY`)."""

    reason: str


class TwilioSocket(Protocol):
    """The media WebSocket as the call sees it (text frames only)."""

    async def receive(self) -> str:
        """The next text frame; CallerDisconnected when the socket closed, ProtocolError for a
        binary frame."""
        ...

    async def send(self, text: str) -> None:
        """Send one text frame."""
        ...

    async def close(self, code: int = 1000) -> None:
        """Close the socket (idempotent)."""
        ...


@dataclass
class CallStats:
    """What the summary line reports."""

    started_at: float = 0.0
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped_in: int = 0
    frames_dropped_out: int = 0
    barge_ins: int = 0
    latencies: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    """Each stage's durations as the assistant reported them (see StageLatency)."""


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class CallSession:
    """Runs one call on an accepted Twilio media socket until either side ends it."""

    def __init__(self, socket: TwilioSocket, settings: Settings, provider: Provider,
                 peer: str = "-", phone: PhoneLeg | None = None,
                 stream_pass: stream_token.StreamPass | None = None) -> None:
        self.socket = socket
        self.stream_pass = stream_pass
        """What the stream's token (verified at the upgrade) proves; None with tokens off."""
        self.phone = phone
        self.keypad = Keypad(settings.config.keypad)
        self._transfer_to: tuple[str, str] | None = None
        """(the [transfer.to] name, the `<Dial>` TwiML) of the transfer decided: the teardown
        moves the call there (and an assistant failing meanwhile does not stop it)."""
        self._moved = False
        """The phone leg took the transfer."""
        self._caller_released = False
        self.recorder: CallRecorder | None = None
        self.record: CallRecord | None = None
        """The call's record (only when it is recorded: it is written next to the audio)."""
        self._transcripts = settings.config.recording.transcripts
        self._notices_tx, self._notices_rx = trio.open_memory_channel[CallNotice](NOTICES)
        self._answered_by: str | None = None
        self._turn_stages: dict[str, float] = {}
        """The assistant's stage figures for the answer about to start (see `_stage`)."""
        self._ended_at: float | None = None
        """When the end reason was decided (trio's clock)."""
        self._verdict = trio.Event()
        """Set when the answering-machine verdict arrived (`answered_by`)."""
        self._heard_slot = -1
        """The recording's slot of the last assistant frame sent."""
        local_vad = settings.config.barge_in.local_vad
        self.local_vad = (provider.name != "vapi") if local_vad == "auto" else local_vad
        """Barge in on voxd's own detection of caller speech ("auto": not for Vapi, whose own
        interruption signal is trusted)."""
        self.settings = settings
        self.provider = provider
        self.peer = peer
        self.protocol = MediaStream(settings.config.call.max_message_bytes,
                                    settings.config.call.max_payload_bytes)
        self.log_context = CallLogContext(stream_pass.call_sid if stream_pass else "-")
        self.stats = CallStats()
        self.end_reason: str | None = None
        self.call: CallInfo | None = None
        self._cancel: trio.CancelScope | None = None
        self._run_scope = trio.CancelScope()
        self._last_in = 0.0
        self._frames_reported = (0, 0)

    # -- lifecycle --

    async def run(self) -> None:
        """Run the call to its end; never raises for anything a peer did."""
        bind_call(self.log_context)
        self.stats.started_at = trio.current_time()
        metrics.CALLS_ACTIVE.inc()
        try:
            with self._run_scope:
                start = await self._await_start()
                if start is not None and self._token_ok(start):
                    metrics.CALLS_STARTED.inc()  # the call's one stream began
                    await self._bridge(start)
        except trio.Cancelled:
            self._end("server-shutdown")
            raise
        except Exception as exc:  # a bug: still end this call cleanly, and say so
            self._internal_error(exc)
        finally:
            try:
                with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_SECONDS):
                    await self.socket.close()
            finally:
                metrics.CALLS_ACTIVE.dec()
                self._summarise()

    def shutdown(self, reason: str) -> None:
        """End the call from outside (the server is draining): cleanly, as any other end."""
        self._end(reason)
        self._run_scope.cancel()

    def _end(self, reason: str) -> None:
        """Record why the call ends (first reason wins) and cancel every task of the call.
        Once a transfer is decided, the assistant's side can no longer end the call otherwise:
        the caller is on the way to a person."""
        if self.end_reason is None:
            if self._transfer_to is not None and policy(reason).side == "assistant":
                reason = f"transferred:{self._transfer_to[0]}"
            self.end_reason = reason
            self._ended_at = trio.current_time()
        if self._cancel is not None:
            self._cancel.cancel()

    async def _await_start(self) -> StreamStart | None:
        timeout = self.settings.config.call.start_timeout
        with trio.move_on_after(timeout):
            try:
                while True:
                    event = self.protocol.receive(await self.socket.receive())
                    if isinstance(event, StreamStart):
                        return event
                    if not isinstance(event, Connected):  # pragma: no cover - protocol forbids
                        raise ProtocolError(f"unexpected {type(event).__name__} before start")
            except ProtocolError as exc:
                self._protocol_error(exc)
                return None
            except CallerDisconnected:
                log.info("media socket from %s closed before the stream started", self.peer)
                self._end("caller-disconnected-before-start")
                return None
        log.warning("no 'start' within %.1fs of connecting (peer %s); closing", timeout, self.peer)
        self._end("start-timeout")
        return None

    def _token_ok(self, start: StreamStart) -> bool:
        """The stream is the call its token (verified at the upgrade) was issued for, with
        exactly the parameters the webhook gave it (call.stream_token)."""
        if self.stream_pass is not None:
            try:
                self.stream_pass.check_stream(self.settings.secrets.stream_secret.reveal()
                                              .encode(), start.call_sid,
                                              start.custom_parameters)
            except stream_token.TokenRejected as exc:
                log.warning("media stream from %s rejected: %s", self.peer, show(exc, 200))
                metrics.CALLS_REJECTED.labels(reason="token").inc()
                self._end("token-rejected")
                return False
        self.log_context.update(call_sid=show(start.call_sid, 40),
                                stream_sid=show(start.stream_sid, 40))
        return True

    async def _bridge(self, start: StreamStart) -> None:
        params = start.custom_parameters
        self.call = CallInfo(
            call_sid=start.call_sid,
            stream_sid=start.stream_sid,
            account_sid=start.account_sid,
            from_number=params.get("from", ""),
            to_number=params.get("to", ""),
            parameters=dict(params),
        )
        log.info("call started: from=%s to=%s assistant=%s audio=%s peer=%s",
                 show(self.call.from_number or "-", 40), show(self.call.to_number or "-", 40),
                 self.provider.name, self.provider.audio, self.peer)
        self.recorder = self._recorder(start.call_sid)
        if self.recorder is not None:
            self.record = CallRecord()
            self.record.started(
                0.0, start.call_sid, start.stream_sid, from_number=self.call.from_number,
                to_number=self.call.to_number, direction=params.get("direction", ""),
                at=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                assistant=self.provider.name)
        call = self.settings.config.call
        rate = BYTES_PER_SECOND[self.provider.audio]
        feed = UpstreamFeed(int(call.preconnect_buffer_seconds * rate),
                            int((call.upstream_send_timeout + 1.0) * rate))
        barge_in = self.settings.config.barge_in
        turns = TurnTimer(min_speech_ms=barge_in.min_speech_ms,
                          on_late_answer=lambda latency, at: self._turn_timed(
                              len(turns.latencies), latency, at))
        playback = Playback(self.socket.send, self.protocol,
                            lead=barge_in.playback_lead_ms / 1000,
                            max_queue_seconds=call.playback_queue_seconds,
                            on_burst=lambda at: self._answer_started(turns, at),
                            resume_after=barge_in.resume_after_ms / 1000,
                            direct=self.socket if isinstance(self.socket, Direct) else None,
                            on_play=self._heard if self.recorder is not None else None)
        speech_tx, speech_rx = trio.open_memory_channel[float](8)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                self._last_in = trio.current_time()
                nursery.start_soon(self._guard, self._inbound(feed, turns, playback, speech_tx))
                nursery.start_soon(self._guard, self._watchdog(playback, feed))
                nursery.start_soon(self._guard, self._playout(playback))
                if self._detects_machines():
                    nursery.start_soon(self._guard, self._machine_detection())
                nursery.start_soon(self._guard,
                                   self._assistant_side(feed, playback, turns, speech_rx))
        finally:
            self._cancel = None
            if self.end_reason is None:  # cancelled from outside: the server is stopping
                self._end("server-shutdown")
            await self._release_caller()
            self.stats.frames_out = playback.frames_sent
            self.stats.frames_dropped_out = playback.dropped_frames
            if playback.dropped_frames:
                metrics.MEDIA_FRAMES_DROPPED.labels(
                    direction="outbound", reason="barge_in").inc(playback.dropped_frames)
            self.stats.latencies = turns.latencies
            self.stats.frames_dropped_in += feed.dropped_chunks + feed.stall_dropped_chunks
            if feed.stall_dropped_chunks:
                metrics.MEDIA_FRAMES_DROPPED.labels(
                    direction="inbound", reason="upstream_stalled").inc(feed.stall_dropped_chunks)

    def _recorder(self, call_sid: str) -> CallRecorder | None:
        """This call's recording, when [recording] is on (None if it cannot be made: one
        line, and the call goes on unrecorded)."""
        recording = self.settings.config.recording
        if not recording.enabled:
            return None
        try:
            return CallRecorder(Path(recording.directory), call_sid, recording.format)
        except RecordingRefused as exc:
            log.warning("this call is not recorded: %s", show(exc, 200))
            return None

    def _stream_time(self, at: float) -> float:
        """Seconds since the media stream started at time `at`, on the recording's timeline
        (slot n starts at n * 20 ms; see `_slot`)."""
        return self.stats.frames_in * FRAME_SECONDS + max(0.0, at - self._last_in)

    def answered_by(self, value: str) -> None:
        """Twilio's answering-machine detection says who answered (its AnsweredBy value):
        into the record, and told to the assistant (once it is connected); the machine
        detection task acts on it (`outbound.on_machine`). Never waits; the first verdict
        counts."""
        if self._answered_by is not None or not self._detects_machines():
            return
        self._answered_by = value
        self._verdict.set()
        if self.record is not None:
            self.record.answered_by(self._stream_time(trio.current_time()), value)
        try:
            self._notices_tx.send_nowait(AnsweredBy(value))
        except trio.WouldBlock:
            log.warning("too many notices for an assistant still connecting; dropped one")

    def _slot(self, at: float) -> int:
        """The caller's 20 ms slot (frames since the stream started) at time `at`."""
        return self.stats.frames_in + int((at - self._last_in) / FRAME_SECONDS)

    def _heard(self, frame: bytes, plays_at: float) -> None:
        """Playback sent `frame`, which starts playing at `plays_at`: into the recording, in
        the slot after the previous one when they play back to back (clock rounding must not
        put two frames in one slot)."""
        assert self.recorder is not None
        slot = max(self._slot(plays_at), self._heard_slot + 1)
        self._heard_slot = slot
        self.recorder.heard(frame, slot)

    async def _assistant_side(self, feed: UpstreamFeed, playback: Playback, turns: TurnTimer,
                              speech: trio.MemoryReceiveChannel[float]) -> Ending:
        """Connect the assistant (the inbound pump is already running and its audio is held),
        then run everything that needs it."""
        assert self.call is not None
        started = trio.current_time()
        async with self.provider.connect(self.call) as assistant:
            connect_seconds = trio.current_time() - started
            metrics.UPSTREAM_CONNECT_SECONDS.observe(connect_seconds)
            held = feed.held_chunks
            log.info("assistant connected in %.0f ms%s", connect_seconds * 1000,
                     f"; delivering {held - feed.dropped_chunks} held chunks of caller audio"
                     if held else "")
            if feed.dropped_chunks:
                log.warning("dropped the oldest %d chunks (%.1f s) of caller audio: the "
                            "assistant took longer than call.preconnect_buffer_seconds "
                            "(%.1f s) to connect", feed.dropped_chunks,
                            feed.dropped_bytes / BYTES_PER_SECOND[self.provider.audio],
                            self.settings.config.call.preconnect_buffer_seconds)
                metrics.MEDIA_FRAMES_DROPPED.labels(direction="inbound",
                                                    reason="preconnect").inc(feed.dropped_chunks)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._feeder(feed, assistant))
                    nursery.start_soon(self._guard, self._outbound(assistant, playback, turns))
                    nursery.start_soon(self._guard, self._keepalive(assistant))
                    nursery.start_soon(self._guard,
                                       self._barge_in_watcher(assistant, playback, speech))
                    nursery.start_soon(self._guard, self._keypad(assistant))
                    nursery.start_soon(self._guard, self._notices(assistant))
            finally:
                try:
                    await self._release_caller()  # the caller first: never a silent line
                finally:
                    await self._tell_assistant(assistant)
        return Ending(self.end_reason or "assistant-side-ended")  # pragma: no cover

    async def _tell_assistant(self, assistant: AssistantSession) -> None:
        """Tell the assistant how the call ended, as the end's policy row says: a network
        assistant not told may keep the call open, and billing."""
        row = policy(self.end_reason or "server-shutdown")
        if row.assistant is Tell.NOTHING:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_SECONDS):
            if row.assistant is Tell.TRANSFERRED and self._transfer_to is not None and self._moved:
                with contextlib.suppress(UpstreamError):  # gone already: nothing to tell
                    await assistant.tell(Transferred(self._transfer_to[0]))
            await assistant.hang_up()

    async def _release_caller(self) -> None:
        """End the Twilio side of the call, once: what the caller gets next (the end's policy
        row: hang up, the fallback, a transfer's `<Dial>`), then close the stream."""
        if self._caller_released:
            return
        self._caller_released = True
        row = policy(self.end_reason or "server-shutdown")
        with trio.CancelScope(shield=True), trio.move_on_after(REST_SECONDS + TEARDOWN_SECONDS):
            try:
                if self.phone is not None and self.call is not None:
                    dial = self._transfer_to[1] if self._transfer_to is not None else None
                    self._moved = await self.phone.finish(self.call, row, dial)
                    if self._transfer_to is not None and row.caller is Caller.DIAL:
                        self._count_transfer(self._transfer_to[0])
            finally:
                with trio.move_on_after(TEARDOWN_SECONDS):
                    await self.socket.close()

    def _count_transfer(self, name: str) -> None:
        if self.record is not None:
            self.record.transfer_result("placed" if self._moved else "failed")
        if self._moved:
            log.info("transferred the caller to %s", name)
            metrics.TRANSFERS.labels(result="placed").inc()
        else:
            log.error("transfer to %s failed: Twilio did not take it (the caller hears the "
                      "fallback)", name)
            metrics.TRANSFERS.labels(result="failed").inc()

    async def _guard(self, task: Awaitable[Ending]) -> None:
        """Run one task of the call, its owner: whatever way it ends (an ending, any exception)
        becomes the call's end reason, and nothing but a cancellation goes further."""
        try:
            ending = await task
        except Exception as exc:
            self._fail(exc)
        else:
            self._end(*ending)

    def _fail(self, exc: Exception) -> None:
        """End the call because a task raised `exc`, with the one log line it deserves. The
        boundaries map every transport failure first (Twilio's into CallerDisconnected or
        ProtocolError, the assistant's into UpstreamError), so anything else here is voxd's
        own bug: logged with its traceback, the call ended as internal-error."""
        error = _voxd_error(exc)
        if isinstance(error, UpstreamError):
            log.error("assistant failed: %s", show(error, 300))
            metrics.ERRORS.labels(kind="upstream").inc()
            self._end("upstream-error")
        elif isinstance(error, CallerDisconnected):
            log.info("Twilio closed the media socket without 'stop': %s", show(error, 200))
            self._end("caller-disconnected")
        elif isinstance(error, ProtocolError):
            self._protocol_error(error)
        else:
            self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        log.error("internal error, ending the call: %s: %s", type(exc).__name__, exc,
                  exc_info=exc)
        metrics.ERRORS.labels(kind="internal").inc()
        self._end("internal-error")

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("protocol error from Twilio (peer %s), ending the call: %s", self.peer,
                    show(exc, 300))
        metrics.ERRORS.labels(kind="protocol").inc()
        self._end("protocol-error")

    # -- the four tasks --

    async def _inbound(self, feed: UpstreamFeed, turns: TurnTimer, playback: Playback,
                       speech: trio.MemorySendChannel[float]) -> Ending:
        mark_played = playback.mark_played
        echo_level = playback.echo_level
        margin = self.settings.config.barge_in.echo_margin_db
        receive = self.socket.receive
        parse = self.protocol.receive
        feed_audio = feed.send
        record = self.recorder.caller if self.recorder is not None else None
        transcode = (InboundTranscoder().process if self.provider.audio == "pcm16" else None)
        clock = trio.current_time
        stats = self.stats
        while True:
            event = parse(await receive())
            self._last_in = now = clock()
            if type(event) is MediaFrame:
                stats.frames_in += 1
                payload = event.payload
                if record is not None:
                    record(payload)
                energy = frame_energy_dbfs_ulaw(payload)
                if energy < echo_level(now) - margin:
                    energy = ENERGY_FLOOR_DBFS  # at most the assistant's own echo: not speech
                started = turns.caller_audio(event.timestamp_ms, len(payload), energy, now)
                if started:
                    with contextlib.suppress(trio.WouldBlock):
                        speech.send_nowait(now)
                feed_audio(transcode(payload) if transcode else payload)
            elif type(event) is MarkPlayed:
                mark_played(event.name)
            elif type(event) is Dtmf:
                self.keypad.press(event.digit)
                if self.record is not None:
                    self.record.pressed(self._stream_time(now), event.digit
                                        if self.keypad.config.log_digits else None)
            elif type(event) is StreamStop:
                return Ending("caller-hangup")

    async def _feeder(self, feed: UpstreamFeed, assistant: AssistantSession) -> Ending:
        await feed.run(assistant)
        return Ending("feeder-ended")  # pragma: no cover - runs for the life of the call

    async def _outbound(self, assistant: AssistantSession, playback: Playback,
                        turns: TurnTimer) -> Ending:
        transcode = (OutboundTranscoder().process if self.provider.audio == "pcm16" else None)
        record = self.record
        transcribed = record.transcript if record is not None and self._transcripts else None
        while True:
            event = await assistant.receive()
            if type(event) is AssistantAudio:
                await playback.enqueue(transcode(event.data) if transcode else event.data)
            elif type(event) is AssistantInterrupted or (
                    type(event) is CallerSpeechStarted and playback.playing):
                # what the caller heard of the cut turn: a model that keeps a transcript of
                # its own speech (OpenAI's truncate) must not think more was heard
                await assistant.barge_in(self._barge_in(playback, "assistant"))
            elif type(event) is AssistantEnded:
                await self._last_words(playback)
                return Ending(f"assistant-ended:{event.reason}")
            elif type(event) is TransferRequested:
                ending = await self._transfer(event, assistant, playback)
                if ending is not None:
                    return ending
            elif type(event) is DigitsRequested:
                await self._press_keys(event.digits, playback)
            elif type(event) is Transcript and transcribed is not None:
                transcribed(self._stream_time(trio.current_time()), event.role, event.text)
            elif type(event) is StageLatency:
                self._stage(event)

    def _stage(self, event: StageLatency) -> None:
        """A stage of the assistant's turn: exported, kept for the summary and the record."""
        if event.stage not in STAGES or not 0 <= event.seconds < 3600:
            return
        metrics.ASSISTANT_STAGE_SECONDS.labels(stage=event.stage).observe(event.seconds)
        samples = self.stats.stages.setdefault(event.stage, [])
        if len(samples) < MAX_STAGE_SAMPLES:
            samples.append(event.seconds)
        self._turn_stages[event.stage] = event.seconds  # named in the answer's mark
        if self.record is not None:
            self.record.stage(self._stream_time(trio.current_time()), event.stage,
                              event.seconds)

    async def _last_words(self, playback: Playback) -> None:
        """Let the caller hear the assistant's last words before the call moves on."""
        if not await playback.drain(grace=TEARDOWN_SECONDS):
            log.info("Twilio did not confirm the end of playback; going on anyway")

    async def _transfer(self, request: TransferRequested, assistant: AssistantSession,
                        playback: Playback) -> Ending | None:
        """Hand the caller to a person, if the assistant may send them there: the call's end
        (the teardown moves the call to the `<Dial>`), or None when it was refused and the
        call goes on."""
        try:
            to = destination(self.settings.config.transfer, request.to)
        except TransferRefusal as exc:
            log.warning("transfer to %s refused: %s", show(request.to, 64) or "(default)", exc)
            metrics.TRANSFERS.labels(result="refused").inc()
            if self.record is not None:
                self.record.transfer(self._stream_time(trio.current_time()), request.to[:64],
                                     "refused", str(exc))
            await assistant.tell(TransferRefused(request.to[:64], str(exc)))
            return None
        assert self.phone is not None  # the server always gives the call its phone leg
        self._transfer_to = (to.name, self.phone.dial_twiml(to, request.announce))
        if self.record is not None:
            self.record.transfer(self._stream_time(trio.current_time()), to.name, "decided")
        log.info("transferring the caller to %s", to.name)
        await self._last_words(playback)
        return Ending(f"transferred:{to.name}")

    async def _press_keys(self, digits: str, playback: Playback) -> None:
        """Play the keys the assistant asked for as DTMF tones, queued after its audio (so a
        barge-in drops them with it)."""
        problem = dtmf.problem(digits)
        if problem is not None:
            log.warning("the assistant asked to press keys that cannot be played: %s", problem)
            metrics.ERRORS.labels(kind="keypad").inc()
            return
        keys = sum(1 for key in digits if key not in "wW")
        log.info("pressing %d key(s) for the assistant", keys)
        metrics.KEYPAD.labels(direction="out").inc(keys)
        playback.unmute()  # a new request, not the rest of a turn the caller interrupted
        await playback.enqueue(dtmf.tones_ulaw(digits))

    async def _keypad(self, assistant: AssistantSession) -> Ending:
        await self.keypad.run(assistant)
        return Ending("keypad-ended")  # pragma: no cover - runs for the life of the call

    async def _notices(self, assistant: AssistantSession) -> Ending:
        """Tell the assistant what voxd learnt about the phone call (`answered_by`)."""
        async for notice in self._notices_rx:
            await assistant.tell(notice)
        return Ending("notices-ended")  # pragma: no cover - the channel stays open

    def _detects_machines(self) -> bool:
        """An outbound call placed with answering-machine detection (its verdict comes as a
        callback, to this process or to the shared state)."""
        return (self.call is not None and self.call.parameters.get("direction") == "outbound"
                and self.settings.config.outbound.machine_detection)

    async def _machine_detection(self) -> Ending:
        """Wait for the answering-machine verdict (handed to `answered_by` here, or left in
        the shared state by another worker or host, or before the stream started), then act
        as `outbound.on_machine` says: go on, hang up, or leave the message."""
        assert self.call is not None
        store = self.phone.answered if self.phone is not None else None
        with trio.move_on_after(MACHINE_VERDICT_SECONDS):
            while not self._verdict.is_set():
                value = await store.take(self.call.call_sid) if store is not None else None
                if value in ANSWERED_BY:
                    self.answered_by(value)
                    break
                with trio.move_on_after(MACHINE_POLL_SECONDS):
                    await self._verdict.wait()
        value = self._answered_by
        if value is None:
            log.info("no answering-machine verdict within %.0f s; the call goes on",
                     MACHINE_VERDICT_SECONDS)
        elif value in MACHINE and self.settings.config.outbound.on_machine == "hangup":
            return Ending(f"machine-hangup:{value}")
        elif value in MACHINE and self.settings.config.outbound.on_machine == "message":
            return Ending(f"machine-message:{value}")
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _playout(self, playback: Playback) -> Ending:
        await playback.run()
        return Ending("playout-ended")  # pragma: no cover - runs for the life of the call

    def _answer_started(self, turns: TurnTimer, at: float) -> str | None:
        """The assistant's audio started going out: if it answers a caller turn, time it, and
        name a mark to send ahead of it (Twilio echoes it when the answer starts playing; the
        simulator reads voxd's figure from its name)."""
        latency = turns.assistant_audio(at)
        if latency is None:
            return None
        return self._turn_timed(len(turns.latencies), latency, at)

    def _turn_timed(self, turn: int, latency: float, at: float) -> str:
        """The `turn`-th answer, begun at `at`, is timed: exported, recorded, logged; the mark
        to send ahead of it. An answer that began inside the VAD's hangover is timed once the
        caller's turn is known to have ended (`TurnTimer`), after its first frames went out:
        its mark is not sent (Playback has no way to put one in a burst it is playing)."""
        metrics.TURN_LATENCY_SECONDS.observe(latency)
        if self.record is not None:  # `at` may be up to a hangover ago: its own stream time
            self.record.turn(max(0.0, self._stream_time(at) - max(0.0, self._last_in - at)),
                             turn, latency)
        log.debug("turn %d: response latency %.0f ms", turn, latency * 1000)
        stages = "".join(f";{stage}_ms={seconds * 1000:.0f}"
                         for stage, seconds in self._turn_stages.items())
        self._turn_stages.clear()
        return f"voxd:turn={turn};latency_ms={latency * 1000:.0f}{stages}"

    async def _watchdog(self, playback: Playback, feed: UpstreamFeed) -> Ending:
        """Twilio sends 50 media messages a second: a long silence means the socket is dead
        even if TCP has not noticed (no FIN, no RST), and the call must not hold its slot.
        Also ends the call at call.max_call_seconds, when Twilio stops reading (queued
        audio makes no progress for call.send_timeout: a stalled reader must not pin memory),
        and when the assistant stops reading caller audio (call.upstream_send_timeout: the
        assistant is blamed, not Twilio, whose socket the inbound pump keeps reading).
        Also adds the call's frame counts to the metrics every few seconds (not per frame:
        the per-frame path takes no metric locks)."""
        call = self.settings.config.call
        timeout, longest, stall = call.media_timeout, call.max_call_seconds, call.send_timeout
        upstream_stall = call.upstream_send_timeout
        end_by = self.stats.started_at + longest
        sent, progressed = playback.frames_sent, trio.current_time()
        while True:
            await trio.sleep_until(min(self._last_in + timeout, end_by, trio.current_time()
                                       + min(METRICS_INTERVAL, stall / 2, upstream_stall / 4)))
            self._report_frames(playback.frames_sent)
            now = trio.current_time()
            if now >= end_by:
                log.warning("call reached call.max_call_seconds (%.0fs); ending it", longest)
                return Ending("max-duration")
            if playback.frames_sent != sent or not playback.held_seconds:
                sent, progressed = playback.frames_sent, now
            elif now - progressed >= stall:
                log.warning("Twilio stopped reading: no audio could be sent for %.1fs with "
                            "%.1fs queued (call.send_timeout); ending the call", now - progressed,
                            playback.held_seconds)
                metrics.ERRORS.labels(kind="twilio_stalled").inc()
                return Ending("twilio-stalled")
            stalled = feed.stalled_seconds(now)
            if stalled >= upstream_stall:
                log.error("the assistant stopped taking caller audio: none taken for %.1fs "
                          "(call.upstream_send_timeout); ending the call", stalled)
                metrics.ERRORS.labels(kind="upstream_stalled").inc()
                return Ending("upstream-stalled")
            if now - self._last_in >= timeout:
                log.warning("no message from Twilio for %.1fs (call.media_timeout); ending the "
                            "call", timeout)
                metrics.ERRORS.labels(kind="twilio_silent").inc()
                return Ending("twilio-silent")

    def _report_frames(self, frames_out: int) -> None:
        """Add the frames moved since the last report to voxd_media_frames_total."""
        reported_in, reported_out = self._frames_reported
        metrics.MEDIA_FRAMES.labels(direction="inbound").inc(self.stats.frames_in - reported_in)
        metrics.MEDIA_FRAMES.labels(direction="outbound").inc(frames_out - reported_out)
        self._frames_reported = (self.stats.frames_in, frames_out)

    async def _keepalive(self, assistant: AssistantSession) -> Ending:
        interval = self.settings.config.call.keepalive_interval
        timeout = self.settings.config.call.keepalive_timeout
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(timeout) as scope:
                await assistant.ping()
            if scope.cancelled_caught:
                log.error("assistant did not answer a keep-alive within %.1fs", timeout)
                metrics.ERRORS.labels(kind="keepalive").inc()
                return Ending("upstream-keepalive-timeout")

    async def _barge_in_watcher(self, assistant: AssistantSession, playback: Playback,
                                speech: trio.MemoryReceiveChannel[float]) -> Ending:
        """The caller started speaking (voxd's own VAD, echo-gated): if assistant audio is
        playing, interrupt it, drop the rest of its turn, and tell the assistant how much of
        it the caller heard."""
        async for _ in speech:
            if self.local_vad and playback.playing:
                heard = self._barge_in(playback, "vad", mute=True)
                await assistant.barge_in(heard)
        return Ending("barge-in-watcher-ended")  # pragma: no cover - the channel stays open

    def _barge_in(self, playback: Playback, source: str, mute: bool = False) -> float:
        """Drop unplayed assistant audio; count and log it. Returns seconds of it heard."""
        heard = playback.heard_seconds
        dropped = playback.interrupt(mute)
        if self.recorder is not None:  # what Twilio held is cleared: it never plays
            self._heard_slot = self._slot(trio.current_time())
            self.recorder.unheard(self._heard_slot + 1)
        if dropped > 0.0:
            self.stats.barge_ins += 1
            if self.record is not None:
                self.record.barge_in(self._stream_time(trio.current_time()), source, heard,
                                     dropped)
            metrics.BARGE_INS.labels(source=source).inc()
            log.info("barge-in (%s): caller heard %.0f ms of the assistant's turn; dropped "
                     "%.0f ms", source, heard * 1000, dropped * 1000)
        return heard

    # -- the end --

    def _summarise(self) -> None:
        s = self.stats
        duration = trio.current_time() - s.started_at
        p50 = percentile(s.latencies, 50)
        p95 = percentile(s.latencies, 95)
        reason = self.end_reason or "unknown"
        row = policy(reason)
        metrics.CALLS_TOTAL.labels(outcome=row.outcome).inc()
        self._report_frames(s.frames_out)
        stages = "".join(f" assistant_{stage}_p50={_ms(percentile(s.stages[stage], 50))}"
                         for stage in STAGES if s.stages.get(stage))
        log.log(
            row.level,
            "call ended: duration=%.1fs frames_in=%d frames_out=%d dropped_in=%d "
            "dropped_out=%d turns=%d latency_p50=%s latency_p95=%s barge_ins=%d%s reason=%s",
            duration, s.frames_in, s.frames_out, s.frames_dropped_in, s.frames_dropped_out,
            len(s.latencies), _ms(p50), _ms(p95), s.barge_ins, stages, show(reason, 160),
        )
        if self.recorder is not None:  # the writer thread finishes the file, writes the record
            record = None
            try:
                if self.record is not None:
                    self.record.ended(
                        self._stream_time(self._ended_at or trio.current_time()), reason,
                        duration=duration, frames_in=s.frames_in, frames_out=s.frames_out,
                        dropped_in=s.frames_dropped_in, dropped_out=s.frames_dropped_out,
                        turns=len(s.latencies), latency_p50=p50, latency_p95=p95,
                        barge_ins=s.barge_ins)
                    record = self.record.to_jsonl()
            finally:
                self.recorder.close(record)


def _voxd_error(exc: BaseException) -> VoxdError | None:
    """The VoxdError behind `exc`, also when trio delivers it inside an exception group (a
    provider's own nursery does that); None if anything else is in there too."""
    if isinstance(exc, VoxdError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(VoxdError)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, VoxdError) else None
    return None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


"""The built-in `echo` assistant: needs no account, and makes a full call audible.

It listens to the caller; after about 500 ms of silence it plays the caller's utterance back,
paced in real time like a streaming voice. If the caller talks over the playback for
`interrupt_ms` it stops and signals an interruption (as a real assistant does), then listens
to the new utterance. Keys the caller presses are pressed back (DTMF tones), except `0`,
which asks voxd to transfer the call to transfer.default.

Echo gate. A phone line returns part of what the caller hears (hybrid echo: typically 20 dB or
more down, a few tens to a few hundred ms late), so while the echo plays, its own voice comes
back mixed into the caller's audio. The echo knows exactly what it played and when, so it
applies the same rule as voxd's own barge-in gate (barge_in.echo_margin_db): caller audio
quieter than the loudest frame it played within the last `echo_tail_seconds`, minus
`echo_margin_db`, is taken for its own echo and counts as silence (for the interruption and for
what it records as the next utterance). A caller talking at a normal level over the playback
is well above that and still interrupts.

Who interrupts first. voxd's local VAD (barge_in.local_vad, on for the echo) fires after
barge_in.min_speech_ms (80-100 ms) and stops the echo through `barge_in`; the echo's own
interruption needs `interrupt_ms` (200 ms) of caller speech, as a remote assistant's slower
detector would. So with the local VAD on, a barge-in is always voxd's (`source=vad`), and with
it off always the echo's (`source=assistant`): never a race between the two.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from voxd.audio.framing import FrameCutter
from voxd.audio.line import FRAME_SECONDS
from voxd.audio.vad import (
    ENERGY_FLOOR_DBFS,
    SpeechDetector,
    SpeechEdge,
    frame_energy_dbfs_pcm16,
    frame_energy_dbfs_ulaw,
)
from voxd.providers.base import (
    BYTES_PER_SECOND,
    AssistantAudio,
    AssistantEvent,
    AssistantInterrupted,
    AudioFormat,
    BackgroundTasks,
    CallInfo,
    CallNotice,
    DigitsRequested,
    KeypadEntry,
    TransferRefused,
    TransferRequested,
)

log = logging.getLogger("voxd.providers.echo")

PLAYBACK_LEAD_SECONDS = 0.1
"""The echo runs this far ahead of real time, as a streaming voice does, so scheduling jitter
never starves the caller's playback."""
PREROLL_FRAMES = 10
"""Frames kept from before speech was confirmed, so the echo keeps the utterance's onset."""
ECHO_TAIL_SECONDS = 0.5
"""How long after a frame starts playing its echo may still come back: voxd's and Twilio's
queues (at most barge_in.playback_lead_ms), the network both ways, a caller frame's 20 ms of
capture and the line's own echo delay (the simulator's 120 ms; long VoIP or satellite paths a
few hundred ms). Longer only makes a caller who answers right after a loud word need to be
louder for this long."""
ECHO_MARGIN_DB = 15.0
"""Caller audio this far or more below the echo's own recent level is its echo (voxd's
barge_in.echo_margin_db default; a line's echo return loss is 20 dB or more)."""
INTERRUPT_MS = 200
"""Caller speech over the playback needed before the echo interrupts itself: longer than voxd's
local VAD (so voxd, when it listens, always acts first) and than a backchannel click or "mm"."""


class EchoProvider:
    """Provider of `EchoAssistant`s."""

    name = "echo"

    def __init__(self, audio: AudioFormat = "pcm16", *, silence_ms: int = 500,
                 threshold_dbfs: float = -40.0, min_speech_ms: int = 100,
                 max_utterance_seconds: float = 30.0, interrupt_ms: int = INTERRUPT_MS,
                 echo_margin_db: float = ECHO_MARGIN_DB,
                 echo_tail_seconds: float = ECHO_TAIL_SECONDS) -> None:
        self.audio = audio
        self.silence_ms = silence_ms
        self.threshold_dbfs = threshold_dbfs
        self.min_speech_ms = min_speech_ms
        self.max_utterance_seconds = max_utterance_seconds
        self.interrupt_ms = interrupt_ms
        self.echo_margin_db = echo_margin_db
        self.echo_tail_seconds = echo_tail_seconds

    def prepare(self, call: CallInfo, tasks: BackgroundTasks) -> None:
        """Nothing to prepare: the echo is in-process."""

    async def aclose(self) -> None:
        """Nothing held across calls."""
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def connect(self, call: CallInfo) -> AsyncIterator[EchoAssistant]:
        """An echo assistant for one call; its playback task lives inside this context."""
        async with trio.open_nursery() as nursery:
            assistant = EchoAssistant(self, nursery)
            try:
                yield assistant
            finally:
                nursery.cancel_scope.cancel()


class EchoAssistant:
    """One call's echo: VAD-segmented utterances played back after a pause."""

    def __init__(self, provider: EchoProvider, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        frame_bytes = int(BYTES_PER_SECOND[provider.audio] * FRAME_SECONDS)
        self._energy = (frame_energy_dbfs_pcm16 if provider.audio == "pcm16"
                        else frame_energy_dbfs_ulaw)
        self._cutter = FrameCutter(frame_bytes, 0 if provider.audio == "pcm16" else 0xFF)
        self._detector = SpeechDetector(
            threshold_dbfs=provider.threshold_dbfs, min_speech_ms=provider.min_speech_ms,
            hangover_ms=provider.silence_ms,
        )
        self._threshold = provider.threshold_dbfs
        self._max_frames = int(provider.max_utterance_seconds / FRAME_SECONDS)
        self._interrupt_frames = max(1, math.ceil(provider.interrupt_ms / 1000 / FRAME_SECONDS
                                                  - 1e-9))
        self._margin = provider.echo_margin_db
        self._tail = provider.echo_tail_seconds
        # Frames are kept with their energy (dBFS, before the gate): the echo reference once
        # they are played back.
        self._preroll: collections.deque[tuple[bytes, float]] = collections.deque(
            maxlen=PREROLL_FRAMES)
        self._utterance: list[tuple[bytes, float]] = []
        self._voiced = 0  # loud frames of the current utterance (after the echo gate)
        self._played: collections.deque[tuple[float, float]] = collections.deque()
        """(time it starts playing to the caller, energy) of every frame sent, oldest first,
        for as long as its echo may come back."""
        self._playing: trio.CancelScope | None = None
        self._events_tx, self._events_rx = trio.open_memory_channel[AssistantEvent](16)

    def echo_level(self, now: float) -> float:
        """The loudest of the echo's own frames that may be echoing back at `now` (dBFS;
        ENERGY_FLOOR_DBFS when none): those that started playing within the echo tail."""
        played = self._played
        horizon = now - self._tail - FRAME_SECONDS
        while played and played[0][0] < horizon:
            played.popleft()
        level = ENERGY_FLOOR_DBFS
        for at, energy in played:
            if at > now:  # sent ahead, not playing yet
                break
            if energy > level:
                level = energy
        return level

    async def send_audio(self, chunk: bytes) -> None:
        """Caller audio in the provider's format."""
        for frame in self._cutter.push(chunk):
            await self._on_frame(frame)

    async def _on_frame(self, frame: bytes) -> None:
        detector = self._detector
        level = energy = self._energy(frame)
        # The gate decides whether caller speech starts, and keeps the playback from feeding
        # itself. Once the playback was stopped with the caller holding the floor, what is still
        # coming back of it lies under the caller's voice: the caller's quieter syllables then
        # count, so the gate does not cut the caller's utterance short.
        if (self._played and (self._playing is not None or not detector.in_speech)
                and energy < self.echo_level(trio.current_time()) - self._margin):
            energy = ENERGY_FLOOR_DBFS  # at most the echo's own voice coming back: not speech
        edge = detector.update(energy)
        if edge is SpeechEdge.STARTED:
            # The detector confirms speech a few frames late: take those from the pre-roll.
            late = detector.frames_seen - 1 - (detector.speech_started_at_frame or 0)
            preroll = list(self._preroll)
            self._utterance = preroll[max(0, len(preroll) - late):] if late else []
            self._voiced = detector.min_speech_frames
        elif detector.in_speech and energy > self._threshold:
            self._voiced += 1
        if (self._playing is not None and detector.in_speech
                and self._voiced >= self._interrupt_frames):
            self._stop_playing()
            await self._events_tx.send(AssistantInterrupted())
        capturing = detector.in_speech or edge is SpeechEdge.STOPPED
        if capturing and len(self._utterance) < self._max_frames:
            self._utterance.append((frame, level))
        self._preroll.append((frame, level))
        if edge is SpeechEdge.STOPPED:
            # Keep the utterance up to its last voiced frame (drop the silent hangover).
            keep = len(self._utterance) - (detector.frames_seen - 1 -
                                           (detector.speech_ended_at_frame or 0))
            utterance, self._utterance = self._utterance[:max(keep, 0)], []
            if self._playing is not None:
                # Too short to interrupt (a click, an "mm"): talk-over that did not take the
                # turn is not answered.
                log.debug("caller sound over the echo's playback, too short to interrupt it: "
                          "not echoed")
            elif utterance:
                self._playing = trio.CancelScope()
                self._nursery.start_soon(self._play, utterance, self._playing)

    async def _play(self, frames: list[tuple[bytes, float]], scope: trio.CancelScope) -> None:
        played = self._played
        with scope:
            begin = trio.current_time()
            start = begin - PLAYBACK_LEAD_SECONDS
            for i, (frame, energy) in enumerate(frames):
                await trio.sleep_until(start + i * FRAME_SECONDS)
                await self._events_tx.send(AssistantAudio(frame))
                # Sent PLAYBACK_LEAD_SECONDS ahead: the caller hears it from here (or later).
                played.append((begin + i * FRAME_SECONDS, energy))
        if self._playing is scope:
            self._playing = None

    def _stop_playing(self) -> None:
        """Stop the playback (if any); what was sent ahead is never heard (voxd clears it), so
        it leaves the echo reference."""
        if self._playing is None:
            return
        self._playing.cancel()
        self._playing = None
        now = trio.current_time()
        played = self._played
        while played and played[-1][0] > now:
            played.pop()

    async def receive(self) -> AssistantEvent:
        """The next piece of echo audio, or an interruption."""
        return await self._events_rx.receive()

    async def ping(self) -> None:
        """Nothing to reach: always alive."""
        await trio.lowlevel.checkpoint()

    async def hang_up(self) -> None:
        """Nothing to tell."""
        await trio.lowlevel.checkpoint()

    async def barge_in(self, heard_seconds: float) -> None:
        """voxd heard the caller first: stop the playback (the echo would later)."""
        self._stop_playing()
        await trio.lowlevel.checkpoint()

    async def tell(self, notice: CallNotice) -> None:
        """Keys echo too: `0` asks for a transfer to transfer.default, anything else is
        pressed back to the caller (so the demo and the tests exercise both directions)."""
        if isinstance(notice, KeypadEntry):
            if notice.digits.rstrip("#") == "0":
                await self._events_tx.send(TransferRequested())
            else:
                await self._events_tx.send(DigitsRequested(notice.digits))
        elif isinstance(notice, TransferRefused):
            log.info("echo: the transfer was refused (%s)", notice.reason)
        # AnsweredBy: an echo says the same to a person and a machine
        await trio.lowlevel.checkpoint()

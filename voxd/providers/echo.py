"""The built-in `echo` assistant: needs no account, and makes a full call audible.

It listens to the caller; after about 500 ms of silence it plays the caller's utterance back,
paced in real time like a streaming voice. If the caller talks over the playback it stops and
signals an interruption (as a real assistant does), then listens to the new utterance.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from voxd.audio.framing import FrameCutter
from voxd.audio.vad import (
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
    CallInfo,
)

log = logging.getLogger("voxd.providers.echo")

FRAME_SECONDS = 0.020
PLAYBACK_LEAD_SECONDS = 0.1
"""The echo runs this far ahead of real time, as a streaming voice does, so scheduling jitter
never starves the caller's playback."""
PREROLL_FRAMES = 10
"""Frames kept from before speech was confirmed, so the echo keeps the utterance's onset."""


class EchoProvider:
    """Provider of `EchoAssistant`s."""

    name = "echo"

    def __init__(self, audio: AudioFormat = "pcm16", *, silence_ms: int = 500,
                 threshold_dbfs: float = -40.0, min_speech_ms: int = 100,
                 max_utterance_seconds: float = 30.0) -> None:
        self.audio = audio
        self.silence_ms = silence_ms
        self.threshold_dbfs = threshold_dbfs
        self.min_speech_ms = min_speech_ms
        self.max_utterance_seconds = max_utterance_seconds

    def prepare(self, call: CallInfo, nursery: trio.Nursery) -> None:
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
        self._max_frames = int(provider.max_utterance_seconds / FRAME_SECONDS)
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=PREROLL_FRAMES)
        self._utterance: list[bytes] = []
        self._playing: trio.CancelScope | None = None
        self._events_tx, self._events_rx = trio.open_memory_channel[AssistantEvent](16)

    async def send_audio(self, chunk: bytes) -> None:
        """Caller audio in the provider's format."""
        for frame in self._cutter.push(chunk):
            await self._on_frame(frame)

    async def _on_frame(self, frame: bytes) -> None:
        detector = self._detector
        edge = detector.update(self._energy(frame))
        if edge is SpeechEdge.STARTED:
            # The detector confirms speech a few frames late: take those from the pre-roll.
            late = detector.frames_seen - 1 - (detector.speech_started_at_frame or 0)
            preroll = list(self._preroll)
            self._utterance = preroll[max(0, len(preroll) - late):] if late else []
            if self._playing is not None:
                self._playing.cancel()
                self._playing = None
                await self._events_tx.send(AssistantInterrupted())
        capturing = detector.in_speech or edge is SpeechEdge.STOPPED
        if capturing and len(self._utterance) < self._max_frames:
            self._utterance.append(frame)
        self._preroll.append(frame)
        if edge is SpeechEdge.STOPPED:
            # Keep the utterance up to its last voiced frame (drop the silent hangover).
            keep = len(self._utterance) - (detector.frames_seen - 1 -
                                           (detector.speech_ended_at_frame or 0))
            utterance, self._utterance = self._utterance[:max(keep, 0)], []
            if utterance:
                self._playing = trio.CancelScope()
                self._nursery.start_soon(self._play, utterance, self._playing)

    async def _play(self, frames: list[bytes], scope: trio.CancelScope) -> None:
        with scope:
            start = trio.current_time() - PLAYBACK_LEAD_SECONDS
            for i, frame in enumerate(frames):
                await trio.sleep_until(start + i * FRAME_SECONDS)
                await self._events_tx.send(AssistantAudio(frame))
        if self._playing is scope:
            self._playing = None

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
        """voxd heard the caller first: stop the playback (the echo would a frame later)."""
        if self._playing is not None:
            self._playing.cancel()
            self._playing = None
        await trio.lowlevel.checkpoint()

"""Cheap energy-based speech detection, one call per 20 ms frame.

Energy is the frame's RMS in dBFS relative to a full-scale RMS of 32768 (a full-scale
square wave is 0 dBFS, a full-scale sine -3.01 dBFS). SpeechDetector is a small hysteresis
state machine on top: speech starts after min_speech_ms of consecutive loud frames and
stops after hangover_ms of consecutive quiet frames.
"""

from __future__ import annotations

import math
import warnings
from enum import StrEnum

import numpy as np

with warnings.catch_warnings():  # stdlib through Python 3.12; the audioop-lts package from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "ENERGY_FLOOR_DBFS",
    "SpeechDetector",
    "SpeechEdge",
    "frame_energy_dbfs_pcm16",
    "frame_energy_dbfs_ulaw",
]

ENERGY_FLOOR_DBFS: float = -100.0
"""Energy reported for digital silence (and the lower bound of every reported energy)."""

_U8 = np.dtype(np.uint8)
_S16LE = np.dtype("<i2")
_FULL_SCALE_SQ = 32768.0 * 32768.0
_FLOOR_MEAN_SQ = _FULL_SCALE_SQ * 10.0 ** (ENERGY_FLOOR_DBFS / 10.0)

_FULL_SCALE_32 = 2.0**31
"""Full scale of the 32-bit samples audioop decodes mu-law to (the 16-bit value << 16)."""
_FLOOR_RMS_32 = _FULL_SCALE_32 * 10.0 ** (ENERGY_FLOOR_DBFS / 20.0)


def frame_energy_dbfs_ulaw(frame: bytes) -> float:
    """RMS energy of a mu-law frame in dBFS.

    audioop decodes the codes straight to 32-bit samples (G.711's values, the same as
    voxd.audio.g711's table, shifted left by 16) and sums their squares in double precision,
    so the result matches the decoded 16-bit signal's energy to ~1e-5 dB. It is two C calls:
    this runs twice per frame pair of every call, and numpy's take-and-dot cost 1.4 us in a
    micro-benchmark but measured 0.045 points of a core per call at 100 calls (10% of voxd's
    CPU; README "Performance"), against 0.3 us here.
    """
    rms = audioop.rms(audioop.ulaw2lin(frame, 4), 4)
    if rms <= _FLOOR_RMS_32:
        return ENERGY_FLOOR_DBFS
    return 20.0 * math.log10(rms / _FULL_SCALE_32)


def frame_energy_dbfs_pcm16(frame: bytes) -> float:
    """RMS energy of an s16le frame in dBFS (a trailing odd byte is ignored)."""
    n = len(frame) >> 1
    if n == 0:
        return ENERGY_FLOOR_DBFS
    x = np.frombuffer(frame, _S16LE, n).astype(np.float64)
    total = float(x.dot(x))
    if total <= _FLOOR_MEAN_SQ * n:
        return ENERGY_FLOOR_DBFS
    return 10.0 * math.log10(total / (_FULL_SCALE_SQ * n))


class SpeechEdge(StrEnum):
    """Transition reported by SpeechDetector.update."""

    STARTED = "started"
    STOPPED = "stopped"


class SpeechDetector:
    """Threshold + minimum-duration + hangover speech detector over per-frame energies.

    Frame indices count update() calls since creation or reset(), starting at 0; multiply
    by frame_ms to get milliseconds. Attributes (read them, do not assign):
    frames_seen: update() calls so far (the index the next frame will get);
    speech_started_at_frame: first frame of the current/last utterance (the first of the
    min_speech_frames loud frames that triggered STARTED);
    last_voiced_frame: latest loud frame of the current/last utterance; after STOPPED it is
    the true end of speech, not the end of the hangover;
    speech_ended_at_frame: last_voiced_frame as of the last STOPPED (None while in speech).
    """

    __slots__ = (
        "_in_speech",
        "_loud_run",
        "_quiet_run",
        "_run_start",
        "frame_ms",
        "frames_seen",
        "hangover_frames",
        "last_voiced_frame",
        "min_speech_frames",
        "speech_ended_at_frame",
        "speech_started_at_frame",
        "threshold_dbfs",
    )

    def __init__(
        self,
        threshold_dbfs: float = -40.0,
        min_speech_ms: int = 60,
        hangover_ms: int = 300,
        frame_ms: int = 20,
    ) -> None:
        if frame_ms <= 0:
            raise ValueError(f"frame_ms must be positive, got {frame_ms}")
        if min_speech_ms < 0 or hangover_ms < 0:
            raise ValueError("min_speech_ms and hangover_ms must be >= 0")
        self.threshold_dbfs = threshold_dbfs
        self.frame_ms = frame_ms
        # Whole frames needed; a partial frame rounds up; at least one frame either way.
        self.min_speech_frames = max(1, -(-min_speech_ms // frame_ms))
        self.hangover_frames = max(1, -(-hangover_ms // frame_ms))
        self.reset()

    @property
    def in_speech(self) -> bool:
        """True between a STARTED and the following STOPPED."""
        return self._in_speech

    def reset(self) -> None:
        """Return to the initial state (not in speech, frame counter 0)."""
        self.frames_seen = 0
        self._in_speech = False
        self.speech_started_at_frame: int | None = None
        self.last_voiced_frame: int | None = None
        self.speech_ended_at_frame: int | None = None
        self._loud_run = 0
        self._quiet_run = 0
        self._run_start = 0

    def update(self, energy_dbfs: float) -> SpeechEdge | None:
        """Feed the next frame's energy; return STARTED/STOPPED on a transition, else None."""
        i = self.frames_seen
        self.frames_seen = i + 1
        loud = energy_dbfs > self.threshold_dbfs
        if self._in_speech:
            if loud:
                self.last_voiced_frame = i
                self._quiet_run = 0
                return None
            self._quiet_run += 1
            if self._quiet_run >= self.hangover_frames:
                self._in_speech = False
                self.speech_ended_at_frame = self.last_voiced_frame
                self._quiet_run = 0
                self._loud_run = 0
                return SpeechEdge.STOPPED
            return None
        if not loud:
            self._loud_run = 0
            return None
        if self._loud_run == 0:
            self._run_start = i
        self._loud_run += 1
        if self._loud_run >= self.min_speech_frames:
            self._in_speech = True
            self.speech_started_at_frame = self._run_start
            self.last_voiced_frame = i
            self.speech_ended_at_frame = None
            self._quiet_run = 0
            return SpeechEdge.STARTED
        return None

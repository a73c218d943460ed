"""Caller audio for the simulators: speech-like test signals and line framing (mu-law cut into
20 ms frames). Pure."""

from __future__ import annotations

import numpy as np

from voxd.audio.g711 import ULAW_SILENCE, pcm16_to_ulaw
from voxd.audio.line import FRAME_BYTES, SAMPLE_RATE


def to_frames(ulaw: bytes) -> list[bytes]:
    """mu-law bytes cut into 160-byte frames, the last padded with silence."""
    pad = (-len(ulaw)) % FRAME_BYTES
    ulaw += bytes([ULAW_SILENCE]) * pad
    return [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


def speech_ulaw(seconds: float, seed: int = 7, pauses: bool = True) -> bytes:
    """Speech-like mu-law audio at about -20 dBFS: syllable-shaped noise, in 1.2 s bursts with
    0.8 s pauses (or without pauses)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    x = np.convolve(rng.standard_normal(n), np.hanning(9) / 4.5, mode="same")
    t = np.arange(n) / SAMPLE_RATE
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    if pauses:
        x *= (t % 2.0) < 1.2
    x = x / max(1e-9, float(np.max(np.abs(x)))) * 0.3 * 32767
    return pcm16_to_ulaw(x.astype("<i2").tobytes())


def speech_frames(seconds: float, seed: int = 7) -> list[bytes]:
    """`speech_ulaw` (with pauses) in whole 20 ms frames."""
    ulaw = speech_ulaw(seconds, seed)
    return [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]

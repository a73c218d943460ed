"""Audio files for the simulators: the caller's audio read from any file libsndfile reads (WAV
of every kind, FLAC, OGG/Vorbis/Opus, AIFF, ...), the call written as a stereo WAV."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from voxd.audio.line import SAMPLE_RATE
from voxd.errors import VoxdError
from voxd.observability.untrusted import show

FORMATS = "WAV of any kind, FLAC, OGG, AIFF"
"""What `read_audio` reads, for a person (libsndfile reads a few more)."""


class AudioFileError(VoxdError):
    """An audio file that cannot be read; the message names the file and the reason."""


def read_audio(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """An audio file as mono int16 at `rate` (8 kHz, the phone line's): channels averaged,
    resampled with soxr. AudioFileError naming the file and why it cannot be read."""
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioFileError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{path}: the file is empty")
    try:
        samples, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        reason = exc.error_string.rstrip(".") or type(exc).__name__
        if reason.lower() == "format not recognised":
            reason = f"not an audio file libsndfile reads ({FORMATS})"
        else:
            reason = f"cannot read it (damaged or cut short?): {show(reason, 120)}"
        raise AudioFileError(f"{path}: {reason}") from None
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise AudioFileError(f"{path}: cannot read it: {exc or type(exc).__name__}") from None
    if samples.size == 0:
        raise AudioFileError(f"{path}: holds no audio (0 samples)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate, quality="VHQ")
    pcm: np.ndarray = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    return pcm


def write_stereo_wav(path: Path, left: np.ndarray, right: np.ndarray,
                     rate: int = SAMPLE_RATE) -> None:
    """Two int16 tracks as one 16-bit stereo WAV (the shorter padded with silence)."""
    n = max(len(left), len(right))
    stereo = np.zeros((n, 2), np.int16)
    stereo[: len(left), 0] = left
    stereo[: len(right), 1] = right
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(stereo.astype("<i2").tobytes())

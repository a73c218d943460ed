"""Energy measurement and the hysteresis speech detector, on synthetic audio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxd.audio.g711 import ULAW_SILENCE, ulaw_encode, ulaw_to_pcm16
from voxd.audio.vad import (
    ENERGY_FLOOR_DBFS,
    SpeechDetector,
    SpeechEdge,
    frame_energy_dbfs_pcm16,
    frame_energy_dbfs_ulaw,
)

FS = 8000
FRAME = 160  # 20 ms at 8 kHz


def db_to_amp(dbfs: float) -> float:
    """Peak amplitude of a sine whose RMS is dbfs (re 32768)."""
    return 32768.0 * math.sqrt(2) * 10 ** (dbfs / 20)


def make_signal(
    bursts: list[tuple[int, int]],
    total_frames: int,
    tone_dbfs: float,
    noise_dbfs: float | None,
    seed: int = 0,
) -> np.ndarray:
    """int16 signal at 8 kHz: 440 Hz tone in the given [start, end) frame ranges, plus noise."""
    n = total_frames * FRAME
    t = np.arange(n) / FS
    x = np.zeros(n)
    for start, end in bursts:
        sl = slice(start * FRAME, end * FRAME)
        x[sl] = db_to_amp(tone_dbfs) * np.sin(2 * np.pi * 440 * t[sl])
    if noise_dbfs is not None:
        rng = np.random.default_rng(seed)
        x += rng.standard_normal(n) * 32768.0 * 10 ** (noise_dbfs / 20)
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def ulaw_frames(x: np.ndarray) -> list[bytes]:
    codes = ulaw_encode(x).tobytes()
    return [codes[i : i + FRAME] for i in range(0, len(codes), FRAME)]


def run(detector: SpeechDetector, frames: list[bytes]) -> list[tuple[int, SpeechEdge, int]]:
    """Feed frames; return (frame index, edge, reported start-or-end frame) per edge."""
    events = []
    for i, frame in enumerate(frames):
        edge = detector.update(frame_energy_dbfs_ulaw(frame))
        if edge is SpeechEdge.STARTED:
            events.append((i, edge, detector.speech_started_at_frame))
        elif edge is SpeechEdge.STOPPED:
            events.append((i, edge, detector.last_voiced_frame))
    return events


# --- energy ---


def test_silence_is_the_floor() -> None:
    assert frame_energy_dbfs_ulaw(bytes([ULAW_SILENCE]) * 160) == ENERGY_FLOOR_DBFS
    assert frame_energy_dbfs_ulaw(bytes([0x7F]) * 160) == ENERGY_FLOOR_DBFS
    assert frame_energy_dbfs_pcm16(bytes(320)) == ENERGY_FLOOR_DBFS
    assert frame_energy_dbfs_ulaw(b"") == ENERGY_FLOOR_DBFS
    assert frame_energy_dbfs_pcm16(b"") == ENERGY_FLOOR_DBFS


def test_full_scale_square_is_0_dbfs() -> None:
    square = np.tile(np.array([32767, -32768], "<i2"), 160).tobytes()
    assert frame_energy_dbfs_pcm16(square) == pytest.approx(0.0, abs=0.001)


@pytest.mark.parametrize("dbfs", [-3.0103, -20.0, -40.0, -60.0])
def test_sine_energy(dbfs: float) -> None:
    x = make_signal([(0, 1)], 1, dbfs, None)
    assert frame_energy_dbfs_pcm16(x.astype("<i2").tobytes()) == pytest.approx(dbfs, abs=0.05)
    # mu-law quantisation noise adds a little energy at low levels (~0.5 dB at -60 dBFS)
    assert frame_energy_dbfs_ulaw(ulaw_frames(x)[0]) == pytest.approx(dbfs, abs=1.0)


def test_ulaw_energy_matches_decoded_energy() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, 160, dtype=np.uint8).tobytes()
    assert frame_energy_dbfs_ulaw(frame) == pytest.approx(
        frame_energy_dbfs_pcm16(ulaw_to_pcm16(frame)), abs=1e-4
    )


@pytest.mark.parametrize("code", [0x00, 0x10, 0x40, 0x70, 0x7E, 0x80, 0xC0, 0xFE])
def test_ulaw_energy_matches_decoded_energy_at_every_level(code: int) -> None:
    """Loud to barely above silence: decoded by audioop, summed in double precision."""
    frame = bytes([code, 0xFF, code ^ 0x80, code]) * 40
    assert frame_energy_dbfs_ulaw(frame) == pytest.approx(
        frame_energy_dbfs_pcm16(ulaw_to_pcm16(frame)), abs=1e-4
    )


# --- detector ---


@pytest.mark.parametrize("noise_dbfs", [None, -60.0])
def test_bursts_give_one_start_and_one_stop_each(noise_dbfs: float | None) -> None:
    bursts = [(10, 40), (70, 76), (100, 160)]
    x = make_signal(bursts, 200, -20.0, noise_dbfs)
    det = SpeechDetector()  # -40 dBFS, 60 ms = 3 frames, 300 ms = 15 frames
    events = run(det, ulaw_frames(x))
    expected = []
    for start, end in bursts:
        expected.append((start + 2, SpeechEdge.STARTED, start))
        expected.append((end - 1 + 15, SpeechEdge.STOPPED, end - 1))
    assert events == expected
    assert not det.in_speech
    assert det.frames_seen == 200


def test_click_does_not_start_speech() -> None:
    x = make_signal([(20, 21)], 60, -10.0, -60.0)
    det = SpeechDetector(min_speech_ms=60)
    assert run(det, ulaw_frames(x)) == []
    x2 = make_signal([(20, 22)], 60, -10.0, -60.0)  # 40 ms is still too short
    assert run(SpeechDetector(min_speech_ms=60), ulaw_frames(x2)) == []


def test_short_gaps_do_not_split_an_utterance() -> None:
    # gaps of 140 ms and 280 ms (< 300 ms hangover) inside one utterance
    x = make_signal([(10, 30), (37, 50), (64, 80)], 120, -25.0, -60.0)
    events = run(SpeechDetector(), ulaw_frames(x))
    assert events == [(12, SpeechEdge.STARTED, 10), (79 + 15, SpeechEdge.STOPPED, 79)]


def test_gap_of_exactly_hangover_splits() -> None:
    x = make_signal([(10, 30), (45, 60)], 100, -25.0, None)  # 15 quiet frames = 300 ms
    events = run(SpeechDetector(), ulaw_frames(x))
    assert [e[1] for e in events] == [SpeechEdge.STARTED, SpeechEdge.STOPPED] * 2
    assert events[1] == (29 + 15, SpeechEdge.STOPPED, 29)
    assert events[2] == (47, SpeechEdge.STARTED, 45)


def test_state_attributes_and_reset() -> None:
    det = SpeechDetector(threshold_dbfs=-30.0, min_speech_ms=40, hangover_ms=100)
    assert (det.min_speech_frames, det.hangover_frames) == (2, 5)
    assert det.update(-20.0) is None and not det.in_speech
    assert det.update(-20.0) is SpeechEdge.STARTED and det.in_speech
    assert det.speech_started_at_frame == 0
    assert det.update(-30.0) is None  # at the threshold is not above it
    det.update(-10.0)
    assert det.last_voiced_frame == 3
    assert [det.update(-90.0) for _ in range(5)][-1] is SpeechEdge.STOPPED
    assert det.speech_ended_at_frame == 3 and not det.in_speech
    det.reset()
    assert det.frames_seen == 0 and not det.in_speech
    assert det.speech_started_at_frame is None and det.last_voiced_frame is None
    assert det.update(-20.0) is None
    assert det.update(-20.0) is SpeechEdge.STARTED and det.speech_started_at_frame == 0


def test_started_resets_after_an_interrupted_run() -> None:
    det = SpeechDetector(min_speech_ms=60)
    seq = [-20, -20, -90, -20, -20, -20]
    edges = [det.update(e) for e in seq]
    assert edges == [None, None, None, None, None, SpeechEdge.STARTED]
    assert det.speech_started_at_frame == 3


def test_ms_rounding_up() -> None:
    det = SpeechDetector(min_speech_ms=50, hangover_ms=0, frame_ms=20)
    assert det.min_speech_frames == 3 and det.hangover_frames == 1

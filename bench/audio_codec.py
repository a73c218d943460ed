"""Per-frame cost of the live audio path, plus resampler delay and SNR.

Run: .venv/bin/python bench/audio_codec.py [--frames N]
Times one 20 ms frame per call (160 mu-law bytes / 160 samples at 8 kHz / 320 samples or
640 bytes at 16 kHz) with time.perf_counter_ns and prints median and p99 in microseconds.
"""

from __future__ import annotations

import argparse
import binascii
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from voxd.audio.framing import FrameCutter
from voxd.audio.g711 import (
    pcm16_to_ulaw,
    ulaw_decode,
    ulaw_encode,
    ulaw_to_pcm16,
)
from voxd.audio.resample import DELAY_SECONDS, TAPS, Downsampler2x, Upsampler2x
from voxd.audio.transcode import InboundTranscoder, OutboundTranscoder
from voxd.audio.vad import frame_energy_dbfs_pcm16, frame_energy_dbfs_ulaw


def timeit(fn: Callable[[], object], frames: int) -> tuple[float, float]:
    """Median and p99 of one call of fn, in microseconds."""
    for _ in range(min(1000, frames)):  # warm up caches and work buffers
        fn()
    samples = np.empty(frames, dtype=np.int64)
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(frames):
            t0 = clock()
            fn()
            samples[i] = clock() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
    overhead = min(_clock_overhead(), int(samples.min()))
    us = (samples - overhead) / 1000.0
    return float(np.median(us)), float(np.percentile(us, 99))


def _clock_overhead() -> int:
    """Minimum cost of back-to-back perf_counter_ns calls (subtracted from every sample)."""
    clock = time.perf_counter_ns
    best = 1 << 60
    for _ in range(2000):
        t0 = clock()
        best = min(best, clock() - t0)
    return best


def sweep(fs: int, seconds: float = 3.0, shift: float = 0.0) -> np.ndarray:
    """Analytic linear sweep 100 -> 3400 Hz at half full scale."""
    t = np.arange(round(seconds * fs)) / fs - shift
    rate = (3400.0 - 100.0) / seconds
    return 16384.0 * np.sin(2 * np.pi * (100.0 * t + 0.5 * rate * t * t))


def snr_db(y: np.ndarray, fs: int, delay: float) -> float:
    """SNR of y vs the ideal sweep delayed by delay (10 ms + delay excluded at each end)."""
    ref = sweep(fs, shift=delay)[: len(y)]
    edge = int(0.010 * fs) + int(np.ceil(delay * fs))
    ref, got = ref[edge:-edge], y[edge:-edge].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))


def measured_delay(y: np.ndarray, fs: int) -> float:
    """Shift of the analytic sweep that best fits y, to 1 us."""
    coarse = np.arange(0.0, 0.006, 1.0 / (4 * fs))
    d0 = max(coarse, key=lambda d: snr_db(y, fs, d))
    fine = np.arange(d0 - 1.0 / (4 * fs), d0 + 1.0 / (4 * fs), 1e-6)
    return float(max(fine, key=lambda d: snr_db(y, fs, d)))


def chunked(proc: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
    """Run x through proc in chunks of size samples."""
    return np.concatenate([proc(x[i : i + size]) for i in range(0, len(x), size)])


def inner_loop_variants(frames: int) -> None:
    """Time alternative FIR inner loops for one 160-output chunk of the 32-tap branch."""
    from numpy.lib.stride_tricks import as_strided, sliding_window_view

    from voxd.audio.resample import _BRANCH_UP as taps

    k, n = taps.shape[0], 160
    rng = np.random.default_rng(1)
    buf = (rng.standard_normal(n + k - 1) * 8000).astype(np.float32)
    window = as_strided(buf, (n, k), (buf.itemsize, buf.itemsize))  # built once
    half = k // 2
    first = as_strided(buf, (n, half), (buf.itemsize, buf.itemsize))
    second = as_strided(buf[k - 1 :], (n, half), (buf.itemsize, -buf.itemsize))
    taps_half = np.ascontiguousarray(taps[:half])
    toeplitz = np.zeros((n, n + k - 1), np.float32)
    for i in range(n):
        toeplitz[i, i : i + k] = taps
    variants: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("np.correlate(buf, taps, 'valid')  [used]", lambda: np.correlate(buf, taps, "valid")),
        ("np.convolve(buf, taps, 'valid')", lambda: np.convolve(buf, taps[::-1], "valid")),
        ("prebuilt strided window @ taps", lambda: window @ taps),
        ("sliding_window_view(buf, k) @ taps", lambda: sliding_window_view(buf, k) @ taps),
        ("np.ascontiguousarray(window) @ taps", lambda: np.ascontiguousarray(window) @ taps),
        ("folded symmetric (w1 + w2) @ taps/2", lambda: (first + second) @ taps_half),
        ("banded Toeplitz matrix @ buf", lambda: toeplitz @ buf),
        ("(window * taps).sum(axis=1)", lambda: (window * taps).sum(axis=1)),
    ]
    reference = np.array([np.dot(buf[i : i + k].astype(np.float64), taps) for i in range(n)])
    print()
    print(f"FIR inner loop alternatives, {n} outputs x {k} taps (float32)")
    print(f"{'variant':<42} {'median':>8} {'p99':>8} {'max err':>8}")
    print("-" * 69)
    for name, fn in variants:
        med, p99 = timeit(fn, frames)
        err = float(np.max(np.abs(fn() - reference)))
        print(f"{name:<42} {med:8.2f} {p99:8.2f} {err:8.4f}")


def main() -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=20000)
    frames = parser.parse_args().frames

    rng = np.random.default_rng(0)
    pcm8 = (rng.standard_normal(160) * 3000).clip(-32768, 32767).astype(np.int16)
    ulaw_frame = ulaw_encode(pcm8).tobytes()
    ulaw_arr = np.frombuffer(ulaw_frame, np.uint8)
    pcm8_bytes = pcm8.astype("<i2").tobytes()
    pcm16 = (rng.standard_normal(320) * 3000).clip(-32768, 32767).astype("<i2")
    pcm16_bytes = pcm16.tobytes()
    x8 = pcm8.astype(np.float32)
    x16 = pcm16.astype(np.float32)
    b64 = binascii.b2a_base64(ulaw_frame, newline=False)

    up, down = Upsampler2x(), Downsampler2x()
    inbound, outbound = InboundTranscoder(), OutboundTranscoder()
    cutter = FrameCutter(160)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("g711 decode   ulaw_decode(uint8[160])", lambda: ulaw_decode(ulaw_arr)),
        ("g711 encode   ulaw_encode(int16[160])", lambda: ulaw_encode(pcm8)),
        ("g711 decode   ulaw_to_pcm16(160 B)", lambda: ulaw_to_pcm16(ulaw_frame)),
        ("g711 encode   pcm16_to_ulaw(320 B)", lambda: pcm16_to_ulaw(pcm8_bytes)),
        ("Upsampler2x.process(f32[160])", lambda: up.process(x8)),
        ("Downsampler2x.process(f32[320])", lambda: down.process(x16)),
        ("InboundTranscoder.process(160 B)", lambda: inbound.process(ulaw_frame)),
        ("OutboundTranscoder.process(640 B)", lambda: outbound.process(pcm16_bytes)),
        ("FrameCutter.push(160 B)", lambda: cutter.push(ulaw_frame)),
        ("frame_energy_dbfs_ulaw(160 B)", lambda: frame_energy_dbfs_ulaw(ulaw_frame)),
        ("frame_energy_dbfs_pcm16(640 B)", lambda: frame_energy_dbfs_pcm16(pcm16_bytes)),
        ("base64 encode 160 B (binascii)", lambda: binascii.b2a_base64(ulaw_frame, newline=False)),
        ("base64 decode 160 B (binascii)", lambda: binascii.a2b_base64(b64)),
    ]

    print(f"{frames} frames of 20 ms each, times in microseconds per frame")
    print(f"{'operation':<42} {'median':>8} {'p99':>8}")
    print("-" * 60)
    for name, fn in cases:
        med, p99 = timeit(fn, frames)
        print(f"{name:<42} {med:8.2f} {p99:8.2f}")

    inner_loop_variants(min(frames, 5000))

    up_out = chunked(Upsampler2x().process, sweep(8000).astype(np.float32), 160)
    down_out = chunked(Downsampler2x().process, sweep(16000).astype(np.float32), 320)
    print()
    print(f"resampler: {TAPS}-tap half-band, nominal delay {DELAY_SECONDS * 1e3:.4f} ms")
    print(f"{'direction':<42} {'delay ms':>8} {'SNR dB':>8}")
    print("-" * 60)
    for name, y, fs in (
        ("Upsampler2x 8k->16k", up_out, 16000),
        ("Downsampler2x 16k->8k", down_out, 8000),
    ):
        label = name + " (sweep 100-3400 Hz)"
        delay_ms = measured_delay(y, fs) * 1e3
        print(f"{label:<42} {delay_ms:8.4f} {snr_db(y, fs, DELAY_SECONDS):8.2f}")


if __name__ == "__main__":
    main()

"""Synthetic caller audio and the checks that compare what was said with what was heard."""

from __future__ import annotations

import numpy as np

RATE = 8000


def burst(seconds: float, seed: int = 1, level: float = 0.3) -> np.ndarray:
    """Speech-like test signal: band-limited noise with a syllable-rate envelope (int16)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    noise = rng.standard_normal(n + 64)
    kernel = np.hanning(9)  # soft low-pass so most energy sits in the telephone band
    shaped = np.convolve(noise, kernel / kernel.sum(), mode="same")[:n]
    t = np.arange(n) / RATE
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    x = shaped / np.max(np.abs(shaped)) * envelope * level
    return np.round(x * 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


def best_alignment(reference: np.ndarray, heard: np.ndarray) -> tuple[int, float]:
    """(lag in samples, normalised correlation) of `reference` inside `heard`."""
    ref = reference.astype(np.float64)
    sig = heard.astype(np.float64)
    corr = np.correlate(sig, ref, mode="valid")
    energy = np.sqrt(np.convolve(sig**2, np.ones(len(ref)), mode="valid") * np.sum(ref**2))
    score = np.divide(corr, energy, out=np.zeros_like(corr), where=energy > 0)
    lag = int(np.argmax(score))
    return lag, float(score[lag])


def snr_db(reference: np.ndarray, heard: np.ndarray) -> float:
    """SNR of `heard` against `reference` after least-squares gain matching."""
    ref = reference.astype(np.float64)
    sig = heard.astype(np.float64)
    gain = np.dot(sig, ref) / np.dot(ref, ref)
    noise = sig - gain * ref
    return float(10 * np.log10(np.sum((gain * ref) ** 2) / max(np.sum(noise**2), 1e-9)))

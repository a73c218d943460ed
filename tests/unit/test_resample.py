"""Streaming 2x resamplers: delay, fidelity, aliasing, chunking invariance, lengths, reset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxd.audio.resample import DELAY_SECONDS, FILTER, TAPS, Downsampler2x, Upsampler2x

SWEEP_SECONDS = 3.0
SWEEP_F0, SWEEP_F1 = 100.0, 3400.0
AMPLITUDE = 16384.0  # half of full scale
EDGE_SECONDS = 0.010  # transient excluded at both ends


def sweep(fs: int, shift: float = 0.0, seconds: float = SWEEP_SECONDS) -> np.ndarray:
    """Analytic linear sweep 100 -> 3400 Hz sampled at fs, delayed by shift seconds."""
    t = np.arange(round(seconds * fs)) / fs - shift
    rate = (SWEEP_F1 - SWEEP_F0) / seconds
    return AMPLITUDE * np.sin(2 * np.pi * (SWEEP_F0 * t + 0.5 * rate * t * t))


def run_chunked(
    resampler: Upsampler2x | Downsampler2x, x: np.ndarray, sizes: list[int]
) -> np.ndarray:
    """Feed x through resampler in chunks cycling through sizes; concatenate the outputs."""
    out, i = [], 0
    for size in itertools.cycle(sizes):
        if i >= len(x):
            break
        out.append(resampler.process(x[i : i + size]))
        i += size
    return np.concatenate(out)


def snr_db(y: np.ndarray, fs: int, delay: float) -> float:
    """SNR of y against the ideal sweep at fs delayed by delay, edges excluded."""
    ref = sweep(fs, shift=delay)[: len(y)]
    edge = int(EDGE_SECONDS * fs) + int(np.ceil(delay * fs))
    ref, got = ref[edge:-edge], y[edge:-edge].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))


def best_delay(y: np.ndarray, fs: int) -> float:
    """Measure the delay: the shift of the analytic sweep that fits y best (1 us resolution)."""
    coarse = np.arange(0.0, 0.006, 1.0 / (4 * fs))
    d0 = max(coarse, key=lambda d: snr_db(y, fs, d))
    fine = np.arange(d0 - 1.0 / (4 * fs), d0 + 1.0 / (4 * fs), 1e-6)
    return float(max(fine, key=lambda d: snr_db(y, fs, d)))


@pytest.fixture(scope="module")
def up_out() -> np.ndarray:
    return run_chunked(Upsampler2x(), sweep(8000).astype(np.float32), [160])


@pytest.fixture(scope="module")
def down_out() -> np.ndarray:
    return run_chunked(Downsampler2x(), sweep(16000).astype(np.float32), [320])


# --- filter ---


def test_filter_is_a_linear_phase_half_band() -> None:
    assert len(FILTER) == TAPS and TAPS % 4 == 3 and 55 <= TAPS <= 71
    c = (TAPS - 1) // 2
    np.testing.assert_array_equal(FILTER, FILTER[::-1])
    assert FILTER[c] == 0.5
    assert np.all(FILTER[1::2][np.arange(TAPS // 2) != c // 2] == 0)
    assert abs(FILTER.sum() - 1.0) < 1e-12


def test_delay_constant_is_within_budget() -> None:
    assert 0 < DELAY_SECONDS <= 0.003
    assert Upsampler2x.delay_seconds == Downsampler2x.delay_seconds == DELAY_SECONDS


# --- delay, measured ---


def test_upsampler_impulse_response_peaks_at_the_delay() -> None:
    x = np.zeros(80, np.float32)
    x[10] = 1000.0
    y = Upsampler2x().process(x)
    t = np.arange(len(y))
    lag = (t * y).sum() / y.sum() - 2 * 10  # centroid = group delay of a symmetric response
    assert int(np.argmax(y)) - 20 == pytest.approx(DELAY_SECONDS * 16000)
    assert lag == pytest.approx(DELAY_SECONDS * 16000, abs=1e-3)


@pytest.mark.parametrize("phase", [0, 1])
def test_downsampler_impulse_response_centroid_is_the_delay(phase: int) -> None:
    x = np.zeros(200, np.float32)
    x[40 + phase] = 1000.0
    y = Downsampler2x().process(x).astype(np.float64)
    centroid = (np.arange(len(y)) * y).sum() / y.sum()  # in 8 kHz samples
    assert (centroid - (40 + phase) / 2) / 8000 == pytest.approx(DELAY_SECONDS, abs=1e-6)


def test_upsampler_measured_sweep_delay(up_out: np.ndarray) -> None:
    measured = best_delay(up_out, 16000)
    assert measured <= 0.003
    assert measured == pytest.approx(DELAY_SECONDS, abs=5e-6)


def test_downsampler_measured_sweep_delay(down_out: np.ndarray) -> None:
    measured = best_delay(down_out, 8000)
    assert measured <= 0.003
    assert measured == pytest.approx(DELAY_SECONDS, abs=5e-6)


# --- fidelity ---


def test_upsampler_sweep_snr(up_out: np.ndarray) -> None:
    assert len(up_out) == 2 * int(SWEEP_SECONDS * 8000)
    assert up_out.dtype == np.float32
    assert snr_db(up_out, 16000, DELAY_SECONDS) >= 60.0
    # the delay matters: one 16 kHz sample off ruins the match
    assert snr_db(up_out, 16000, DELAY_SECONDS + 1 / 16000) < 30.0


def test_downsampler_sweep_snr(down_out: np.ndarray) -> None:
    assert len(down_out) == int(SWEEP_SECONDS * 8000)
    assert down_out.dtype == np.float32
    assert snr_db(down_out, 8000, DELAY_SECONDS) >= 60.0
    assert snr_db(down_out, 8000, DELAY_SECONDS + 1 / 8000) < 30.0


def tone_level_db(y: np.ndarray, fs: int, f: float) -> float:
    """Level of the f Hz component of y relative to AMPLITUDE (projection on sin/cos)."""
    t = np.arange(len(y)) / fs
    c = 2 * np.mean(y * np.cos(2 * np.pi * f * t))
    s = 2 * np.mean(y * np.sin(2 * np.pi * f * t))
    return float(20 * np.log10(np.hypot(c, s) / AMPLITUDE + 1e-300))


def tone(f: float, fs: int, seconds: float = 1.0) -> np.ndarray:
    """float32 sine of AMPLITUDE at f Hz sampled at fs."""
    t = np.arange(round(seconds * fs)) / fs
    return (AMPLITUDE * np.sin(2 * np.pi * f * t)).astype(np.float32)


def steady(y: np.ndarray, fs: int) -> np.ndarray:
    """Drop the first 50 ms (start-up transient) and keep a whole number of 100 ms."""
    y = y[fs // 20 :]
    return y[: len(y) - len(y) % (fs // 10)].astype(np.float64)


@pytest.mark.parametrize("f", [4600.0, 5000.0, 6000.0, 7000.0, 7900.0])
def test_downsampler_rejects_aliases(f: float) -> None:
    y = steady(Downsampler2x().process(tone(f, 16000)), 8000)
    rms_db = 20 * np.log10(np.sqrt(np.mean(y**2)) / (AMPLITUDE / np.sqrt(2)) + 1e-300)
    assert rms_db <= -65.0
    assert tone_level_db(y, 8000, 8000 - f) <= -65.0  # where the alias would land


@pytest.mark.parametrize("f", [3800.0, 3900.0])
def test_downsampler_transition_band_is_attenuated(f: float) -> None:
    y = steady(Downsampler2x().process(tone(f, 16000)), 8000)
    assert tone_level_db(y, 8000, 8000 - f) <= -1.0  # half-band: -6 dB at 4 kHz


@pytest.mark.parametrize("f", [300.0, 1000.0, 3000.0, 3400.0])
def test_upsampler_rejects_images(f: float) -> None:
    y = steady(Upsampler2x().process(tone(f, 8000)), 16000)
    assert tone_level_db(y, 16000, f) == pytest.approx(0.0, abs=0.01)
    assert tone_level_db(y, 16000, 8000 - f) <= -65.0


def test_no_clipping_inside() -> None:
    square = np.tile(np.r_[np.full(8, 32767.0), np.full(8, -32768.0)], 40).astype(np.float32)
    assert Upsampler2x().process(square).max() > 32767.0
    square16 = np.repeat(square, 2)
    assert Downsampler2x().process(square16).max() > 32767.0


# --- chunking ---

IRREGULAR = [1, 7, 160, 333]


def test_upsampler_chunking_is_bit_identical() -> None:
    x = sweep(8000, seconds=1.0).astype(np.float32)
    whole = Upsampler2x().process(x)
    np.testing.assert_array_equal(run_chunked(Upsampler2x(), x, [160]), whole)
    np.testing.assert_array_equal(run_chunked(Upsampler2x(), x, IRREGULAR), whole)
    np.testing.assert_array_equal(run_chunked(Upsampler2x(), x, [1]), whole)


def test_downsampler_chunking_is_bit_identical() -> None:
    x = sweep(16000, seconds=1.0).astype(np.float32)
    whole = Downsampler2x().process(x)
    np.testing.assert_array_equal(run_chunked(Downsampler2x(), x, [320]), whole)
    np.testing.assert_array_equal(run_chunked(Downsampler2x(), x, IRREGULAR), whole)
    np.testing.assert_array_equal(run_chunked(Downsampler2x(), x, [1]), whole)
    np.testing.assert_array_equal(run_chunked(Downsampler2x(), x, [3, 0, 5]), whole)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=12).filter(any),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_chunkings_are_bit_identical(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(1601) * 8000).astype(np.float32)
    np.testing.assert_array_equal(run_chunked(Upsampler2x(), x, sizes), Upsampler2x().process(x))
    np.testing.assert_array_equal(
        run_chunked(Downsampler2x(), x, sizes), Downsampler2x().process(x)
    )


# --- lengths ---


def test_upsampler_output_length_is_always_double() -> None:
    up = Upsampler2x()
    for n in [160] * 5 + [0, 1, 2, 7, 31, 32, 333, 160]:
        y = up.process(np.ones(n, np.float32))
        assert y.shape == (2 * n,) and y.dtype == np.float32


def test_downsampler_output_length_and_carry() -> None:
    down = Downsampler2x()
    for _ in range(5):
        assert down.process(np.ones(320, np.float32)).shape == (160,)
        assert down.carried == 0
    carried = 0
    for n in [1, 1, 0, 3, 7, 160, 333, 320, 2, 1, 1]:
        y = down.process(np.ones(n, np.float32))
        assert y.shape == ((carried + n) // 2,) and y.dtype == np.float32
        carried = (carried + n) % 2
        assert down.carried == carried


def test_accepts_int16_and_float64_input() -> None:
    x = sweep(8000, seconds=0.1).astype(np.int16)
    for cls in (Upsampler2x, Downsampler2x):
        expected = cls().process(x.astype(np.float32))
        np.testing.assert_array_equal(cls().process(x), expected)
        np.testing.assert_array_equal(cls().process(x.astype(np.float64)), expected)
        np.testing.assert_array_equal(cls().process(x.tolist()), expected)


def test_rejects_non_1d_input() -> None:
    for cls in (Upsampler2x, Downsampler2x):
        with pytest.raises(ValueError):
            cls().process(np.zeros((2, 160), np.float32))


# --- reset ---


def test_reset_restores_initial_state() -> None:
    rng = np.random.default_rng(7)
    junk = (rng.standard_normal(333) * 10000).astype(np.float32)
    x = sweep(16000, seconds=0.2).astype(np.float32)
    for cls in (Upsampler2x, Downsampler2x):
        fresh = cls().process(x)
        used = cls()
        used.process(junk)  # odd length: the downsampler now carries a sample
        assert not np.array_equal(used.process(x), fresh)
        used.process(junk)
        used.reset()
        np.testing.assert_array_equal(used.process(x), fresh)

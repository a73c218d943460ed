"""The streaming rational resampler (voxd.audio.rational): fidelity after up+down, delay,
rejection above the lower Nyquist, steady output, chunking invariance, bytes, reset."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxd.audio.convert import AudioConverter
from voxd.audio.rational import RationalResampler

SECONDS = 3.0
F0, F1 = 300.0, 3400.0
AMPLITUDE = 16384.0  # half of full scale
EDGE_SECONDS = 0.010


def sweep(fs: int, shift: float = 0.0, seconds: float = SECONDS) -> np.ndarray:
    """Analytic linear sweep 300 -> 3400 Hz sampled at fs, delayed by shift seconds."""
    t = np.arange(round(seconds * fs)) / fs - shift
    rate = (F1 - F0) / seconds
    return AMPLITUDE * np.sin(2 * np.pi * (F0 * t + 0.5 * rate * t * t))


def snr_db(y: np.ndarray, fs: int, delay: float) -> float:
    """SNR of y against the ideal sweep delayed by `delay`, edges excluded."""
    ref = sweep(fs, shift=delay)[: len(y)]
    edge = int(EDGE_SECONDS * fs) + int(np.ceil(delay * fs))
    ref, got = ref[edge:-edge], y[edge:-edge].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))


def chunked(resampler: RationalResampler, x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([resampler.process(x[i : i + size]) for i in range(0, len(x), size)])


@pytest.mark.parametrize(("rate", "other", "min_db"), [
    (16000, 24000, 88.5),  # OpenAI's pcm16 path (the copy it replaces: 86.0 dB)
    (16000, 22050, 87.5),  # ElevenLabs' agent formats (the copy it replaces: 87.6 dB,
    (16000, 44100, 88.0),  # 87.1 dB, 88.9 dB)
    (16000, 48000, 89.0),
])
def test_a_sweep_survives_up_and_down_in_20ms_frames(rate, other, min_db):
    x = np.round(sweep(rate)).astype(np.int16)
    up, down = RationalResampler(rate, other), RationalResampler(other, rate)
    y = chunked(down, chunked(up, x, rate // 50), other // 50)
    assert len(y) == len(x)
    assert snr_db(y, rate, up.delay_seconds + down.delay_seconds) > min_db


@pytest.mark.parametrize(("source", "target"), [
    (16000, 24000), (24000, 16000), (16000, 22050), (22050, 16000), (48000, 16000),
    (44100, 16000), (16000, 48000)])
def test_one_way_is_within_int16_rounding_of_the_ideal(source, target):
    x = np.round(sweep(source)).astype(np.int16)
    resampler = RationalResampler(source, target)
    y = chunked(resampler, x, source // 50)
    # the input's and the output's int16 rounding dominate; the filter's error is below them
    assert snr_db(y, target, resampler.delay_seconds) > 89.0


@pytest.mark.parametrize(("source", "target"), [(24000, 16000), (48000, 16000),
                                                (44100, 16000), (22050, 8000)])
def test_what_the_lower_rate_cannot_carry_is_removed(source, target):
    t = np.arange(source) / source
    hz = 0.5 * target + 1500.0
    x = np.round(8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    y = RationalResampler(source, target).process(x)[target // 50 :]
    assert np.max(np.abs(y)) <= 1  # below int16 rounding


@pytest.mark.parametrize(("source", "target"), [(16000, 24000), (24000, 16000), (24000, 8000),
                                                (22050, 16000), (8000, 24000),
                                                (44100, 16000), (16000, 48000)])
def test_steady_20ms_frames_give_steady_20ms_at_once(source, target):
    """Nothing is held back: T inputs give ceil(T * target / source) outputs in total."""
    x = np.round(sweep(source, seconds=0.5)).astype(np.int16)
    resampler = RationalResampler(source, target)
    step = source // 50
    outs = [resampler.process(x[i : i + step]) for i in range(0, len(x), step)]
    assert {len(o) for o in outs} <= {target // 50, target // 50 + 1}
    assert sum(len(o) for o in outs) == -(-len(x) * target // source)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=12),
       pair=st.sampled_from([(16000, 24000), (24000, 16000), (22050, 16000), (8000, 44100),
                             (48000, 8000)]))
def test_streamed_output_is_bit_identical_to_one_shot(sizes, pair):
    x = np.round(sweep(pair[0], seconds=0.3)).astype(np.int16)
    streamed, i, k = [], 0, 0
    resampler = RationalResampler(*pair)
    while i < len(x):
        size = sizes[k % len(sizes)]
        streamed.append(resampler.process(x[i : i + size]))
        i, k = i + size, k + 1
    whole = RationalResampler(*pair).process(x)
    assert np.array_equal(np.concatenate(streamed), whole)


def test_a_1000hz_tone_arrives_delayed_by_delay_seconds():
    rate_in, rate_out = 24000, 16000
    t = np.arange(rate_in) / rate_in
    x = np.round(8000 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.int16)
    resampler = RationalResampler(rate_in, rate_out)
    y = resampler.process(x)
    n = np.arange(len(y))
    reference = 8000 * np.sin(2 * np.pi * 1000.0 * (n / rate_out - resampler.delay_seconds))
    steady = slice(rate_out // 100, len(y) - rate_out // 100)
    noise = y[steady] - reference[steady]
    assert 10 * np.log10(np.sum(reference[steady] ** 2) / np.sum(noise**2)) > 80
    assert resampler.delay_seconds < 0.0015


def test_bytes_carry_an_odd_byte_and_reset_forgets():
    data = np.round(sweep(24000, seconds=0.1)).astype("<i2").tobytes()
    resampler = RationalResampler(24000, 16000)
    out = resampler.process_bytes(data[:101]) + resampler.process_bytes(data[101:])
    assert out == RationalResampler(24000, 16000).process_bytes(data)
    resampler.reset()
    assert resampler.process_bytes(data) == out
    assert resampler.process_bytes(b"") == b""
    assert resampler.process(np.empty(0, np.int16)).size == 0


def test_the_converter_uses_it_for_rates_other_than_8_and_16_khz():
    x = np.round(sweep(16000, seconds=0.2)).astype("<i2").tobytes()
    via = AudioConverter(("pcm", 16000), ("pcm", 24000))
    direct = RationalResampler(16000, 24000)
    assert via.process(x[:333]) + via.process(x[333:]) == direct.process_bytes(x)

"""Fused live-path transcoders: lengths, equivalence to the composed path, tone fidelity."""

from __future__ import annotations

import numpy as np

from voxd.audio.g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_decode, ulaw_encode
from voxd.audio.resample import DELAY_SECONDS, Downsampler2x, Upsampler2x
from voxd.audio.transcode import InboundTranscoder, OutboundTranscoder


def tone_pcm16(f: float, seconds: float, fs: int, amplitude: float = 16384.0) -> bytes:
    """A sine tone as s16le bytes."""
    t = np.arange(int(seconds * fs)) / fs
    return np.rint(amplitude * np.sin(2 * np.pi * f * t)).astype("<i2").tobytes()


def to_int16(y: np.ndarray) -> np.ndarray:
    """Round and clip to int16 the way the transcoders do."""
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_inbound_lengths() -> None:
    tr = InboundTranscoder()
    for _ in range(5):
        out = tr.process(bytes(range(160)))
        assert isinstance(out, bytes) and len(out) == 640
    for n in (0, 1, 7, 333, 160):
        assert len(tr.process(b"\x55" * n)) == 4 * n


def test_outbound_lengths() -> None:
    tr = OutboundTranscoder()
    for _ in range(5):
        out = tr.process(b"\x10\x20" * 320)
        assert isinstance(out, bytes) and len(out) == 160
        assert tr.carried_bytes == 0


def test_outbound_carries_odd_bytes_and_samples() -> None:
    tr = OutboundTranscoder()
    total = 0
    for n in (1, 1, 1, 1, 3, 5, 639, 641, 0, 2, 7, 1):
        out = tr.process(b"\x01" * n)
        before = total
        total += n
        assert len(out) == total // 4 - before // 4
        assert tr.carried_bytes == total % 4


def test_inbound_matches_composed_path() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    up = Upsampler2x()
    expected = to_int16(up.process(ulaw_decode(np.frombuffer(data, np.uint8)).astype(np.float32)))
    tr = InboundTranscoder()
    got = b"".join(tr.process(c) for c in chunks(data, 160))
    np.testing.assert_array_equal(np.frombuffer(got, "<i2"), expected)
    tr.reset()
    sizes = [1, 7, 160, 333]
    parts, i, k = [], 0, 0
    while i < len(data):
        parts.append(tr.process(data[i : i + sizes[k % 4]]))
        i += sizes[k % 4]
        k += 1
    np.testing.assert_array_equal(np.frombuffer(b"".join(parts), "<i2"), expected)


def test_inbound_clips_overshoot() -> None:
    # alternating max-amplitude codes overshoot when interpolated; output must saturate
    loud = bytes([0x80, 0x80, 0x80, 0x00, 0x00, 0x00] * 200)  # +32124 x3, -32124 x3
    pcm = np.frombuffer(InboundTranscoder().process(loud), "<i2")
    y = Upsampler2x().process(ulaw_decode(np.frombuffer(loud, np.uint8)).astype(np.float32))
    assert y.max() > 32767 and y.min() < -32768  # the filter itself overshoots
    assert pcm.max() == 32767 and pcm.min() == -32768


def test_outbound_matches_composed_path() -> None:
    rng = np.random.default_rng(4)
    samples = (rng.standard_normal(8001) * 12000).clip(-32768, 32767).astype("<i2")
    data = samples.tobytes()
    expected = ulaw_encode(to_int16(Downsampler2x().process(samples.astype(np.float32))))
    tr = OutboundTranscoder()
    got = b"".join(tr.process(c) for c in chunks(data, 640))
    np.testing.assert_array_equal(np.frombuffer(got, np.uint8), expected)
    tr.reset()
    got = b"".join(tr.process(c) for c in chunks(data, 333))  # odd: carries bytes
    np.testing.assert_array_equal(np.frombuffer(got, np.uint8), expected)


def test_silence_stays_silent() -> None:
    assert InboundTranscoder().process(bytes([ULAW_SILENCE]) * 160) == bytes(640)
    assert OutboundTranscoder().process(bytes(640)) == bytes([ULAW_SILENCE]) * 160


def test_tone_roundtrip_snr() -> None:
    f = 1000.0
    pcm = tone_pcm16(f, 1.0, 16000)
    out_tr, in_tr = OutboundTranscoder(), InboundTranscoder()
    ulaw = b"".join(out_tr.process(c) for c in chunks(pcm, 640))
    assert len(ulaw) == 8000
    back = b"".join(in_tr.process(c) for c in chunks(ulaw, 160))
    assert len(back) == len(pcm)
    y = np.frombuffer(back, "<i2").astype(np.float64)
    t = np.arange(len(y)) / 16000 - 2 * DELAY_SECONDS  # both directions delay
    ref = 16384.0 * np.sin(2 * np.pi * f * t)
    sl = slice(800, len(y) - 160)
    snr = 10 * np.log10(np.sum(ref[sl] ** 2) / np.sum((y[sl] - ref[sl]) ** 2))
    assert snr >= 30.0
    # and without the delay alignment the match is poor, so the delay is really there
    ref0 = 16384.0 * np.sin(2 * np.pi * f * (t + 2 * DELAY_SECONDS))
    assert 10 * np.log10(np.sum(ref0[sl] ** 2) / np.sum((y[sl] - ref0[sl]) ** 2)) < 10.0


def test_reset() -> None:
    data = tone_pcm16(440.0, 0.1, 16000)
    fresh = OutboundTranscoder().process(data)
    tr = OutboundTranscoder()
    tr.process(b"\x7f\x12\x34")  # leaves a carried byte and a carried sample
    tr.reset()
    assert tr.carried_bytes == 0
    assert tr.process(data) == fresh
    ulaw = pcm16_to_ulaw(data)
    fresh_in = InboundTranscoder().process(ulaw)
    tr_in = InboundTranscoder()
    tr_in.process(ulaw[::-1])
    tr_in.reset()
    assert tr_in.process(ulaw) == fresh_in


def test_outbound_clips_overshoot() -> None:
    square = np.tile(np.r_[np.full(4, 32767), np.full(4, -32768)], 200).astype("<i2")
    y = Downsampler2x().process(square.astype(np.float32))
    assert y.max() > 32767.5 and y.min() < -32768.5  # the filter itself overshoots
    got = np.frombuffer(OutboundTranscoder().process(square.tobytes()), np.uint8)
    np.testing.assert_array_equal(got, ulaw_encode(to_int16(y)))
    assert {0x00, 0x80} <= set(got.tolist())  # both full-scale codes occur (saturated)

"""G.711 mu-law tables vs the stdlib audioop module and a scalar reference written here."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

import numpy as np
import pytest

from voxd.audio.g711 import (
    DECODE_TABLE,
    ENCODE_TABLE,
    ULAW_SILENCE,
    pcm16_to_ulaw,
    ulaw_decode,
    ulaw_encode,
    ulaw_to_pcm16,
)

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def _audioop() -> ModuleType:
    """Import the deprecated stdlib audioop module, or skip the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            pytest.skip(f"audioop is not available on Python {sys.version_info[:2]}")


# --- independent scalar reference (ITU-T G.711 / Sun g711.c), deliberately unvectorised ---

_SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def ref_encode(sample: int) -> int:
    """Encode one 16-bit sample."""
    pcm = sample >> 2
    if pcm < 0:
        pcm = -pcm
        mask = 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + 0x21
    seg = 0
    while seg < 8 and pcm > _SEG_UEND[seg]:
        seg += 1
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask


def ref_decode(code: int) -> int:
    """Decode one mu-law code."""
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def test_tables_shape_and_dtype() -> None:
    assert DECODE_TABLE.shape == (256,) and DECODE_TABLE.dtype == np.int16
    assert ENCODE_TABLE.shape == (65536,) and ENCODE_TABLE.dtype == np.uint8


def test_encoder_matches_scalar_reference_for_all_inputs() -> None:
    expected = np.array([ref_encode(int(s)) for s in ALL_SAMPLES], dtype=np.uint8)
    got = ulaw_encode(ALL_SAMPLES)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{bad.size} mismatches, first at sample {ALL_SAMPLES[bad[:5]]}"


def test_decoder_matches_scalar_reference_for_all_codes() -> None:
    expected = np.array([ref_decode(c) for c in range(256)], dtype=np.int16)
    np.testing.assert_array_equal(ulaw_decode(ALL_CODES), expected)
    np.testing.assert_array_equal(DECODE_TABLE, expected)


def test_encoder_matches_audioop_for_all_inputs() -> None:
    audioop = _audioop()
    expected = np.frombuffer(audioop.lin2ulaw(ALL_SAMPLES.astype("<i2").tobytes(), 2), np.uint8)
    got = ulaw_encode(ALL_SAMPLES)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, f"{bad.size} mismatches, first at sample {ALL_SAMPLES[bad[:5]]}"


def test_decoder_matches_audioop_for_all_codes() -> None:
    audioop = _audioop()
    expected = np.frombuffer(audioop.ulaw2lin(bytes(range(256)), 2), "<i2")
    np.testing.assert_array_equal(ulaw_decode(ALL_CODES), expected)


def test_biased_0x84_variant_differs() -> None:
    """Guard against the common "bias 0x84, clip 32635" encoder, which is off on ~381 inputs."""

    def variant(sample: int) -> int:
        mask = 0x7F if sample < 0 else 0xFF
        mag = min(-sample if sample < 0 else sample, 32635) + 0x84
        exp = max(0, mag.bit_length() - 8)
        return ((exp << 4) | ((mag >> (exp + 3)) & 0xF)) ^ mask

    other = np.array([variant(int(s)) for s in ALL_SAMPLES], dtype=np.uint8)
    assert np.count_nonzero(other != ENCODE_TABLE.take(ALL_SAMPLES.view(np.uint16))) == 381


def test_roundtrip_is_idempotent_for_all_codes() -> None:
    decoded = ulaw_decode(ALL_CODES)
    np.testing.assert_array_equal(ulaw_decode(ulaw_encode(decoded)), decoded)


def test_reencoding_a_decoded_code_gives_the_code_back() -> None:
    # every code except 0x7F ("negative zero", decodes to 0 like 0xFF) is a fixed point
    codes = ALL_CODES[ALL_CODES != 0x7F]
    np.testing.assert_array_equal(ulaw_encode(ulaw_decode(codes)), codes)
    assert ulaw_encode(ulaw_decode(np.array([0x7F], np.uint8)))[0] == 0xFF


def test_encoder_is_monotonic_with_bounded_error() -> None:
    decoded = ulaw_decode(ulaw_encode(ALL_SAMPLES)).astype(np.int32)
    assert np.all(np.diff(decoded) >= 0)
    err = np.abs(decoded - ALL_SAMPLES.astype(np.int32))
    inside = np.abs(ALL_SAMPLES.astype(np.int32)) <= int(DECODE_TABLE.max())
    assert err[inside].max() <= 512 + 3  # half the widest step (1024) + the >>2 truncation
    assert err.max() <= 644  # beyond +-32124 the encoder saturates


def test_silence_code() -> None:
    assert ULAW_SILENCE == 0xFF
    assert DECODE_TABLE[ULAW_SILENCE] == 0
    assert ulaw_encode(np.zeros(3, np.int16)).tolist() == [ULAW_SILENCE] * 3


def test_bytes_helpers_length_and_endianness() -> None:
    codes = bytes(range(256))
    pcm = ulaw_to_pcm16(codes)
    assert isinstance(pcm, bytes) and len(pcm) == 512
    for c in (0x00, 0x0F, 0x80, 0xC3, 0xFF):
        value = int(DECODE_TABLE[c])
        assert pcm[2 * c : 2 * c + 2] == value.to_bytes(2, "little", signed=True)
    # explicit little-endian bytes: 0x0100 = 256 and 0xFF80 = -128
    samples = (256).to_bytes(2, "little", signed=True) + (-128).to_bytes(2, "little", signed=True)
    assert pcm16_to_ulaw(samples) == bytes([ref_encode(256), ref_encode(-128)])
    back = pcm16_to_ulaw(pcm)
    assert isinstance(back, bytes) and len(back) == 256
    assert ulaw_to_pcm16(back) == pcm
    assert ulaw_to_pcm16(b"") == b"" and pcm16_to_ulaw(b"") == b""


def test_pcm16_to_ulaw_rejects_odd_length() -> None:
    with pytest.raises(ValueError):
        pcm16_to_ulaw(b"\x00\x01\x02")


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError):
        DECODE_TABLE[0] = 1
    with pytest.raises(ValueError):
        ENCODE_TABLE[0] = 1

"""G.711 mu-law codec (ITU-T G.711, as in Sun's g711.c / CPython's audioop).

Both directions are plain table lookups: decoding indexes a 256-entry int16 table by the
code, encoding indexes a 65536-entry uint8 table by the 16-bit sample viewed as uint16.
The tables are built once at import, vectorised with numpy, from the reference algorithm.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "DECODE_TABLE",
    "DECODE_TABLE_F32",
    "ENCODE_TABLE",
    "ULAW_SILENCE",
    "pcm16_to_ulaw",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_to_pcm16",
]

ULAW_SILENCE: int = 0xFF
"""The mu-law code that encodes a zero sample (0x7F also decodes to 0: "negative zero")."""

_BIAS = 0x84  # bias in 16-bit units; 0x21 (= _BIAS >> 2) in the 14-bit domain
_CLIP = 8159  # largest 14-bit magnitude before the bias is added
_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def _build_decode_table() -> npt.NDArray[np.int16]:
    """Decode every code 0..255 with the reference expansion (vectorised)."""
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    lin = np.where(u & 0x80, _BIAS - t, t - _BIAS)
    return lin.astype("<i2")


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """Encode every 16-bit sample (indexed by its uint16 bit pattern) with the reference rule."""
    v = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    v >>= 2  # 16-bit -> 14-bit, arithmetic shift (floors negative values like C does)
    neg = v < 0
    mag = np.where(neg, -v, v)
    mask = np.where(neg, 0x7F, 0xFF)
    mag = np.minimum(mag, _CLIP) + (_BIAS >> 2)
    seg = np.searchsorted(_SEG_END, mag, side="left")  # first seg with mag <= _SEG_END[seg]
    code = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)  # unreachable after clipping; kept for fidelity
    return (code ^ mask).astype(np.uint8)


DECODE_TABLE: npt.NDArray[np.int16] = _build_decode_table()
DECODE_TABLE.flags.writeable = False
ENCODE_TABLE: npt.NDArray[np.uint8] = _build_encode_table()
ENCODE_TABLE.flags.writeable = False
DECODE_TABLE_F32: npt.NDArray[np.float32] = DECODE_TABLE.astype(np.float32)
"""DECODE_TABLE as float32, for paths that filter the decoded signal."""
DECODE_TABLE_F32.flags.writeable = False


def ulaw_decode(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    """Decode an array of mu-law codes to int16 samples."""
    return DECODE_TABLE.take(codes)


def ulaw_encode(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    """Encode an array of int16 samples to mu-law codes."""
    return ENCODE_TABLE.take(np.asarray(samples, dtype=np.int16).view(np.uint16))


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode mu-law bytes to s16le PCM bytes (twice as long)."""
    return DECODE_TABLE.take(np.frombuffer(data, dtype=np.uint8)).tobytes()


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode s16le PCM bytes (even length) to mu-law bytes (half as long)."""
    if len(data) & 1:
        raise ValueError(f"s16le data must have an even length, got {len(data)} bytes")
    return ENCODE_TABLE.take(np.frombuffer(data, dtype="<u2")).tobytes()

"""Fused per-frame transcoders for the live call path.

Inbound:  G.711 mu-law 8 kHz bytes -> s16le 16 kHz bytes (Twilio -> assistant).
Outbound: s16le 16 kHz bytes -> G.711 mu-law 8 kHz bytes (assistant -> Twilio).

They give exactly what composing voxd.audio.g711 with voxd.audio.resample (plus np.rint and
clipping to int16) gives, with fewer numpy calls: mu-law codes are decoded straight into the
filter's float32 work buffer; the upsampler's pure-delay branch is copied as exact integers
without rounding or clipping; the inbound output buffer is reused; outbound clipping and
mu-law encoding are one lookup in a 128 KiB table indexed by the rounded filter output.
Each direction adds resample.DELAY_SECONDS (1.9375 ms) of delay.
"""

from __future__ import annotations

import numpy as np

from voxd.audio.g711 import DECODE_TABLE_F32, ENCODE_TABLE
from voxd.audio.resample import _BRANCH_UP, DELAY_SECONDS, FILTER, Downsampler2x, Upsampler2x

__all__ = ["DELAY_SECONDS", "InboundTranscoder", "OutboundTranscoder"]

# dtype objects passed positionally: keyword arguments cost ~0.1 us per numpy call
_U8 = np.dtype(np.uint8)
_S16LE = np.dtype("<i2")
_I16_MIN = np.float32(-32768.0)
_I16_MAX = np.float32(32767.0)


def _build_encode_wrap_table() -> np.ndarray:
    """mu-law code for every integer v in [-65536, 65536), stored at index v mod 131072.

    Clipping to int16 is built in, so the outbound path can index it with the rounded filter
    output (mode="wrap" maps negative indices) instead of clipping and casting to int16.
    """
    v = np.arange(-65536, 65536)
    table = np.empty(131072, dtype=np.uint8)
    table[v % 131072] = ENCODE_TABLE.take(np.clip(v, -32768, 32767).astype(np.int16).view("u2"))
    return table


_ENCODE_WRAP = _build_encode_wrap_table()
# The wrap table is only valid while the decimator output cannot leave [-65536, 65536):
# int16 input bounds it by 32768 * sum(|h|).
if 32768.0 * float(np.abs(FILTER).sum()) >= 65535.0:
    raise RuntimeError("resample FILTER gain too high for the outbound encode table")


class InboundTranscoder:
    """Stateful mu-law 8 kHz -> s16le 16 kHz converter (160 bytes in -> 640 bytes out)."""

    __slots__ = (
        "_buf",
        "_hist_dst",
        "_hist_src",
        "_n",
        "_odd",
        "_out",
        "_out_even",
        "_out_odd",
        "_tail",
        "_up",
    )

    delay_seconds: float = DELAY_SECONDS

    def __init__(self) -> None:
        self._up = Upsampler2x()
        self._n = -1
        self._out = self._out_even = self._out_odd = np.empty(0, dtype="<i2")

    def reset(self) -> None:
        """Forget the filter history."""
        self._up.reset()

    def _prepare(self, n: int) -> None:
        """Size the filter and output buffers for n input bytes."""
        up = self._up
        up._prepare(n)
        # borrow the upsampler's buffer and views (it is reset in place, never reallocated
        # except by _prepare)
        self._buf, self._tail, self._odd = up._buf, up._tail, up._odd
        self._hist_src, self._hist_dst = up._hist_src, up._hist_dst
        self._n = n
        self._out = np.empty((n, 2), dtype="<i2")
        self._out_even = self._out[:, 0]
        self._out_odd = self._out[:, 1]

    def process(self, ulaw: bytes) -> bytes:
        """Convert one chunk of mu-law bytes; returns 4 * len(ulaw) bytes of s16le PCM."""
        codes = np.frombuffer(ulaw, _U8)
        n = codes.shape[0]
        if n != self._n:
            if n == 0:
                return b""
            self._prepare(n)
        DECODE_TABLE_F32.take(codes, out=self._tail, mode="clip")  # uint8 is always in range
        even = np.correlate(self._buf, _BRANCH_UP, "valid")
        np.rint(even, out=even)
        np.minimum(even, _I16_MAX, out=even)
        np.maximum(even, _I16_MIN, out=even)
        self._out_even[...] = even
        self._out_odd[...] = self._odd  # exact decoded integers: no rounding/clipping needed
        self._hist_dst[...] = self._hist_src
        return self._out.tobytes()


class OutboundTranscoder:
    """Stateful s16le 16 kHz -> mu-law 8 kHz converter (640 bytes in -> 160 bytes out)."""

    __slots__ = ("_byte", "_down")

    delay_seconds: float = DELAY_SECONDS

    def __init__(self) -> None:
        self._down = Downsampler2x()
        self._byte = b""

    def reset(self) -> None:
        """Forget the filter history and any carried byte or sample."""
        self._down.reset()
        self._byte = b""

    @property
    def carried_bytes(self) -> int:
        """Number of input bytes held back for the next call (0..3)."""
        return len(self._byte) + 2 * self._down.carried

    def process(self, pcm: bytes) -> bytes:
        """Convert one chunk of s16le bytes; returns (carried + len(pcm)) // 4 mu-law bytes."""
        nbytes = len(pcm)
        down = self._down
        if nbytes & 3 or self._byte or down._carry is not None:
            return self._process_unaligned(pcm)
        y = down._filter_pairs(np.frombuffer(pcm, _S16LE))
        np.rint(y, out=y)
        return _ENCODE_WRAP.take(y.astype(np.intp), mode="wrap").tobytes()

    def _process_unaligned(self, pcm: bytes) -> bytes:
        """General path: carries a dangling byte and/or an odd sample between calls."""
        if self._byte:
            pcm = self._byte + pcm
        nbytes = len(pcm) & ~1
        self._byte = bytes(pcm[nbytes:])
        y = self._down.process(np.frombuffer(pcm, _S16LE, nbytes >> 1))
        np.rint(y, out=y)
        return _ENCODE_WRAP.take(y.astype(np.intp), mode="wrap").tobytes()

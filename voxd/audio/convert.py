"""Streaming conversion between two audio formats: G.711 mu-law or s16le PCM, at any of the
rates voxd meets (8, 16, 22.05, 24, 44.1, 48 kHz), for an assistant whose audio is neither
Twilio's nor voxd's.

The common pairs use voxd's own live-path pieces (`transcode`: mu-law 8 kHz <-> s16le 16 kHz,
bit-exact G.711, ~2 ms delay; `resample`: the 2x half-band filter); other rates go through
`rational.RationalResampler` (~1 ms delay, nothing held back). Any chunk length: an odd byte
of s16le input waits for its sample's other half.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from voxd.audio.g711 import DECODE_TABLE, ENCODE_TABLE
from voxd.audio.rational import RationalResampler
from voxd.audio.resample import Downsampler2x, Upsampler2x
from voxd.audio.transcode import InboundTranscoder, OutboundTranscoder

__all__ = ["AudioConverter", "Encoding", "Format"]

Encoding = Literal["ulaw", "pcm"]
Format = tuple[Encoding, int]
"""(encoding, sample rate): `pcm` is s16le mono, `ulaw` G.711 mu-law."""


class AudioConverter:
    """A stateful converter of a stream of audio chunks from `source` to `target` (output lags
    the input by the resampler's delay, a few ms; nothing is held back beyond an odd byte)."""

    def __init__(self, source: Format, target: Format) -> None:
        self.source = source
        self.target = target
        self._carry = b""  # an odd byte of s16le input, until its sample is complete
        self.process: Callable[[bytes], bytes] = self._pick()
        """Convert one chunk of bytes; returns what it now gives out (may be b"")."""

    def _pick(self) -> Callable[[bytes], bytes]:
        (src_encoding, src_rate), (dst_encoding, dst_rate) = self.source, self.target
        if self.source == ("ulaw", 8000) and self.target == ("pcm", 16000):
            return InboundTranscoder().process
        if self.source == ("pcm", 16000) and self.target == ("ulaw", 8000):
            return OutboundTranscoder().process
        if self.source == ("ulaw", 8000) and self.target == ("pcm", 8000):
            return lambda data: DECODE_TABLE.take(np.frombuffer(data, np.uint8)).astype(
                "<i2").tobytes()
        resample: Callable[[np.ndarray], np.ndarray]
        if src_rate == dst_rate:
            resample = _same
        elif (src_rate, dst_rate) == (8000, 16000):
            resample = _float_stage(Upsampler2x().process)
        elif (src_rate, dst_rate) == (16000, 8000):
            resample = _float_stage(Downsampler2x().process)
        else:
            resample = RationalResampler(src_rate, dst_rate).process
        decode = self._decode_ulaw if src_encoding == "ulaw" else self._decode_pcm
        encode = _encode_ulaw if dst_encoding == "ulaw" else _encode_pcm

        def convert(data: bytes) -> bytes:
            samples = decode(data)
            return encode(resample(samples)) if samples.size else b""

        return convert

    @staticmethod
    def _decode_ulaw(data: bytes) -> np.ndarray:
        return DECODE_TABLE.take(np.frombuffer(data, np.uint8))

    def _decode_pcm(self, data: bytes) -> np.ndarray:
        if self._carry:
            data, self._carry = self._carry + data, b""
        if len(data) & 1:
            data, self._carry = data[:-1], data[-1:]
        return np.frombuffer(data, "<i2").astype(np.int16)


def _same(samples: np.ndarray) -> np.ndarray:
    return samples


def _float_stage(process: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray],
                                                                           np.ndarray]:
    """A float32 resampler stage as int16 in, int16 out (rounded, clipped)."""

    def stage(samples: np.ndarray) -> np.ndarray:
        y = process(samples.astype(np.float32))
        out: np.ndarray = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
        return out

    return stage


def _encode_ulaw(samples: np.ndarray) -> bytes:
    return ENCODE_TABLE.take(samples.astype(np.int16).view(np.uint16)).tobytes()


def _encode_pcm(samples: np.ndarray) -> bytes:
    return samples.astype("<i2").tobytes()

"""The phone line's audio, as Twilio Media Streams carry it: mu-law, 8 kHz, mono, one byte a
sample, in 20 ms frames. Every module that paces, records or times line audio takes these."""

from __future__ import annotations

from typing import Final

SAMPLE_RATE: Final = 8000
"""Samples (and, in mu-law, bytes) per second."""
FRAME_SECONDS: Final = 0.020
FRAME_BYTES: Final = 160
"""One 20 ms mu-law frame."""
BYTES_PER_MS: Final = SAMPLE_RATE // 1000

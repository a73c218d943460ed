"""How Twilio plays an assistant's audio to the caller, as a pure model (no clock, no socket).

Audio from voxd is queued; every 20 ms tick plays one frame of it (silence when the queue is
empty). A `mark` stands at the position in the audio where it arrived and is due once the audio
before it has played; a `clear` drops what is queued and makes every pending mark due at once.
The caller's own line can echo what it heard back into what it says (`line_echo`)."""

from __future__ import annotations

import numpy as np

from voxd.audio.g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_decode
from voxd.audio.line import FRAME_BYTES

SILENCE = bytes([ULAW_SILENCE]) * FRAME_BYTES


class Playout:
    """One call's playout queue and its marks (positions in bytes of assistant audio)."""

    def __init__(self) -> None:
        self.queue = bytearray()
        """Assistant audio not played yet."""
        self.played = 0
        """Bytes of assistant audio played so far."""
        self.queued = 0
        """Bytes of assistant audio queued so far (less what clears dropped)."""
        self.marks: list[tuple[int, str]] = []

    def receive(self, audio: bytes) -> None:
        """voxd sent `media`: queue it behind what is still to play."""
        self.queue += audio
        self.queued += len(audio)

    def mark(self, name: str) -> list[str]:
        """voxd sent a `mark`: it stands after the audio queued so far. The marks now due (this
        one, when nothing is left to play before it)."""
        self.marks.append((self.queued, name))
        return self.due()

    def tick(self) -> bytes:
        """One 20 ms frame played: the queue's next frame, padded with silence."""
        heard = bytes(self.queue[:FRAME_BYTES])
        del self.queue[:FRAME_BYTES]
        self.played += len(heard)
        return heard + SILENCE[len(heard):]

    def due(self) -> list[str]:
        """The marks whose audio has all played, in order (removed from the pending ones)."""
        names = []
        while self.marks and self.marks[0][0] <= self.played:
            names.append(self.marks.pop(0)[1])
        return names

    def clear(self) -> tuple[int, list[str]]:
        """voxd sent `clear`: (bytes of queued audio dropped, every pending mark, now due)."""
        dropped = len(self.queue)
        self.queue.clear()
        self.queued = self.played
        names = [name for _, name in self.marks]
        self.marks.clear()
        return dropped, names


def line_echo(frame: bytes, heard: list[bytes], attenuation_db: float,
              delay_ms: float) -> bytes:
    """The caller's frame plus the line's echo of what it heard `delay_ms` earlier."""
    back = round(delay_ms / 20)
    if back < 1 or len(heard) < back:
        return frame
    gain = 10 ** (-attenuation_db / 20)
    mixed = (ulaw_decode(np.frombuffer(frame, np.uint8)).astype(np.float32)
             + gain * ulaw_decode(np.frombuffer(heard[-back], np.uint8)))
    return pcm16_to_ulaw(np.clip(mixed, -32768, 32767).astype("<i2").tobytes())

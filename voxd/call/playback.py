"""Assistant audio on its way to the caller: framing, sending, and knowing what is still playing.

Twilio plays the media it is sent in order, in real time, from the moment it arrives. So voxd
can tell without asking how long Twilio's queue is: every 20 ms frame sent extends the expected
end of playback by 20 ms, starting from now if the queue had run dry. `clear` empties Twilio's
queue; marks confirm playback but are echoed early by a clear, so they are not trusted to
prove the audio was heard.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from voxd.audio.framing import FrameCutter
from voxd.audio.g711 import ULAW_SILENCE
from voxd.twilio.protocol import MediaStream

log = logging.getLogger(__name__)

FRAME_BYTES = 160
FRAME_SECONDS = 0.020


class Playback:
    """Sends assistant audio to Twilio as 160-byte mu-law frames and tracks what is queued there."""

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        protocol: MediaStream,
        clock: Callable[[], float],
    ) -> None:
        self._send = send
        self._protocol = protocol
        self._clock = clock
        self._cutter = FrameCutter(FRAME_BYTES, ULAW_SILENCE)
        self._play_end = 0.0
        self._sent_since_clear = False
        self.frames_sent = 0
        self.clears_sent = 0
        self.first_frame_at: float | None = None
        """Clock time the first frame of the current burst of assistant audio was sent."""

    @property
    def playing(self) -> bool:
        """True while audio sent to Twilio is (by our reckoning) still queued or playing."""
        return self._clock() < self._play_end

    @property
    def queued_seconds(self) -> float:
        """Audio sent to Twilio that has not played yet."""
        return max(0.0, self._play_end - self._clock())

    async def play(self, ulaw: bytes) -> int:
        """Send mu-law audio (any length) as whole 20 ms frames; returns frames sent."""
        frames = self._cutter.push(ulaw)
        for frame in frames:
            await self._send_frame(frame)
        return len(frames)

    async def flush(self) -> None:
        """Send a held partial frame, padded with silence (end of the assistant's turn)."""
        frame = self._cutter.flush()
        if frame is not None:
            await self._send_frame(frame)

    async def _send_frame(self, frame: bytes) -> None:
        now = self._clock()
        if now >= self._play_end:
            self._play_end = now
            self.first_frame_at = now
        self._play_end += FRAME_SECONDS
        self._sent_since_clear = True
        self.frames_sent += 1
        await self._send(self._protocol.media(frame))

    async def interrupt(self) -> float:
        """Drop everything not yet played: held bytes and Twilio's queue. Returns the seconds of
        audio dropped by our reckoning. `clear` is sent whenever audio went out since the last
        one (our reckoning of Twilio's queue can be a network delay short)."""
        self._cutter.clear()
        dropped = self.queued_seconds
        self._play_end = min(self._play_end, self._clock())
        if self._sent_since_clear:
            self._sent_since_clear = False
            self.clears_sent += 1
            await self._send(self._protocol.clear())
        return dropped

"""Assistant audio on its way to the caller: framing, pacing, and knowing what is still queued.

Theory of operation
-------------------
Twilio plays the media it is sent in order, in real time, from the moment it arrives. So voxd
knows without asking how much Twilio has queued: every 20 ms frame sent extends the expected
end of playback (`_play_end`) by 20 ms, starting from now if Twilio's queue had run dry.

Assistants may deliver audio faster than real time. voxd keeps it in its own queue and sends a
frame only while Twilio holds less than `lead` seconds, so:
- a barge-in drops voxd's queue instantly and Twilio's (`clear`) holds at most `lead`;
- the bytes in flight stay small even if Twilio stops reading (nothing piles up in the kernel);
- the lead absorbs network and scheduling jitter, so the caller never hears a gap.
The lead adds no delay: the first frames of a reply go out at once.

One task (`run`, the playout) sends to Twilio: media, `clear` and marks, in the order the call
asked for them. `enqueue` and `interrupt` only change state and wake it, with one exception
that saves a task switch per frame: while the playout is idle (nothing queued or owed) and no
write is in progress, `enqueue` sends the frames that pacing allows itself, without waiting
(`Direct.send_nowait`). The socket takes them at once, or the rest is owed and the playout
flushes it; so the enqueuing task never waits on Twilio, and audio that cannot go out queues
here as before (stall detection sees it).
A `clear` echoes every pending mark without playing the audio, so marks are not proof of
hearing; voxd uses them to confirm the end of playback, and tracks what it cleared itself.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

from voxd.audio.framing import FrameCutter
from voxd.audio.g711 import ULAW_SILENCE
from voxd.audio.line import FRAME_BYTES, FRAME_SECONDS, SAMPLE_RATE
from voxd.audio.vad import ENERGY_FLOOR_DBFS, frame_energy_dbfs_ulaw
from voxd.twilio.protocol import MediaStream

log = logging.getLogger(__name__)


@runtime_checkable
class Direct(Protocol):
    """Twilio's socket, written without waiting (voxd's own media path provides it)."""

    @property
    def writing(self) -> bool:
        """A task is writing: `send_nowait` must not be used now."""
        ...

    def send_nowait(self, text: str) -> bool:
        """Send one text frame at once; True if it went out whole, False if the rest is owed
        (`flush` writes it; later frames queue behind it)."""
        ...

    async def flush(self) -> None:
        """Write what `send_nowait` left owed."""
        ...

END_MARK = "voxd-end"
_EPSILON = 1e-6  # seconds; float sums of 0.02 must not make the pacing wait spin at its edge
BURST_GAP = 0.25
"""Twilio's queue must have been dry this long for new audio to count as a new burst (a new
answer); shorter underruns of an assistant streaming in real time belong to the same turn."""
ECHO_DECAY_DB_PER_SECOND = 30.0
"""How fast the echo reference falls once assistant audio has played: a line's echo arrives a
few hundred ms late at most, so 30 dB/s covers it without gating the caller for long after."""


class Playback:
    """The assistant's side of one call's Twilio socket: queue, pace, clear, mark."""

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        protocol: MediaStream,
        *,
        lead: float = 0.2,
        max_queue_seconds: float = 60.0,
        on_burst: Callable[[float], str | None] | None = None,
        resume_after: float = 0.3,
        direct: Direct | None = None,
        on_play: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self._send = send
        self._on_play = on_play
        """Told each frame sent, with when it starts playing (a call's recording)."""
        self._direct = direct
        self._idle = False  # the playout waits for work, with nothing queued or owed
        self._flush_owed = False
        self._on_burst = on_burst
        self._protocol = protocol
        self.lead = lead
        self._max_frames = max(1, int(max_queue_seconds / FRAME_SECONDS))
        self._cutter = FrameCutter(FRAME_BYTES, ULAW_SILENCE)
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = trio.Event()      # something to do (audio, clear, mark)
        self._urgent = trio.Event()    # a clear or mark must not wait for the pacing
        self._room = trio.Event()
        self._play_end = 0.0
        self._sent_since_clear = False
        self._clear_owed = False
        self._mark_owed: str | None = None
        self._marks_played: dict[str, trio.Event] = {}
        self.frames_sent = 0
        self.bursts = 0
        self.dropped_frames = 0
        """Assistant audio dropped as the rest of a turn the caller interrupted (20 ms frames)."""
        self._burst_frames = 0
        self._echo_ref = ENERGY_FLOOR_DBFS
        self._echo_ref_at = 0.0
        self._unplayed: collections.deque[tuple[float, float]] = collections.deque()
        """(play end, level) of frames sent but not yet playing: they join the echo reference
        only once they play, so frames sent ahead cannot lower it early."""
        self.resume_after = resume_after
        self._muted = False
        self._last_enqueue = 0.0

    # -- what the caller hears --

    @property
    def queued_seconds(self) -> float:
        """Audio sent to Twilio that has not played yet (by our reckoning)."""
        return max(0.0, self._play_end - trio.current_time())

    @property
    def held_seconds(self) -> float:
        """Audio in voxd's own queue, not yet sent to Twilio."""
        return len(self._queue) * FRAME_SECONDS + self._cutter.pending / SAMPLE_RATE

    @property
    def playing(self) -> bool:
        """True while assistant audio is queued here or at Twilio."""
        return bool(self._queue) or self.queued_seconds > 0.0

    # -- called by the outbound pump and the barge-in watcher --

    def echo_level(self, now: float) -> float:
        """Loudness (dBFS) of the assistant audio playing around `now`: what the caller's line
        may echo back. Falls off once the assistant stops."""
        unplayed = self._unplayed
        while unplayed and unplayed[0][0] - FRAME_SECONDS <= now:  # it has started playing
            end, level = unplayed.popleft()
            held = self._echo_ref - max(0.0, end - self._echo_ref_at) * ECHO_DECAY_DB_PER_SECOND
            if level >= held:
                self._echo_ref, self._echo_ref_at = level, end
        late = max(0.0, now - self._echo_ref_at)
        return self._echo_ref - late * ECHO_DECAY_DB_PER_SECOND

    @property
    def heard_seconds(self) -> float:
        """How much of the current burst the caller has heard (sent minus still queued)."""
        return max(0.0, self._burst_frames * FRAME_SECONDS - self.queued_seconds)

    async def enqueue(self, ulaw: bytes) -> None:
        """Queue mu-law audio (any length) for playout; waits while the queue is full, which
        holds back the assistant (backpressure) rather than dropping its audio. After a
        barge-in that the assistant did not notice itself (`interrupt(mute=True)`), the rest of
        its turn is dropped: audio is muted until the assistant pauses for `resume_after`."""
        now = trio.current_time()
        last, self._last_enqueue = self._last_enqueue, now
        if self._muted:
            if now - last < self.resume_after:
                self.dropped_frames += len(ulaw) // FRAME_BYTES
                return
            self._muted = False
        while len(self._queue) >= self._max_frames:
            self._room = trio.Event()
            await self._room.wait()
        frames = self._cutter.push(ulaw)
        if frames:
            self._queue.extend(frames)
            if self._idle and self._direct is not None and not self._direct.writing:
                self._send_now()
                if not (self._queue or self._flush_owed or self._cutter.pending):
                    return  # all sent: the playout stays idle
            self._kick()

    def unmute(self) -> None:
        """Take audio again at once (after `interrupt(mute=True)`): what comes next is a new
        request of the assistant's (keys to press), not the rest of the interrupted turn."""
        self._muted = False

    def flush(self) -> None:
        """Queue a held partial frame, padded with silence (the assistant paused or ended)."""
        frame = self._cutter.flush()
        if frame is not None:
            self._queue.append(frame)
            self._kick()

    def _kick(self) -> None:
        """Wake the playout: it has work (and is not idle from now on)."""
        self._idle = False
        self._wake.set()

    def _send_now(self) -> None:
        """Send what pacing allows from the enqueuing task, without waiting (the playout is
        idle and no write is in progress). What the socket does not take at once is owed to
        the playout, and the frames after it stay queued."""
        assert self._direct is not None
        send_nowait = self._direct.send_nowait
        queue = self._queue
        now = trio.current_time()
        while queue and max(self._play_end, now) + FRAME_SECONDS - now <= self.lead + _EPSILON:
            mark, media = self._take(now)
            whole = send_nowait(mark) if mark is not None else True
            if not (send_nowait(media) and whole):
                self._flush_owed = True
                return

    def interrupt(self, mute: bool = False) -> float:
        """Drop all unplayed assistant audio now (voxd's queue at once, Twilio's by a `clear`
        that the playout sends next). With `mute`, also drop what the assistant still sends of
        this turn (see `enqueue`). Returns the seconds dropped."""
        dropped = self.held_seconds + self.queued_seconds
        now = trio.current_time()
        self.echo_level(now)  # what has played so far counts; what was cleared never plays
        self._unplayed.clear()
        if mute:
            self._muted = True
        self._queue.clear()
        self._cutter.clear()
        # Twilio's queue is empty now: what comes next is a new burst.
        self._play_end = min(self._play_end, trio.current_time() - BURST_GAP)
        if self._sent_since_clear:
            self._clear_owed = True
            self._sent_since_clear = False
            self._kick()
            self._urgent.set()
        self._room.set()
        return dropped

    def mark_played(self, name: str) -> None:
        """Twilio echoed the mark `name` (played, or cleared)."""
        event = self._marks_played.pop(name, None)
        if event is not None:
            event.set()

    async def drain(self, grace: float) -> bool:
        """Play out everything queued and wait (at most `grace` beyond the audio's own
        length) for Twilio to confirm it played; True if it did."""
        self.flush()
        done = self._marks_played[END_MARK] = trio.Event()
        self._mark_owed = END_MARK
        self._kick()
        self._urgent.set()
        with trio.move_on_after(self.held_seconds + self.queued_seconds + grace):
            await done.wait()
            return True
        return False

    # -- the playout task --

    async def run(self) -> None:
        """Send queued audio to Twilio, paced to stay `lead` ahead of real time. Runs for the
        life of the call."""
        queue = self._queue
        send = self._send
        while True:
            if self._flush_owed:  # the rest of a frame `enqueue` sent goes first
                self._flush_owed = False
                assert self._direct is not None
                await self._direct.flush()
            if self._clear_owed:
                self._clear_owed = False
                await send(self._protocol.clear())
            if not queue:
                if self._mark_owed is not None:
                    name, self._mark_owed = self._mark_owed, None
                    await send(self._protocol.mark(name))
                    continue
                self._wake = trio.Event()
                if self._cutter.pending:
                    # A partial frame waits for more audio; if none comes within two frames,
                    # the assistant paused: send it padded rather than hold it to the next turn.
                    with trio.move_on_after(2 * FRAME_SECONDS):
                        await self._wake.wait()
                    if not queue and not self._clear_owed:
                        self.flush()
                else:
                    self._idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._idle = False
                continue
            now = trio.current_time()
            # Send the next frame only if Twilio then holds at most `lead`; else wait until it
            # does (the deadline is then always in the future, so this never spins).
            ends_at = max(self._play_end, now) + FRAME_SECONDS
            if ends_at - now > self.lead + _EPSILON:
                self._urgent = trio.Event()
                with trio.move_on_at(ends_at - self.lead):
                    await self._urgent.wait()  # an interrupt must not wait for the pacing
                continue
            mark, media = self._take(now)
            if mark is not None:
                await send(mark)
            await send(media)

    def _take(self, now: float) -> tuple[str | None, str]:
        """Take the next frame off the queue as sent at `now`: the mark to send before it (the
        start of a new burst, if `on_burst` names one) and its media message."""
        queue = self._queue
        frame = queue.popleft()
        if len(queue) < self._max_frames:
            self._room.set()
        mark = None
        if now >= self._play_end:
            new_burst = now >= self._play_end + BURST_GAP or self.bursts == 0
            self._play_end = now
            if new_burst:
                self.bursts += 1
                self._burst_frames = 0
                name = self._on_burst(now) if self._on_burst is not None else None
                if name is not None:  # before the frame: echoed when the answer starts
                    mark = self._protocol.mark(name)
        if self._on_play is not None:
            self._on_play(frame, self._play_end)
        self._play_end += FRAME_SECONDS
        self._burst_frames += 1
        self._unplayed.append((self._play_end, frame_energy_dbfs_ulaw(frame)))
        self._sent_since_clear = True
        self.frames_sent += 1
        return mark, self._protocol.media(frame)

"""Caller audio on its way to the assistant: a hand-off that never makes the inbound pump wait.

The inbound pump must keep reading Twilio whatever the assistant does (a `stop`, marks, DTMF
and the caller's speech arrive on that socket), so `send` never blocks:
- while the assistant is connecting, audio is held in order;
- once it is attached, audio goes straight to its socket when the socket takes it at once
  (`send_audio_nowait`: no task switch on the per-frame path), and is queued otherwise, for
  the feeder task (`run`) to deliver in order as the assistant reads.
What waits is bounded (in bytes of the provider's format: `max_held_bytes` while connecting,
`max_waiting_bytes` once attached): beyond it the oldest audio is dropped and counted, so the
assistant hears the most recent audio. An
assistant that takes nothing for a while is noticed by `stalled_seconds`; the call's watchdog
ends the call (call.upstream_send_timeout).
"""

from __future__ import annotations

import collections
from typing import Protocol, runtime_checkable

import trio

from voxd.providers.base import AssistantSession


@runtime_checkable
class NowaitAssistant(Protocol):
    """An assistant session whose socket can take audio without a task switch."""

    @property
    def ready_nowait(self) -> bool:
        """`send_audio_nowait` may be called now."""
        ...

    def send_audio_nowait(self, chunk: bytes) -> bool:
        """Write what the socket takes now; False if part of `chunk` is owed to `flush`."""
        ...

    async def flush(self) -> None:
        """Write what `send_audio_nowait` left owed."""
        ...


class UpstreamFeed:
    """Delivers caller audio to the assistant in order, never making its sender wait."""

    def __init__(self, max_held_bytes: int, max_waiting_bytes: int | None = None) -> None:
        self.max_held_bytes = max_held_bytes
        self.max_waiting_bytes = max_held_bytes if max_waiting_bytes is None \
            else max_waiting_bytes
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        self._direct: NowaitAssistant | None = None
        self._owed = False  # part of a direct send is still to be flushed by the feeder
        self._wake = trio.Event()
        self._attached = False
        self._waiting_since: float | None = None
        self.held_chunks = 0
        """Chunks that had to wait (for the assistant to connect, or to read)."""
        self.dropped_chunks = 0
        """Chunks dropped while connecting because more than max_held_bytes was waiting."""
        self.dropped_bytes = 0
        self.stall_dropped_chunks = 0
        """Chunks dropped once attached because more than max_waiting_bytes was waiting."""

    def send(self, chunk: bytes) -> None:
        """Deliver one chunk of caller audio now if the assistant's socket takes it, else hold
        it for the feeder task. Never waits."""
        if self._direct is not None and not self._held and not self._owed:
            direct = self._direct
            if direct.ready_nowait:
                if not direct.send_audio_nowait(chunk):
                    self._owed = True
                    self._note_waiting()
                    self._wake.set()
                return
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        self.held_chunks += 1
        limit = self.max_waiting_bytes if self._attached else self.max_held_bytes
        while self._held_bytes > limit and self._held:
            old = self._held.popleft()
            self._held_bytes -= len(old)
            if self._attached:
                self.stall_dropped_chunks += 1
            else:
                self.dropped_chunks += 1
                self.dropped_bytes += len(old)
        if self._attached:
            self._note_waiting()
            self._wake.set()

    def _note_waiting(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = trio.current_time()

    def stalled_seconds(self, now: float) -> float:
        """How long audio has been waiting for the attached assistant to take it (0 if
        none is waiting)."""
        return 0.0 if self._waiting_since is None else now - self._waiting_since

    async def run(self, session: AssistantSession) -> None:
        """The feeder task: deliver what was held while connecting, then whatever the direct
        path could not send, in order, for the life of the call."""
        if isinstance(session, NowaitAssistant):
            self._direct = session
        self._attached = True
        if self._held:
            self._note_waiting()
        while True:
            if self._owed and self._direct is not None:
                await self._direct.flush()
                self._owed = False
                self._progressed()
            while self._held:
                chunk = self._held.popleft()
                self._held_bytes -= len(chunk)
                await session.send_audio(chunk)
                self._progressed()
            if not self._owed:
                self._wake = trio.Event()
                await self._wake.wait()

    def _progressed(self) -> None:
        """The assistant took audio: the stall clock restarts if more is waiting."""
        self._waiting_since = trio.current_time() if self._held or self._owed else None

"""Caller audio on its way to the assistant, including while the assistant is still connecting.

Until the assistant's session is attached, audio is held in order, up to a bound (in bytes of
the provider's format); beyond the bound the oldest audio is dropped and counted, so the
assistant hears the most recent `preconnect_buffer_seconds` of the caller. `attach` delivers
what was held, in order, then passes audio straight through.
"""

from __future__ import annotations

import collections

from voxd.providers.base import AssistantSession


class UpstreamFeed:
    """Delivers caller audio to the assistant, holding it until the assistant is connected."""

    def __init__(self, max_held_bytes: int) -> None:
        self.max_held_bytes = max_held_bytes
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        self._session: AssistantSession | None = None
        self.held_chunks = 0
        """Chunks that had to wait for the assistant to connect."""
        self.dropped_chunks = 0
        """Chunks dropped because more than max_held_bytes was waiting."""
        self.dropped_bytes = 0

    @property
    def attached(self) -> bool:
        """True once audio goes straight to the assistant."""
        return self._session is not None

    async def send(self, chunk: bytes) -> None:
        """Deliver (or hold) one chunk of caller audio."""
        if self._session is not None:
            await self._session.send_audio(chunk)
            return
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        self.held_chunks += 1
        while self._held_bytes > self.max_held_bytes:
            old = self._held.popleft()
            self._held_bytes -= len(old)
            self.dropped_chunks += 1
            self.dropped_bytes += len(old)

    async def attach(self, session: AssistantSession) -> None:
        """The assistant is connected: deliver what was held, in order, then pass through."""
        while self._held:
            chunk = self._held.popleft()
            self._held_bytes -= len(chunk)
            await session.send_audio(chunk)
        # No checkpoint between the emptiness check and this: nothing can slip in between.
        self._session = session

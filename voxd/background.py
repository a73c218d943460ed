"""Work that outlives the request that started it (creating an assistant's call early from the
webhook, ending one nobody claimed, closing a provider replaced by a reload), supervised.

Every such task runs in one nursery the server owns, behind one boundary: whatever it raises
becomes one log line naming the call and one `voxd_errors_total{kind="background"}`, and goes
no further. A task's own failure never reaches the server's nursery, another task, or a call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from voxd.errors import LocalMisuse, VoxdError
from voxd.observability import metrics

log = logging.getLogger("voxd.background")


class Background:
    """The server's supervised nursery for work that outlives a request."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self.running = 0
        """Tasks started and not yet ended."""

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the tasks until cancelled (the server is stopping: they are cancelled too)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def accepting(self) -> bool:
        """Tasks can be started (the server is running)."""
        return self._nursery is not None

    def start(self, what: str, call_sid: str, fn: Callable[..., Awaitable[Any]], *args: Any,
              on_done: Callable[[], None] | None = None) -> None:
        """Run `fn(*args)` supervised; `what` and `call_sid` name it in the log line if it
        fails. `on_done` runs when it has ended, however it ended."""
        if self._nursery is None:
            raise LocalMisuse(f"background task {what!r} started while the server is not running")
        self.running += 1
        self._nursery.start_soon(self._supervise, what, call_sid, fn, args, on_done)

    async def _supervise(self, what: str, call_sid: str, fn: Callable[..., Awaitable[Any]],
                         args: tuple[Any, ...], on_done: Callable[[], None] | None) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            # A VoxdError is a peer's doing and its message says it all; anything else is a
            # bug of voxd's, and its traceback is what fixes it.
            log.error("call_sid=%s %s failed: %s: %s", call_sid or "-", what,
                      type(exc).__name__, exc, exc_info=not isinstance(exc, VoxdError))
            metrics.ERRORS.labels(kind="background").inc()
        finally:
            self.running -= 1
            if on_done is not None:
                self.call_quietly(what, call_sid, on_done)

    @staticmethod
    def call_quietly(what: str, call_sid: str, fn: Callable[[], None]) -> None:
        """Run a synchronous clean-up step behind the same boundary."""
        try:
            fn()
        except Exception as exc:
            log.error("call_sid=%s clean-up after %s failed: %s: %s", call_sid or "-", what,
                      type(exc).__name__, exc, exc_info=not isinstance(exc, VoxdError))
            metrics.ERRORS.labels(kind="background").inc()

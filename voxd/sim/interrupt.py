"""Ctrl-C (or SIGTERM) during `voxd call` / `voxd demo`: hang up, keep what the call recorded.

trio turns a SIGINT into a KeyboardInterrupt raised wherever the program happens to be, which
inside nurseries arrives as an exception group and loses the call's report. Instead the signal
is received as an event: the simulated caller hangs up (or, before the stream is up, the call
is cancelled), the report built so far (the simulator fills it frame by frame) is kept, and the
command says so in one line and exits 130."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from voxd.errors import EXIT_INTERRUPTED, is_interrupt

T = TypeVar("T")

GRACE_SECONDS = 2.0
"""How long a call hung up by Ctrl-C may take to end (its stop sent, what follows the stream
asked) before it is cut off."""


@dataclass
class Outcome(Generic[T]):
    """What an interruptible run gave: its result, or (interrupted) None and the signal's name."""

    result: T | None
    interrupted: str = ""


async def interruptible(run: Callable[[], Awaitable[T]],
                        wind_down: Callable[[], bool] | None = None,
                        grace: float = GRACE_SECONDS) -> Outcome[T]:
    """Run `run()`; a SIGINT or SIGTERM while it runs ends it instead of raising: by
    `wind_down()` (the caller hangs up) when that says it can, `run` then given `grace` seconds
    to finish; else, or on a second signal, by cancelling it."""
    outcome: Outcome[T] = Outcome(None)

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if outcome.interrupted or wind_down is None or not wind_down():
                    outcome.interrupted = outcome.interrupted or signal.Signals(signum).name
                    nursery.cancel_scope.cancel()
                    return
                outcome.interrupted = signal.Signals(signum).name
                nursery.cancel_scope.deadline = trio.current_time() + grace

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            outcome.result = await run()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single(group) from None
    return outcome


def single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a group (of groups) holds, else the group: what failed, as the
    command's error handling expects it (a VoxdError, not a group around one)."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        current = todo.pop()
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        else:
            leaves.append(current)
    return leaves[0] if len(leaves) == 1 else group


def serve_until_stopped(serve: Callable[[], Awaitable[object]]) -> int:
    """Run a server (`voxd echo-upstream`) until SIGINT or SIGTERM, with no traceback: 130
    after Ctrl-C (saying so in one line), 0 after SIGTERM (stopped as a service is). What
    `serve` raises is raised (one exception, not a group)."""
    try:
        outcome: Outcome[object] = trio.run(interruptible, serve)
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        outcome = Outcome(None, "SIGINT")
    if outcome.interrupted == "SIGTERM":
        return 0
    print("voxd: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED

"""Waiting on the thing itself instead of sleeping a guessed time.

`await wait_until(predicate, within, "what should have happened")` polls `predicate` every
`interval` seconds and returns as soon as it holds; after `within` seconds it fails the test
with an AssertionError naming what did not happen (and, if given, what it saw last).
`wait_until_sync` is the same for tests that drive a `voxd serve` process from plain code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

INTERVAL = 0.02


def _failure(what: str, within: float, seen: Callable[[], Any] | None) -> AssertionError:
    detail = "" if seen is None else f" (last seen: {seen()!r})"
    return AssertionError(f"not within {within:g}s: {what}{detail}")


async def wait_until(predicate: Callable[[], object], within: float, what: str, *,
                     seen: Callable[[], Any] | None = None,
                     interval: float = INTERVAL) -> None:
    """Return once `predicate()` is true; AssertionError naming `what` after `within`
    seconds."""
    with trio.move_on_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(interval)
    if predicate():  # true at the last moment
        return
    raise _failure(what, within, seen)


def wait_until_sync(predicate: Callable[[], object], within: float, what: str, *,
                    seen: Callable[[], Any] | None = None,
                    interval: float = 0.05) -> None:
    """`wait_until` for plain code (blocking)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() >= deadline:
            raise _failure(what, within, seen)
        time.sleep(interval)


def logged(records: Iterable[logging.LogRecord] | Any, text: str) -> Callable[[], bool]:
    """A predicate: a log record (of caplog's, or any list of records) contains `text`."""
    def current() -> list[logging.LogRecord]:
        return list(getattr(records, "records", records))  # caplog's list is replaced on clear

    return lambda: any(text in r.getMessage() for r in current())


def call_streaming(calls: Callable[[], Iterable[Any]], frames: int = 1) -> Callable[[], bool]:
    """A predicate: one of the calls in progress (`voxd.runtime.calls`, or a Server's
    `live.sessions`) has received at least `frames` media frames from the caller."""
    return lambda: any(session.stats.frames_in >= frames for session in list(calls()))

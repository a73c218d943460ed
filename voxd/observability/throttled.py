"""Log lines about things outsiders can make happen, throttled: one line per reason per
LOG_EVERY_SECONDS, saying how many it stands for, so a flood cannot flood the journal."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Final

import trio

LOG_EVERY_SECONDS: Final = 10.0


class ThrottledLog:
    """One log line per key per LOG_EVERY_SECONDS (with the count of those held back)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, message: str, *args: object) -> None:
        """A throttled warning."""
        self.log(logging.WARNING, key, message, *args)

    def error(self, key: str, message: str, *args: object,
              exc_info: BaseException | None = None) -> None:
        """A throttled error (with a traceback when `exc_info` is given)."""
        self.log(logging.ERROR, key, message, *args, exc_info=exc_info)

    def log(self, level: int, key: str, message: str, *args: object,
            exc_info: BaseException | None = None) -> None:
        """A throttled line at `level`."""
        now = trio.current_time()
        if now - self._last.get(key, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        if more:
            message += f" (and {more} more like it in the last {LOG_EVERY_SECONDS:.0f}s)"
        self._log.log(level, message, *args, exc_info=exc_info)

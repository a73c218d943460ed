"""Log lines about things outsiders can make happen, throttled: one line per reason per
LOG_EVERY_SECONDS, saying how many it stands for, so a flood cannot flood the journal."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Final

import trio

LOG_EVERY_SECONDS: Final = 10.0


class _Throttle(logging.Filter):
    """Lets one record per message template per LOG_EVERY_SECONDS through a logger."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = record.msg
        if now - self._last.get(key, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self._held[key] += 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it held back)"
        return True


def throttle_logger(logger: logging.Logger) -> None:
    """Throttle a logger voxd does not write itself (the HTTP stack's: what it logs can be
    caused by any client), once."""
    if not any(isinstance(f, _Throttle) for f in logger.filters):
        logger.addFilter(_Throttle())


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

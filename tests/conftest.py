"""Suite-wide fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

LoggerState = tuple[int, bool, bool, list[logging.Handler]]


def _ours(handler: logging.Handler) -> bool:
    """Not one of pytest's own capture handlers (pytest attaches and removes those itself)."""
    return not type(handler).__module__.startswith("_pytest")


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                    if isinstance(logger, logging.Logger)]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every test leaves logging as it found it: levels, propagation and handlers of every
    logger. voxd's `configure_logging` (run by a reload, or by a test wanting debug lines)
    installs a handler on the root logger writing to the stderr pytest captured for that test,
    raises library loggers to WARNING and sets the root level; and `caplog.set_level` restores
    the level it found, which may be one a fixture of the same test set. Left behind, later
    tests logged through a handler onto a closed capture file, or ran at DEBUG (slow)."""
    before: dict[str, LoggerState] = {
        logger.name: (logger.level, logger.propagate, logger.disabled,
                      [h for h in logger.handlers if _ours(h)])
        for logger in _loggers()}
    yield
    for logger in _loggers():
        state = before.get(logger.name)
        if state is None:  # created during the test: back to a new logger's defaults
            if logger.level != logging.NOTSET:
                logger.setLevel(logging.NOTSET)
            for handler in [h for h in logger.handlers if getattr(h, "_voxd", False)]:
                logger.removeHandler(handler)
            continue
        level, propagate, disabled, handlers = state
        if logger.level != level:
            logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
        for handler in [h for h in logger.handlers if _ours(h) and h not in handlers]:
            logger.removeHandler(handler)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)

"""Log lines an operator can read at 3 am: one line per event, call-scoped context attached once.

A call sets its `CallLogContext` once (`bind_call`); every record logged from any task of that
call then carries `call_sid=... stream_sid=...`, because trio tasks inherit the context of the
task that started them. Under systemd (stderr connected to the journal) each line starts with
its syslog priority `<N>` so journald files it at the right level. With server.workers > 1,
every line a worker writes carries `worker=N` (1..workers) after the logger's name; the main
process (the supervisor systemd started) writes its lines without it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar

from voxd.worker_env import worker_number

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class CallLogContext:
    """The identity of one call as it becomes known; mutable so late facts (stream_sid) show up
    in every task's lines."""

    __slots__ = ("_text", "call_sid", "stream_sid")

    def __init__(self, call_sid: str = "-", stream_sid: str = "-") -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self._text = ""
        self._render()

    def update(self, *, call_sid: str | None = None, stream_sid: str | None = None) -> None:
        """Record the call's identity once Twilio has told it."""
        if call_sid is not None:
            self.call_sid = call_sid
        if stream_sid is not None:
            self.stream_sid = stream_sid
        self._render()

    def _render(self) -> None:
        self._text = f"call_sid={self.call_sid} stream_sid={self.stream_sid} "

    def __str__(self) -> str:
        return self._text


_current_call: ContextVar[CallLogContext | None] = ContextVar("voxd_call", default=None)


def bind_call(context: CallLogContext) -> None:
    """Attach `context` to the current task (and every task it starts from now on)."""
    _current_call.set(context)


class _CallFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current_call.get()
        record.call = str(ctx) if ctx is not None else ""
        return True


def _worker_field() -> str:
    """`worker=N ` in a worker process, "" elsewhere."""
    number = worker_number()
    return f"worker={number} " if number is not None else ""


class VoxdFormatter(logging.Formatter):
    """`2026-11-23T10:00:00.123Z INFO voxd.call call_sid=CA.. stream_sid=MZ.. message`; in a
    worker (server.workers > 1): `... INFO voxd.call worker=2 call_sid=CA.. ...`."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal
        self.worker = _worker_field()

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        call = getattr(record, "call", "")
        text = f"{record.levelname} {record.name} {self.worker}{call}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prio = _PRIORITY.get(record.levelno, 6)
            # journald adds its own timestamp; each continuation line keeps the priority.
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return f"{stamp} {text}"


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets $JOURNAL_STREAM to its dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def stderr_problem(text: str, level: int = logging.ERROR) -> str:
    """`text` as the command line prints it to stderr (a problem that ends the command, outside
    the logging system): under journald each line carries its syslog priority, like log lines,
    so `journalctl -u voxd -p warning` shows why the service did not start. A worker's lines
    carry `worker=N`, as its log lines do."""
    worker = _worker_field()
    if worker:
        text = "\n".join(worker + line for line in text.splitlines() or [""])
    if not stderr_is_journal():
        return text
    prio = _PRIORITY.get(level, 3)
    return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def configure_logging(level: str = "info") -> None:
    """Install voxd's handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_voxd", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._voxd = True  # type: ignore[attr-defined]
    handler.addFilter(_CallFilter())
    handler.setFormatter(VoxdFormatter(journal=stderr_is_journal()))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The web stack's own chatter stays at warning, even when voxd logs at debug: at debug
    # these libraries log URLs and bytes (an assistant's websocketCallUrl is a secret).
    for name in ("hypercorn.error", "hypercorn.access", "quart.app", "quart.serving",
                 "trio-websocket", "httpx", "httpcore", "twilio.http_client"):
        logging.getLogger(name).setLevel(logging.WARNING)

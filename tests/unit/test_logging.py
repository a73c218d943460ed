"""Log lines: call context on every line of a call; journald priorities under systemd."""

from __future__ import annotations

import io
import logging

from voxd.observability.logging import CallLogContext, VoxdFormatter, _CallFilter, bind_call


def render(journal: bool, level: int, message: str) -> str:
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(_CallFilter())
    handler.setFormatter(VoxdFormatter(journal=journal))
    record = logging.LogRecord("voxd.call", level, __file__, 1, message, None, None)
    handler.filter(record)
    return handler.format(record)


def test_call_lines_carry_the_call_ids():
    context = CallLogContext()
    bind_call(context)
    context.update(call_sid="CA1", stream_sid="MZ2")
    line = render(False, logging.INFO, "call ended: reason=caller-hangup")
    assert "INFO voxd.call call_sid=CA1 stream_sid=MZ2 call ended: reason=caller-hangup" in line
    assert line[:4].isdigit() and line[23] == "Z"  # an ISO UTC timestamp first


def test_journal_lines_carry_their_syslog_priority():
    bind_call(CallLogContext("CA9", "MZ9"))
    assert render(True, logging.INFO, "x").startswith("<6>INFO")
    assert render(True, logging.WARNING, "x").startswith("<4>WARNING")
    assert render(True, logging.ERROR, "a\nb").splitlines()[1] == "<3>b"  # every line


def test_problems_printed_outside_logging_carry_a_priority_under_journald(monkeypatch):
    from voxd.observability import logging as voxd_logging

    monkeypatch.setattr(voxd_logging, "stderr_is_journal", lambda: True)
    assert voxd_logging.stderr_problem("voxd: a\nb") == "<3>voxd: a\n<3>b"
    assert voxd_logging.stderr_problem("x", logging.WARNING) == "<4>x"
    monkeypatch.setattr(voxd_logging, "stderr_is_journal", lambda: False)
    assert voxd_logging.stderr_problem("voxd: a") == "voxd: a"  # a terminal gets plain text

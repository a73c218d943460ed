"""The end-of-call policy: for every way a call ends, what follows. One table, read by the
teardown; nothing else tests reason strings.

An end reason is `kind` or `kind:detail` (`assistant-ended:vapi:customer-ended-call`,
`transferred:sales`). Its row says:
- outcome      the `voxd_calls_total{outcome}` label;
- caller       what the caller gets once the stream is over: NOTHING (gone already, or the
               call was moved on during it), HANG_UP, FALLBACK (call.fallback_twiml), DIAL
               (the transfer's <Dial>) or MESSAGE (outbound.machine_message, then hang up:
               an answering machine took the call);
- rest         whether voxd makes that happen with a REST request at teardown (REST mode).
               Always for HANG_UP and DIAL; for FALLBACK when voxd's close of the stream may
               not reach Twilio (its socket is suspect) or voxd itself failed; not when Twilio
               already runs the right thing (the caller hung up; Twilio dropped the socket and
               runs the verbs after </Connect>, the fallback);
- assistant    what the assistant is told: END (the call is over; harmless when it ended the
               call itself), TRANSFERRED (the notice, then END), or NOTHING (it cannot be
               reached);
- side         whose event it is: "caller" (Twilio's side), "assistant" or "voxd". Once a
               transfer is decided, an end from the assistant's side becomes the transfer
               (the assistant dropping its socket after asking must not cancel it);
- level        the summary line's log level.

Without REST (action mode) the caller column is what voxd answers to Twilio's `<Connect
action>` request, whatever the rest column says.
"""

from __future__ import annotations

import enum
import logging
from typing import Literal, NamedTuple


class Caller(enum.Enum):
    """What the caller gets after the stream."""

    NOTHING = "nothing"
    HANG_UP = "hang-up"
    FALLBACK = "fallback"
    DIAL = "dial"
    MESSAGE = "message"


class Tell(enum.Enum):
    """What the assistant is told at the end."""

    NOTHING = "nothing"
    END = "end"
    TRANSFERRED = "transferred"


class EndPolicy(NamedTuple):
    """One row of the table (see the module docstring)."""

    outcome: str
    caller: Caller
    rest: bool
    assistant: Tell
    side: Literal["caller", "assistant", "voxd"]
    level: int = logging.INFO


_INFO, _WARNING = logging.INFO, logging.WARNING
_FAILED = EndPolicy("error", Caller.FALLBACK, True, Tell.END, "voxd", _WARNING)
"""A failure of voxd's own (and any reason not in the table): apologise, end the assistant."""

POLICY: dict[str, EndPolicy] = {
    # the caller's side
    "caller-hangup": EndPolicy("completed", Caller.NOTHING, False, Tell.END, "caller"),
    "caller-disconnected": EndPolicy("completed", Caller.FALLBACK, False, Tell.END, "caller"),
    "caller-disconnected-before-start": EndPolicy("error", Caller.FALLBACK, False,
                                                  Tell.NOTHING, "caller", _WARNING),
    "start-timeout": EndPolicy("error", Caller.FALLBACK, False, Tell.NOTHING, "caller",
                               _WARNING),
    "token-rejected": EndPolicy("error", Caller.FALLBACK, False, Tell.NOTHING, "caller",
                                _WARNING),
    "protocol-error": EndPolicy("error", Caller.FALLBACK, True, Tell.END, "caller", _WARNING),
    "twilio-silent": EndPolicy("error", Caller.FALLBACK, True, Tell.END, "caller", _WARNING),
    "twilio-stalled": EndPolicy("error", Caller.FALLBACK, True, Tell.END, "caller", _WARNING),
    # the assistant's side
    "assistant-ended": EndPolicy("completed", Caller.HANG_UP, True, Tell.END, "assistant"),
    "upstream-error": EndPolicy("error", Caller.FALLBACK, True, Tell.NOTHING, "assistant",
                                _WARNING),
    "upstream-stalled": EndPolicy("error", Caller.FALLBACK, True, Tell.END, "assistant",
                                  _WARNING),
    "upstream-keepalive-timeout": EndPolicy("error", Caller.FALLBACK, True, Tell.END,
                                            "assistant", _WARNING),
    # voxd's side
    "transferred": EndPolicy("transferred", Caller.DIAL, True, Tell.TRANSFERRED, "voxd"),
    "max-duration": EndPolicy("completed", Caller.HANG_UP, True, Tell.END, "voxd"),
    "machine-hangup": EndPolicy("machine", Caller.HANG_UP, True, Tell.END, "voxd"),
    "machine-message": EndPolicy("machine", Caller.MESSAGE, True, Tell.END, "voxd"),
    "drain-timeout": EndPolicy("completed", Caller.FALLBACK, False, Tell.END, "voxd",
                               _WARNING),
    "server-shutdown": EndPolicy("error", Caller.FALLBACK, False, Tell.END, "voxd", _WARNING),
    "internal-error": _FAILED,
}


def policy(reason: str) -> EndPolicy:
    """The row for an end reason (`kind` or `kind:detail`); unknown kinds are voxd's own
    failure."""
    return POLICY.get(reason.partition(":")[0], _FAILED)

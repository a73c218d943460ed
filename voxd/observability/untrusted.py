"""Values that came from outside (a peer, a request) made safe to put in a log line.

Every such value is shown escaped and cut: control characters (CR, LF, ESC, BEL, DEL, C1) as
`\\xNN`, so nobody can forge a log line or send the operator's terminal escape sequences, and
at most `limit` characters, so a log line never grows with what a peer sends.
"""

from __future__ import annotations

import re
from typing import Final

DEFAULT_LIMIT: Final = 80
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def show(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` (a string, or anything by its str(): an exception's message) as text for a
    log line: escaped, and cut to `limit` characters (with `...` and the full length when
    cut)."""
    text = value if isinstance(value, str) else str(value)
    cut = ""
    if len(text) > limit:
        text, cut = text[:limit], f"...({len(text)} chars)"
    return _CONTROL.sub(_escape, text) + cut

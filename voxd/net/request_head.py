"""The head of the first request on a connection: just enough to route it (sans-I/O).

The front door reads a connection's first request head itself (under the handshake timeout and
a size limit) and sends media-stream WebSocket upgrades to voxd's own WebSocket path and
everything else to the HTTP server; both re-parse the head fully with their own parsers. This
parser is strict where routing depends on it: a head whose framing is ambiguous (two
Content-Lengths, Content-Length with Transfer-Encoding) is refused, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from voxd.errors import ProtocolError

HEAD_END: Final = b"\r\n\r\n"


class HeadError(ProtocolError):
    """The bytes are not the head of an HTTP/1.x request voxd serves."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What routing needs of a request head."""

    method: str
    path: str
    websocket: bool
    """An `Upgrade: websocket` request."""
    upgrade: str = ""
    """The Upgrade header's value, lower case ("" without one)."""
    content_length: int = 0
    """The body's length (0 without a body)."""
    chunked: bool = False
    """The body is sent with Transfer-Encoding (its length is not known up front)."""


def head_length(buffer: bytes | bytearray) -> int | None:
    """The length of the complete head at the start of `buffer`, or None while incomplete."""
    end = buffer.find(HEAD_END)
    return None if end < 0 else end + len(HEAD_END)


def parse_head(head: bytes) -> RequestHead:
    """Route-relevant facts of a complete request head; HeadError if it is not HTTP/1.x or
    its body's framing is ambiguous."""
    request_line, _, header_block = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1]:
        raise HeadError(f"not an HTTP/1.x request line: {request_line[:60]!r}")
    method, target = parts[0], parts[1]
    if not method.isalpha():
        raise HeadError(f"bad method {method[:20]!r}")
    upgrade = b""
    lengths: set[bytes] = set()
    chunked = False
    for line in header_block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name, value = name.strip().lower(), value.strip()
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif name == b"transfer-encoding":
            chunked = True
    if len(lengths) > 1 or (lengths and chunked):
        raise HeadError("ambiguous body length (Content-Length twice, or with "
                        "Transfer-Encoding)")
    length = lengths.pop() if lengths else b"0"
    if not length.isdigit() or len(length) > 12 or not length.isascii():
        raise HeadError(f"bad Content-Length {length[:20]!r}")
    path = target.split(b"?", 1)[0].decode("latin-1")
    return RequestHead(method.decode("ascii"), path, upgrade == b"websocket",
                       upgrade.decode("latin-1"), int(length), chunked)

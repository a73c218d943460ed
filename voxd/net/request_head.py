"""The head of the first request on a connection: just enough to route it (sans-I/O).

The front door reads a connection's first request head itself (under the handshake timeout and
a size limit) and sends media-stream WebSocket upgrades to voxd's own WebSocket path and
everything else to the HTTP server; both re-parse the head fully with their own parsers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from voxd.errors import ProtocolError

HEAD_END: Final = b"\r\n\r\n"


class HeadError(ProtocolError):
    """The bytes are not the head of an HTTP/1.x request."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What routing needs of a request head."""

    method: str
    path: str
    websocket: bool
    """An `Upgrade: websocket` request."""


def head_length(buffer: bytes | bytearray) -> int | None:
    """The length of the complete head at the start of `buffer`, or None while incomplete."""
    end = buffer.find(HEAD_END)
    return None if end < 0 else end + len(HEAD_END)


def parse_head(head: bytes) -> RequestHead:
    """Route-relevant facts of a complete request head; HeadError if it is not HTTP/1.x."""
    request_line, _, header_block = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1]:
        raise HeadError(f"not an HTTP/1.x request line: {request_line[:60]!r}")
    method, target = parts[0], parts[1]
    if not method.isalpha():
        raise HeadError(f"bad method {method[:20]!r}")
    websocket = False
    for line in header_block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"upgrade":
            websocket = value.strip().lower() == b"websocket"
    path = target.split(b"?", 1)[0].decode("latin-1")
    return RequestHead(method.decode("ascii"), path, websocket)

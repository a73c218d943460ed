"""The front door: every TCP connection to voxd's port starts here.

Before any other work is done for a connection, the front door enforces the connection limits
(total, and per remote address) and reads the first request head under a deadline and a size
limit (slowloris clients and scanners cost a file descriptor for at most
`server.handshake_timeout`). It then routes: a WebSocket upgrade of exactly `/media-stream`
goes to voxd's own media path (`voxd.media`), any other WebSocket upgrade is answered 404 here,
everything else goes to the HTTP server, which gets the connection with the bytes already read
put back in front.

Each connection's task is its own boundary: whatever its handling raises ends that connection
only, with one throttled log line and one `voxd_errors_total{kind="connection"}` (a peer's
doing, mapped into `PeerError`, is logged at debug: it is the peer's problem, not voxd's).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from voxd.errors import PeerError
from voxd.net.request_head import HeadError, RequestHead, head_length, parse_head
from voxd.net.stream import DirectStream
from voxd.observability import metrics
from voxd.observability.throttled import ThrottledLog
from voxd.observability.untrusted import show

log = logging.getLogger("voxd.front")

def _answer(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


MAX_HEAD_BYTES: Final = 16 * 1024
HTTP_CONNECTION_SECONDS: Final = 30.0
"""Longest an HTTP connection (webhook, health, metrics) lives once its request arrived."""
MAX_BODY_BYTES: Final = 64 * 1024
"""Largest request body (Twilio's webhook form is about 1 KiB)."""
MEDIA_PATH: Final = "/media-stream"
NOT_FOUND: Final = _answer(b"404 Not Found")
BAD_REQUEST: Final = _answer(b"400 Bad Request")
LENGTH_REQUIRED: Final = _answer(b"411 Length Required")
TOO_LARGE: Final = _answer(b"413 Content Too Large")

_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The front door's limits (from `[server]`; read per connection, so a reload applies)."""

    handshake_timeout: float
    max_connections: int
    max_connections_per_address: int
    ipv6_prefix_length: int = 64
    """IPv6 addresses are counted per network of this prefix (one host usually has a /64)."""


MediaHandler = Callable[[DirectStream, bytes, str], Awaitable[None]]
HttpHandler = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


class ReplayStream(trio.abc.HalfCloseableStream):
    """A connection with bytes already read from it put back in front of what comes next.

    Sends take turns: Hypercorn's close path sends EOF without its own send lock, which raced
    a response still being written (trio's BusyResourceError, a traceback per connection, from
    a request followed by bytes h11 cannot parse)."""

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self.transport = stream
        self.socket = stream.socket  # the HTTP server asks it for the peer's address
        self._head = head
        self._sending = trio.Lock()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.transport.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._sending:
            await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


class FrontDoor:
    """Accepts connections on voxd's listening socket and routes each one."""

    def __init__(self, limits: Callable[[], ConnectionLimits], media: MediaHandler,
                 http: HttpHandler) -> None:
        self.limits = limits
        self.media = media
        self.http = http
        self.open = 0
        self.per_address: Counter[str] = Counter()
        self._throttled = ThrottledLog(log)

    async def serve(self, sock: socket.socket, handlers: trio.Nursery,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; each connection runs in `handlers`. `sock` stays open (the
        caller owns it): the front door listens on its own duplicate."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
        async with listener:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors or memory passes; anything else is logged and retried
                    # more slowly: the calls in progress go on either way.
                    self._throttled.warning("accept", "cannot accept connections: %s; retrying",
                                            exc.strerror or exc)
                    metrics.ERRORS.labels(kind="accept").inc()
                    await trio.sleep(0.1 if exc.errno in _ACCEPT_RETRY else 1.0)
                    continue
                self._admit(stream, handlers)

    def _admit(self, stream: trio.SocketStream, handlers: trio.Nursery) -> None:
        limits = self.limits()
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:  # already reset by the peer
            stream.socket.close()
            return
        peer = f"{host}:{port}"
        host = address_key(host, limits.ipv6_prefix_length)
        reason = None
        if self.open >= limits.max_connections:
            reason, key = "max_connections", "server.max_connections"
        elif self.per_address[host] >= limits.max_connections_per_address:
            reason, key = "per_address", "server.max_connections_per_address"
        if reason is not None:
            metrics.CONNECTIONS_REJECTED.labels(reason=reason).inc()
            self._throttled.warning(reason, "connection from %s refused: %s reached (%d open, "
                                    "%d from %s)", peer, key, self.open,
                                    self.per_address[host], host)
            _reset(stream.socket)
            return
        self.open += 1
        self.per_address[host] += 1
        metrics.CONNECTIONS_OPEN.inc()
        handlers.start_soon(self._connection, stream, host, peer, limits.handshake_timeout)

    async def _connection(self, stream: trio.SocketStream, host: str, peer: str,
                          handshake_timeout: float) -> None:
        try:
            routed = await self._read_request(stream, peer, handshake_timeout)
            if routed is not None:
                head, data = routed
                if head.upgrade and not head.websocket:
                    self._refuse("upgrade", "connection from %s refused: voxd serves HTTP/1.1 "
                                 "only (Upgrade: %s)", peer, show(head.upgrade, 20))
                    await stream.send_all(BAD_REQUEST)
                elif not head.websocket:
                    # One request per connection (every answer says Connection: close), so an
                    # HTTP connection has no reason to outlive this bound, whatever the HTTP
                    # stack keeps waiting for.
                    with trio.move_on_after(HTTP_CONNECTION_SECONDS):
                        await self.http(ReplayStream(stream, data))
                elif head.path == MEDIA_PATH or head.path.startswith(MEDIA_PATH + "/"):
                    await self.media(DirectStream(stream), data, peer)
                else:
                    self._refuse("websocket_path", "WebSocket upgrade from %s refused: only %s "
                                 "takes one", peer, MEDIA_PATH)
                    await stream.send_all(NOT_FOUND)
        except Exception as exc:
            if _peer_caused(exc):  # whoever owned the connection has logged what matters
                log.debug("connection from %s ended: %s: %s", peer, type(exc).__name__, exc)
                return
            metrics.ERRORS.labels(kind="connection").inc()
            self._throttled.error("connection", "connection from %s failed (voxd's bug; the "
                                  "connection is closed, nothing else is affected): %s: %s",
                                  peer, type(exc).__name__, exc, exc_info=exc)
        finally:
            self.open -= 1
            self.per_address[host] -= 1
            if not self.per_address[host]:
                del self.per_address[host]
            metrics.CONNECTIONS_OPEN.dec()
            stream.socket.close()

    async def _read_request(self, stream: trio.SocketStream, peer: str,
                            deadline_seconds: float) -> tuple[RequestHead, bytes] | None:
        """The first request's head and body (and any bytes read with them), all within the
        handshake deadline (a slow body is bounded like a slow head), or None after refusing
        the connection with a log line."""
        with trio.move_on_after(deadline_seconds):
            try:
                data = await receive_head(stream)
            except HeadError as exc:
                self._refuse("head_too_big", "connection from %s closed: %s", peer, exc)
                return None
            if not data:
                log.debug("connection from %s closed before sending a request", peer)
                return None
            try:
                head = parse_head(data[:head_length(data)])
            except HeadError as exc:
                self._refuse("not_http", "connection from %s closed: %s", peer, exc)
                return None
            if head.websocket or not (head.content_length or head.chunked):
                return head, data
            if head.chunked or head.content_length > MAX_BODY_BYTES:
                self._refuse("body", "connection from %s refused: %s", peer,
                             "a body without Content-Length" if head.chunked else
                             f"a body of {head.content_length} bytes (at most "
                             f"{MAX_BODY_BYTES})")
                await stream.send_all(LENGTH_REQUIRED if head.chunked else TOO_LARGE)
                return None
            data = await receive_body(stream, data, head_length(data) or 0, head.content_length)
            if data:
                return head, data
            log.debug("connection from %s closed before its request body ended", peer)
            return None
        self._refuse("handshake_timeout", "connection from %s closed: no complete request "
                     "within %.1fs (server.handshake_timeout)", peer, deadline_seconds)
        return None

    def _refuse(self, reason: str, message: str, *args: object) -> None:
        """Count and log (throttled) a refused connection."""
        metrics.CONNECTIONS_REJECTED.labels(reason=reason).inc()
        self._throttled.warning(reason, message, *args)
        return None


async def receive_body(stream: trio.abc.ReceiveStream, data: bytes, head_bytes: int,
                       body_bytes: int) -> bytes:
    """Read until the body after the head has arrived; b"" if the peer closed first."""
    buffer = bytearray(data)
    while len(buffer) < head_bytes + body_bytes:
        chunk = await stream.receive_some(MAX_BODY_BYTES)
        if not chunk:
            return b""
        buffer += chunk
    return bytes(buffer)


async def receive_head(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until a whole request head has arrived; returns it with whatever followed it, or
    b"" if the peer closed first. HeadError past MAX_HEAD_BYTES."""
    buffer = bytearray()
    while head_length(buffer) is None:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HeadError(f"request head over {MAX_HEAD_BYTES} bytes")
        data = await stream.receive_some(MAX_HEAD_BYTES)
        if not data:
            return b""
        buffer += data
    return bytes(buffer)


_PEER_CAUSED = (trio.BrokenResourceError, trio.ClosedResourceError, PeerError)
"""The peer went away or broke its protocol: not voxd's failure."""


def _peer_caused(exc: BaseException) -> bool:
    """`exc` (or every exception in the group it is) is the peer's doing."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(_PEER_CAUSED)[1] is None
    return isinstance(exc, _PEER_CAUSED)


def address_key(host: str, ipv6_prefix_length: int) -> str:
    """What the per-address limit counts a peer as: an IPv4 address itself (also when it comes
    IPv4-mapped), an IPv6 address as its network of `ipv6_prefix_length` bits (a host can
    take any address of its /64)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix_length}", strict=False))
    return host


def _reset(sock: trio.socket.SocketType) -> None:
    """Close at once with a reset (no FIN handshake, no TIME_WAIT kept for a flood)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

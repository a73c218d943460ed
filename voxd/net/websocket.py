"""A WebSocket on a trio stream, framed by wsproto: voxd's own media-stream path.

Through Hypercorn a WebSocket message costs ~100 us (ASGI dicts, a queue and a task switch per
message) and every socket send is shielded from cancellation, so a peer that stops reading can
hold a call's teardown. Here a message costs one wsproto parse in the reading task, a send is
one `send_all` in the sending task, and everything can be cancelled.

One task receives and one task sends (a call's inbound pump and its playout); control frames
the receiver must answer (pong, close) are written by it when no send is in progress, or handed
to the send in progress to write right after its own frame: frames never interleave, and the
hot path takes no lock. `close` waits for a send in progress to end; a send cancelled midway
leaves the stream unusable, and then `close` just closes TCP.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from typing import Final
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionState, ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_BYTES: Final = 65536
CLOSE_WAIT_SECONDS: Final = 1.0
"""How long `close` waits for the peer's answering close frame before closing TCP."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class ConnectionClosed(Exception):
    """The WebSocket is closed (by the peer, by us, or because TCP broke)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class MessageTooBig(Exception):
    """A message over the size limit arrived; the socket has been closed with 1009."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of more than {size} bytes exceeds the limit of {limit}")


class WebSocket:
    """An open WebSocket (the handshake is done): whole messages in, whole messages out."""

    __slots__ = ("_backlog", "_broken", "_closed", "_closing", "_conn", "_messages", "_parts",
                 "_parts_len", "_sending", "_stream", "_write_done", "max_message_bytes")

    def __init__(self, stream: trio.abc.Stream, connection: WSConnection,
                 max_message_bytes: int) -> None:
        self._stream = stream
        self._conn = connection
        self.max_message_bytes = max_message_bytes
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._parts_len = 0
        self._sending = False
        self._write_done: trio.Event | None = None
        self._broken = False
        self._backlog = b""
        self._closed: ConnectionClosed | None = None
        self._closing = False

    @property
    def closed(self) -> bool:
        """No more messages will be received."""
        return self._closed is not None

    async def receive(self) -> str | bytes:
        """The next whole message (text as str, binary as bytes). ConnectionClosed once the
        socket is closed; MessageTooBig (after closing with 1009) for an oversized message."""
        messages = self._messages
        while not messages:
            if self._closed is not None:
                raise self._closed
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except _GONE:
                data = b""
            if not data:
                self._closed = ConnectionClosed(1006, "connection lost")
                raise self._closed
            self._conn.receive_data(data)
            await self._handle_events()
        return messages.popleft()

    async def _handle_events(self) -> None:
        for event in self._conn.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                self._message_part(event)  # type: ignore[arg-type]
            elif kind is Ping:
                await self._write(self._conn.send(event.response()))  # type: ignore[attr-defined]
            elif kind is CloseConnection:
                await self._peer_closed(event)  # type: ignore[arg-type]
                return

    def _message_part(self, event: Message[str] | Message[bytes]) -> None:
        data = event.data
        if event.message_finished and not self._parts:
            size = len(data)
            if size > self.max_message_bytes:
                raise self._too_big(size)
            self._messages.append(data)
            return
        self._parts.append(data)
        self._parts_len += len(data)
        if self._parts_len > self.max_message_bytes:
            raise self._too_big(self._parts_len)
        if event.message_finished:
            parts, self._parts, self._parts_len = self._parts, [], 0
            self._messages.append("".join(parts) if isinstance(data, str)  # type: ignore[arg-type]
                                  else b"".join(parts))  # type: ignore[arg-type]

    def _too_big(self, size: int) -> MessageTooBig:
        self._closed = ConnectionClosed(1009, "message too big")
        self._parts, self._parts_len = [], 0
        return MessageTooBig(size, self.max_message_bytes)

    async def _peer_closed(self, event: CloseConnection) -> None:
        """The peer closed (or sent bytes wsproto could not parse, which it reports as a close
        with the code to answer): answer the close frame and remember why."""
        self._closed = ConnectionClosed(event.code, event.reason or "")
        if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            with contextlib.suppress(ConnectionClosed, LocalProtocolError):
                await self._write(self._conn.send(CloseConnection(event.code, event.reason)))

    async def send(self, message: str | bytes) -> None:
        """Send one message (str as text, bytes as binary)."""
        if self._closing or self._conn.state is not ConnectionState.OPEN:
            raise ConnectionClosed(1006 if self._closed is None else self._closed.code,
                                   "socket closed")
        await self._write(self._conn.send(Message(data=message)))

    async def _write(self, data: bytes) -> None:
        if self._sending:  # the send in progress writes it right after its own frame
            self._backlog += data
            return
        self._sending = True
        try:
            await self._stream.send_all(data)
            while self._backlog:
                data, self._backlog = self._backlog, b""
                await self._stream.send_all(data)
        except (*_GONE, trio.BusyResourceError):
            self._closed = self._closed or ConnectionClosed(1006, "connection lost")
            raise ConnectionClosed(1006, "connection lost") from None
        except BaseException:  # cancelled: part of a frame may be out, the stream is unusable
            self._broken = True
            raise
        finally:
            self._sending = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close once: send a close frame, give the peer up to CLOSE_WAIT_SECONDS to answer
        (so the frame is not lost to a reset), then close TCP. Never raises for a gone peer."""
        if self._closing:
            return
        self._closing = True
        try:
            while self._sending:  # another task's send (being cancelled, usually) ends first
                self._write_done = trio.Event()
                await self._write_done.wait()
            if self._broken:
                return  # no close frame can follow half a frame: just close TCP
            if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                await self._write(self._conn.send(CloseConnection(code, reason)))
            if self._conn.state is ConnectionState.LOCAL_CLOSING:
                with trio.move_on_after(CLOSE_WAIT_SECONDS):
                    await self._await_close_reply()
        except (ConnectionClosed, MessageTooBig, LocalProtocolError, trio.BusyResourceError,
                *_GONE):
            pass
        finally:
            self._closed = self._closed or ConnectionClosed(code, reason)
            await self._stream.aclose()

    async def _await_close_reply(self) -> None:
        while self._conn.state is ConnectionState.LOCAL_CLOSING:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                return
            self._conn.receive_data(data)
            for _ in self._conn.events():
                pass  # messages after our close are discarded; a close answer ends the loop


class HandshakeError(Exception):
    """The request is not a valid WebSocket opening handshake."""


class ServerHandshake:
    """The server side of the opening handshake, fed the bytes the front door already read
    (the request head, and anything the client sent after it)."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self._stream = stream
        self._conn = WSConnection(ConnectionType.SERVER)
        try:
            self._conn.receive_data(data)
            request = next((e for e in self._conn.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as exc:
            raise HandshakeError(str(exc)) from None
        if request is None:
            raise HandshakeError("incomplete WebSocket upgrade request")
        self.request = request

    def header(self, name: bytes) -> str | None:
        """A request header's value (name in lower case), None if absent."""
        for key, value in self.request.extra_headers:
            if key.lower() == name:
                return bytes(value).decode("latin-1")
        return None

    async def accept(self, max_message_bytes: int) -> WebSocket:
        """Answer 101 and return the open WebSocket."""
        await self._stream.send_all(self._conn.send(AcceptConnection()))
        return WebSocket(self._stream, self._conn, max_message_bytes)

    async def reject(self, status: int) -> None:
        """Answer `status` with an empty body (the caller closes the stream)."""
        await self._stream.send_all(self._conn.send(RejectConnection(status_code=status)))


async def connect(url: str, headers: list[tuple[str, str]] | None = None, *,
                  max_message_bytes: int = 1 << 20) -> WebSocket:
    """Open a client WebSocket to a ws:// URL (wss:// goes through TLS). HandshakeError when
    the server refuses the upgrade (the status is in the message); OSError when it cannot be
    reached."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise HandshakeError(f"not a ws:// or wss:// URL: {url}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    if secure:
        stream = trio.SSLStream(stream, ssl.create_default_context(),
                                server_hostname=parts.hostname, https_compatible=True)
    try:
        conn = WSConnection(ConnectionType.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        await stream.send_all(conn.send(Request(
            host=host, target=target,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers or []])))
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise HandshakeError("connection closed during the WebSocket handshake")
            try:
                conn.receive_data(data)
                events = list(conn.events())
            except RemoteProtocolError as exc:
                raise HandshakeError(f"bad handshake response: {exc}") from None
            for event in events:
                if isinstance(event, AcceptConnection):
                    return WebSocket(stream, conn, max_message_bytes)
                if isinstance(event, RejectConnection):
                    raise HandshakeError(f"upgrade refused with HTTP {event.status_code}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise

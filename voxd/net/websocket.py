"""A WebSocket on a trio stream, framed by the `websockets` library's sans-I/O protocol:
voxd's own media path, and its client side for assistants.

Through Hypercorn a WebSocket message costs ~100 us (ASGI dicts, a queue and a task switch per
message) and every socket send is shielded from cancellation, so a peer that stops reading can
hold a call's teardown. Here a message costs one frame parse in the reading task, a send is
one `send_all` in the sending task, and everything can be cancelled. The framing is
`websockets`' (about three times cheaper per message than wsproto, measured:
`bench/transport.py`), which also answers pings and close frames by itself.

One task receives; senders take turns (a send waits while another task's write is in
progress). The receiver's own replies (pongs, close replies) never wait: they are handed to the
write in progress, which sends them right after its own frame (bounded: MAX_BACKLOG_BYTES).
Frames never interleave, and the hot path takes no lock. `close` waits for a write in progress
to end; a write cancelled midway leaves the stream unusable (further sends raise
ConnectionClosed), and then `close` just closes TCP.

Fairness: one read can bring thousands of tiny frames (64 KiB of empty pings is ~11,000 frames,
~40 ms of parsing), so the receiver feeds the parser a read of more than WHOLE_BYTES in slices
of FEED_BYTES (~0.6 ms of the cheapest frames; a shorter read, ~1.3 ms at most, is fed whole
and the stream waits before the next one) and yields to the scheduler between two slices, or
before handing out a message it already holds, once it has run FAIR_SECONDS since it last
waited (for the socket: `DirectStream.resumed`; other streams yield on every receive). So a
flooding connection runs ~1 ms at a time. The common path, one message per read after a wait,
costs one clock read more; a 1 MiB message ~3 ms more (its 64 KiB reads go in slices too).

Server side, the handshake parses only the request head: bytes that came with it wait until the
upgrade is accepted (after the caller's checks), and are then parsed under the message size
limit like any later byte.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from time import perf_counter
from typing import Final

import trio
from trio.lowlevel import checkpoint
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from voxd.errors import LocalMisuse, ProtocolError, TransportError
from voxd.net.request_head import head_length
from voxd.net.stream import FAIR_SECONDS, DirectStream

RECEIVE_BYTES: Final = 65536
FEED_BYTES: Final = 1024
"""What the parser is given at once from a read of more than WHOLE_BYTES (see the module doc
on fairness)."""
WHOLE_BYTES: Final = 2048
"""A read up to this size goes to the parser whole (a call's frames, and bursts of them, are
never cut: a cut costs a parser call)."""
CLOSE_WAIT_SECONDS: Final = 1.0
"""How long `close` waits for the peer's answering close frame before closing TCP."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_PING_IDS = itertools.count(1)
MAX_BACKLOG_BYTES: Final = 65536
"""Control replies (pongs, close) waiting for another task's write to finish, at most."""
_TEXT, _BINARY, _CONT, _PONG, _CLOSE = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG,
                                        Opcode.CLOSE)
_OPEN, _CLOSING = State.OPEN, State.CLOSING
_protocol_log = logging.getLogger("voxd.net.websocket")
"""What the protocol logs itself (its info lines are per connection: not shown)."""
_protocol_log.setLevel(logging.WARNING)


class ConnectionClosed(TransportError):
    """The WebSocket is closed (by the peer, by us, or because TCP broke)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class MessageTooBig(ProtocolError):
    """A message over the size limit arrived; the socket has been closed with 1009."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of more than {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class WebSocket:
    """An open WebSocket (the handshake is done): whole messages in, whole messages out."""

    __slots__ = ("_backlog", "_broken", "_closed", "_closing", "_direct", "_messages", "_owed",
                 "_parts", "_parts_text", "_pings", "_proto", "_resumed", "_sending", "_stream",
                 "_too_big", "_unparsed", "_unparsed_at", "_write_done", "close_wait")

    def __init__(self, stream: trio.abc.Stream, protocol: Protocol,
                 close_wait: float = CLOSE_WAIT_SECONDS,
                 unparsed: bytes | bytearray = b"") -> None:
        """`unparsed`: bytes already read from `stream` that the protocol has not seen yet."""
        self._stream = stream
        self._direct = stream if isinstance(stream, DirectStream) else None
        self._proto = protocol
        self.close_wait = close_wait
        """How long `close` waits for the peer's answering close frame before closing TCP."""
        self._messages: deque[str | bytes] = deque()
        self._unparsed: bytes | bytearray = unparsed  # read, not parsed yet from _unparsed_at
        self._unparsed_at = 0
        self._resumed = perf_counter()  # when the receiving task last waited or yielded
        self._parts = bytearray()  # a fragmented message so far (bounded by the size limit)
        self._parts_text = False
        self._pings: dict[bytes, trio.Event] = {}
        self._sending = False
        self._write_done: trio.Event | None = None
        self._broken = False
        self._backlog: list[bytes] = []
        self._owed = b""  # the rest of a `send_nowait` the socket did not take at once
        self._closed: ConnectionClosed | None = None
        self._too_big: MessageTooBig | None = None
        self._closing = False

    @property
    def max_message_bytes(self) -> int:
        """Largest message accepted (larger ones close the socket with 1009)."""
        return self._proto.max_message_size or 0

    @property
    def closed(self) -> bool:
        """No more messages will be received."""
        return self._closed is not None

    async def receive(self) -> str | bytes:
        """The next whole message (text as str, binary as bytes). ConnectionClosed once the
        socket is closed; MessageTooBig (after closing with 1009) for an oversized message."""
        messages = self._messages
        if messages:  # more from what was read already: this task has not waited since
            if perf_counter() - self._resumed >= FAIR_SECONDS:  # `_yield_if_due`, inline
                await checkpoint()
                self._resumed = perf_counter()
            return messages.popleft()
        while not messages:
            if self._too_big is not None:
                raise MessageTooBig(self._too_big.size, self._too_big.limit)
            if self._closed is not None:  # a fresh exception each time (no growing traceback)
                raise ConnectionClosed(self._closed.code, self._closed.reason)
            if self._closing:  # `close` reads the peer's answer itself
                raise ConnectionClosed(1000, "closed by this side")
            if self._unparsed:
                await self._yield_if_due()
                self._proto.receive_data(self._next_slice())
                await self._absorb()
                continue
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (*_GONE, trio.BusyResourceError):  # busy: `close` started reading
                data = b""
            self._resumed = self._direct.resumed if self._direct is not None else perf_counter()
            if not data:
                self._set_closed(1006, "connection lost")
                continue
            if len(data) > WHOLE_BYTES:
                self._unparsed, self._unparsed_at = data, FEED_BYTES
                data = data[:FEED_BYTES]
            self._proto.receive_data(data)
            await self._absorb()
        return messages.popleft()

    async def _yield_if_due(self) -> None:
        """Yield (cancellably) if this task has run FAIR_SECONDS since it last waited."""
        if perf_counter() - self._resumed >= FAIR_SECONDS:
            await checkpoint()
            self._resumed = perf_counter()

    def _next_slice(self) -> bytes | bytearray:
        """The next FEED_BYTES (at most) of what was read but not parsed yet."""
        start = self._unparsed_at
        end = start + FEED_BYTES
        data = self._unparsed[start:end]
        if end >= len(self._unparsed):
            self._unparsed, self._unparsed_at = b"", 0
        else:
            self._unparsed_at = end
        return data

    async def _absorb(self, events: Sequence[object] | None = None) -> None:
        """Take in the frames the protocol parsed; write what it owes (pongs, a close reply,
        the close of a failed connection). A close is raised by `receive` once the messages
        before it have been received."""
        proto = self._proto
        for frame in proto.events_received() if events is None else events:
            if type(frame) is not Frame:
                continue  # the handshake's own event (`connect` passes what came with it)
            if self._closed is not None:
                break  # failed on an earlier frame (invalid UTF-8): the rest is discarded
            # The parser gives bytes (masked) or bytearray (unmasked), never a memoryview.
            self._frame(frame.opcode, frame.data, frame.fin)  # type: ignore[arg-type]
        owed = b"".join(proto.data_to_send())
        if proto.state is not _OPEN and self._closed is None:
            # before the await below: a task sending meanwhile must see why the socket
            # closed (the peer's own close code), not a bare "connection lost"
            self._protocol_ended()
        if owed:
            with contextlib.suppress(ConnectionClosed):
                await self._write(owed, control=True)

    def _frame(self, opcode: Opcode, data: bytes | bytearray, fin: bool) -> None:
        """One frame received (unmasked frames, from a server, come as bytearray). The
        protocol has checked the order of fragments and the size limit, and answers pings
        and closes itself."""
        if opcode is _CONT:
            self._parts += data
            if not fin:
                return
            data, text = bytes(self._parts), self._parts_text
            self._parts = bytearray()
        elif opcode is _TEXT or opcode is _BINARY:
            text = opcode is _TEXT
            if not fin:
                self._parts, self._parts_text = bytearray(data), text
                return
        else:
            if opcode is _PONG:
                waiter = self._pings.pop(bytes(data), None)
                if waiter is not None:
                    waiter.set()
            return
        if not text:
            self._messages.append(data if type(data) is bytes else bytes(data))
        elif (message := self._text(data)) is not None:
            self._messages.append(message)

    def _text(self, data: bytes | bytearray) -> str | None:
        """The text of a message; None (and the socket failed with 1007) if not UTF-8."""
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            reason = f"invalid UTF-8 in a text message: {exc.reason}"
            if self._proto.state is _OPEN:
                self._proto.fail(1007, reason)  # its close frame is written by `_absorb`
            self._set_closed(1007, reason)
            return None

    def _protocol_ended(self) -> None:
        """The protocol left OPEN while reading: the peer closed, or sent something invalid."""
        proto = self._proto
        error = proto.parser_exc
        if isinstance(error, PayloadTooBig):
            self._set_closed(1009, "message too big")
            size = (error.size or 0) + (error.current_size or 0)
            self._too_big = MessageTooBig(max(size, self.max_message_bytes + 1),
                                          self.max_message_bytes)
        elif proto.close_rcvd is not None and error is None:
            self._set_closed(proto.close_rcvd.code, proto.close_rcvd.reason)
        elif proto.close_sent is not None:
            self._set_closed(proto.close_sent.code, proto.close_sent.reason or str(error or ""))
        else:
            self._set_closed(1006, str(error or "connection lost"))

    def _set_closed(self, code: int, reason: str) -> ConnectionClosed:
        """Remember the first reason the socket closed; wake pings waiting for a pong."""
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
        for waiter in self._pings.values():  # left in place: not answered
            waiter.set()
        return self._closed

    def _check_open(self) -> None:
        if (self._closing or self._broken or self._closed is not None
                or self._proto.state is not _OPEN):
            raise ConnectionClosed(1006 if self._closed is None else self._closed.code,
                                   "socket closed")

    def _framed(self, message: str | bytes) -> bytes:
        """One message as the bytes of its frame (str as text, bytes as binary)."""
        self._check_open()
        proto = self._proto
        if type(message) is str:
            proto.send_text(message.encode())
        else:
            proto.send_binary(message)  # type: ignore[arg-type]
        return b"".join(proto.data_to_send())

    async def send(self, message: str | bytes) -> None:
        """Send one message (str as text, bytes as binary)."""
        await self._write(self._framed(message))

    @property
    def writing(self) -> bool:
        """A task is writing (`send_nowait` must not be called then)."""
        return self._sending

    @property
    def owes(self) -> bool:
        """Part of a `send_nowait` message is still to be written (by `flush`, or first thing
        by the next write)."""
        return bool(self._owed)

    def send_nowait(self, message: str | bytes) -> bool:
        """Send one message without waiting, when no task is `writing`: the socket takes what
        it can now and the rest is owed (sent first by the next write; `flush` sends it). True
        if the whole message went out. The caller makes sure the rest does get flushed."""
        if self._sending:
            raise LocalMisuse("send_nowait while another task is writing")
        data = self._framed(message)
        if self._owed:
            self._owed += data
            return False
        try:
            sent = self._stream.send_nowait(data)  # type: ignore[attr-defined]
        except _GONE:
            self._set_closed(1006, "connection lost")
            raise ConnectionClosed(1006, "connection lost") from None
        if sent == len(data):
            return True
        self._owed = data[sent:]
        return False

    async def flush(self) -> None:
        """Write what `send_nowait` left owed (waiting for the socket as long as it takes)."""
        if self._owed:
            await self._write(b"")

    async def ping(self) -> None:
        """Send a ping and return when its pong arrives (read by whichever task is receiving:
        a pong is only seen by a reader). ConnectionClosed if the socket closes first."""
        self._check_open()
        payload = next(_PING_IDS).to_bytes(8, "big")
        waiter = self._pings[payload] = trio.Event()
        try:
            self._proto.send_ping(payload)
            await self._write(b"".join(self._proto.data_to_send()))
            await waiter.wait()
            if payload in self._pings:  # woken by the close, not by the pong
                closed = self._closed or ConnectionClosed(1006, "connection lost")
                raise ConnectionClosed(closed.code, closed.reason)
        finally:
            self._pings.pop(payload, None)

    async def _write(self, data: bytes, control: bool = False) -> None:
        """Write whole frames. While another task is writing, a sender waits for it to finish;
        the receiver's control replies (`control`) are handed to it instead (the receiver must
        not wait on a peer that does not read), up to MAX_BACKLOG_BYTES."""
        # A cancellation before anything is written leaves the socket whole (a call's end
        # cancelling a send must not stop the goodbye that follows it).
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._sending:
            if control:
                if sum(map(len, self._backlog)) + len(data) > MAX_BACKLOG_BYTES:
                    self._set_closed(1008, "the peer sends control frames but does not read")
                    raise ConnectionClosed(1008, "control replies pile up")
                self._backlog.append(data)
                return
            await self._wait_writer()
        if self._broken:
            raise ConnectionClosed(1006, "a send was cut off mid-frame")
        self._sending = True
        if self._owed:  # the rest of a send_nowait goes first
            data, self._owed = self._owed + data, b""
        try:
            await self._stream.send_all(data)
            while self._backlog:
                data = b"".join(self._backlog)
                self._backlog.clear()
                await self._stream.send_all(data)
        except (*_GONE, trio.BusyResourceError):
            self._set_closed(1006, "connection lost")
            raise ConnectionClosed(1006, "connection lost") from None
        except BaseException:  # cancelled: part of a frame may be out, the stream is unusable
            self._broken = True
            self._backlog.clear()
            raise
        finally:
            self._sending = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None

    async def _wait_writer(self) -> None:
        """Wait until no task is writing."""
        while self._sending:
            if self._write_done is None:
                self._write_done = trio.Event()
            await self._write_done.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close once: send a close frame (or the one a protocol error left owed), give the
        peer up to `close_wait` to answer (so the frame is not lost to a reset), then close
        TCP. Never raises for a gone peer."""
        if self._closing:
            return
        self._closing = True
        proto = self._proto
        try:
            await self._wait_writer()  # another task's send (being cancelled, usually) first
            if self._broken:
                return  # no close frame can follow half a frame: just close TCP
            if proto.state is _OPEN:
                proto.send_close(code, reason)
            owed = b"".join(proto.data_to_send())
            if owed or self._owed:
                await self._write(owed)
            if proto.state is _CLOSING and proto.close_rcvd is None and not proto.eof_sent:
                with trio.move_on_after(self.close_wait):
                    await self._await_close_reply()
        except (ConnectionClosed, trio.BusyResourceError, *_GONE):
            pass
        finally:
            self._set_closed(code, reason)
            await self._stream.aclose()

    async def _await_close_reply(self) -> None:
        proto = self._proto
        while proto.close_rcvd is None and proto.state is _CLOSING:
            if self._unparsed:
                await self._yield_if_due()
                data = self._next_slice()
            else:
                data = await self._stream.receive_some(RECEIVE_BYTES)
                self._resumed = (self._direct.resumed if self._direct is not None
                                 else perf_counter())
                if not data:
                    return
                if len(data) > WHOLE_BYTES:
                    self._unparsed, self._unparsed_at = data, FEED_BYTES
                    data = data[:FEED_BYTES]
            proto.receive_data(data)
            proto.events_received()  # messages after our close are discarded
            proto.data_to_send()  # and not answered (pongs): nothing piles up


class HandshakeError(ProtocolError):
    """The request is not a valid WebSocket opening handshake (server side), or the server did
    not accept ours (client side: `status` is its HTTP status, if it answered one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerHandshake:
    """The server side of the opening handshake, fed the bytes the front door already read
    (the request head, and anything the client sent after it).

    Only the head is parsed here. What followed it is not looked at until `accept` (the caller
    checks the request first: nothing is parsed or answered for a request that is refused), and
    then under the message size limit from its first byte."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self._stream = stream
        end = head_length(data)
        self._head, self._rest = (data, b"") if end is None else (data[:end], data[end:])
        self._proto, request = _parse_request(self._head, 0)  # sees no frame
        self._response = self._proto.accept(request)
        if self._proto.handshake_exc is not None:
            raise HandshakeError(str(self._proto.handshake_exc))
        self.request = request

    def header(self, name: bytes) -> str | None:
        """A request header's value (name in lower case); None if absent, or if given more than
        once (an ambiguous header counts as none: a signature sent twice is no signature)."""
        values = self.request.headers.get_all(name.decode())
        return values[0] if len(values) == 1 else None

    async def accept(self, max_message_bytes: int) -> WebSocket:
        """Answer 101 and return the open WebSocket (which parses the bytes that came with the
        request, as it parses every later one)."""
        # The protocol that checked the request has its frame parser waiting already, under
        # the default limit: a fresh one, given the limit before it sees the head, holds the
        # limit from the first frame on (the head is a few hundred bytes; once per call).
        proto, request = _parse_request(self._head, max_message_bytes)
        proto.send_response(proto.accept(request))
        await self._send(b"".join(proto.data_to_send()))
        return WebSocket(self._stream, proto, unparsed=self._rest)

    async def reject(self, status: int) -> None:
        """Answer `status` (the caller closes the stream)."""
        response = self._proto.reject(status, "")
        self._proto.send_response(response)
        await self._send(b"".join(self._proto.data_to_send()))

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (*_GONE, trio.BusyResourceError):
            raise ConnectionClosed(1006, "connection lost during the handshake") from None


def _parse_request(head: bytes, max_message_bytes: int | None) -> tuple[ServerProtocol, Request]:
    """A server protocol that has parsed a request head, and the request; HandshakeError if it
    is not one."""
    proto = ServerProtocol(max_size=max_message_bytes, logger=_protocol_log)
    proto.receive_data(head)
    request = next((e for e in proto.events_received() if isinstance(e, Request)), None)
    if request is None:
        raise HandshakeError(str(proto.handshake_exc or "incomplete WebSocket upgrade request"))
    return proto, request


async def connect(url: str, headers: list[tuple[str, str]] | None = None, *,
                  max_message_bytes: int = 1 << 20,
                  close_wait: float = CLOSE_WAIT_SECONDS) -> WebSocket:
    """Open a client WebSocket to a ws:// URL (wss:// goes through TLS). HandshakeError when
    the server refuses the upgrade (the status is in the message); OSError when it cannot be
    reached."""
    try:
        uri = parse_uri(url)
    except InvalidURI:
        raise HandshakeError("not a ws:// or wss:// URL") from None
    stream: trio.abc.Stream = DirectStream(await trio.open_tcp_stream(uri.host, uri.port))
    if uri.secure:
        stream = trio.SSLStream(stream, ssl.create_default_context(),
                                server_hostname=uri.host, https_compatible=True)
    try:
        proto = ClientProtocol(uri, max_size=max_message_bytes, logger=_protocol_log)
        request = proto.connect()
        for name, value in headers or []:
            request.headers[name] = value
        proto.send_request(request)
        await stream.send_all(b"".join(proto.data_to_send()))
        head: bytes | None = b""  # the response head so far, until its end is seen
        rest: bytes | bytearray = b""  # what came after a 101's head, for the WebSocket
        while proto.state is State.CONNECTING:
            data = await stream.receive_some(RECEIVE_BYTES)
            if data and head is not None:
                end = head_length(head + data)
                if end is None:
                    head += data
                else:  # frames behind a 101 are parsed by the WebSocket, slice by slice
                    cut = end - len(head)
                    if (head + data[:cut]).startswith(b"HTTP/1.1 101"):
                        data, rest = data[:cut], data[cut:]
                    head = None
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            if proto.handshake_exc is not None:
                error = proto.handshake_exc
                status = error.response.status_code if isinstance(error, InvalidStatus) else None
                raise HandshakeError(f"upgrade refused with HTTP {status}" if status else
                                     f"bad handshake response: {error}", status)
            if not data and proto.state is State.CONNECTING:
                raise HandshakeError("connection closed during the WebSocket handshake")
        websocket = WebSocket(stream, proto, close_wait, unparsed=rest)
        await websocket._absorb(proto.events_received())  # the handshake's event
        return websocket
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise

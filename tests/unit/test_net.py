"""voxd's own WebSocket path and request-head routing, on in-memory streams."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import tracemalloc
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.request_heads import requests
from voxd.net.request_head import HeadError, head_length, parse_head
from voxd.net.stream import DirectStream
from voxd.net.websocket import (
    ConnectionClosed,
    HandshakeError,
    MessageTooBig,
    ServerHandshake,
    WebSocket,
    connect,
)

UPGRADE = (b"GET /media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nX-Twilio-Signature: abc\r\n\r\n")


def test_parse_head_routes_upgrades_and_plain_requests():
    head = parse_head(UPGRADE)
    assert (head.method, head.path, head.websocket) == ("GET", "/media-stream", True)
    plain = parse_head(b"POST /twilio/voice?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (plain.method, plain.path, plain.websocket) == ("POST", "/twilio/voice", False)
    with pytest.raises(HeadError, match=r"not an HTTP/1\.x request line"):
        parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")  # a TLS hello


@given(requests())
def test_parse_head_on_request_shaped_input(example):
    """Heads as clients and scanners send them, mostly mangled (tests/request_heads.py): a
    well-formed one is parsed into exactly its routing facts, one that must be refused raises
    HeadError saying why, and whatever else comes is one or the other, never another
    exception."""
    data = example.data
    try:
        head = parse_head(data[:head_length(data)])
    except HeadError as exc:
        assert example.head is None, f"{example!r} refused: {exc}"
        assert example.error is None or example.error in str(exc), (example, exc)
        return
    assert example.error is None, f"{example!r} accepted as {head}"
    if example.head is not None:
        assert head == example.head
    assert head.path and head.method.isalpha() and head.method.isascii()
    assert not (head.chunked and head.content_length) and 0 <= head.content_length < 10**12


class Peer:
    """The client end, driven by hand with wsproto."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    def upgrade(self) -> bytes:
        return self.ws.send(Request(host="x", target="/media-stream",
                                    extra_headers=[(b"x-twilio-signature", b"sig")]))

    async def send(self, event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def events(self) -> list:
        self.ws.receive_data(await self.stream.receive_some(65536))
        return list(self.ws.events())


async def open_pair(max_message_bytes: int = 1000):
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    handshake = ServerHandshake(server_stream, peer.upgrade())
    assert handshake.header(b"x-twilio-signature") == "sig"
    websocket = await handshake.accept(max_message_bytes)
    assert isinstance((await peer.events())[0], AcceptConnection)
    return websocket, peer


async def test_messages_both_ways_whole_or_fragmented():
    websocket, peer = await open_pair()
    await peer.send(TextMessage("hello"))
    assert await websocket.receive() == "hello"
    await peer.send(BytesMessage(b"ab", message_finished=False))
    await peer.send(BytesMessage(b"cd"))
    assert await websocket.receive() == b"abcd"
    await websocket.send("out")
    assert [e.data for e in await peer.events()] == ["out"]


async def test_a_send_cancelled_before_writing_leaves_the_socket_usable():
    """A call's end cancels a send that had not started writing: the goodbye after it (the
    assistant told the call is over) must still go out."""
    websocket, peer = await open_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await websocket.send("never written")
    await websocket.send("goodbye")
    assert [e.data for e in await peer.events()] == ["goodbye"]


async def test_pings_are_answered_and_closes_echoed():
    websocket, peer = await open_pair()
    await peer.send(Ping(b"p1"))
    await peer.send(TextMessage("after"))
    assert await websocket.receive() == "after"
    assert any(isinstance(e, Pong) and e.payload == b"p1" for e in await peer.events())
    await peer.send(CloseConnection(code=1000, reason="bye"))
    with pytest.raises(ConnectionClosed, match="1000"):
        await websocket.receive()
    assert any(isinstance(e, CloseConnection) for e in await peer.events())
    with pytest.raises(ConnectionClosed):
        await websocket.send("too late")


async def test_oversized_messages_close_with_1009_even_when_fragmented():
    for fragments in ([b"x" * 1001], [b"x" * 600, b"x" * 600]):
        websocket, peer = await open_pair(max_message_bytes=1000)
        for i, part in enumerate(fragments):
            await peer.send(BytesMessage(part, message_finished=i == len(fragments) - 1))
        with pytest.raises(MessageTooBig, match="limit of 1000"):
            await websocket.receive()
        with trio.fail_after(2):
            await websocket.close(1009)
        closes = [e for e in await peer.events() if isinstance(e, CloseConnection)]
        assert closes and closes[0].code == 1009


async def test_close_waits_for_the_answer_then_closes_tcp():
    websocket, peer = await open_pair()

    async def answer() -> None:
        events = await peer.events()
        assert isinstance(events[0], CloseConnection) and events[0].code == 1000
        await peer.send(events[0].response())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with trio.fail_after(1):
            await websocket.close()
    assert await peer.stream.receive_some(10) == b""  # TCP closed after the close handshake


async def test_a_protocol_violation_closes_with_its_code():
    websocket, peer = await open_pair()
    await peer.stream.send_all(b"\x8f\x80\x00\x00\x00\x00")  # reserved opcode 0xF, masked
    with pytest.raises(ConnectionClosed, match="1002"):
        await websocket.receive()


def test_a_bad_upgrade_is_a_handshake_error():
    server_stream, _ = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeError):
        ServerHandshake(server_stream, UPGRADE.replace(b"Sec-WebSocket-Key", b"X-Nothing"))


async def wsproto_server(nursery, handler) -> str:
    """A WebSocket server framed by wsproto (an independent implementation) on loopback;
    `handler(stream, conn)` runs after it accepted. Returns its ws:// URL."""
    async def serve(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        while True:
            conn.receive_data(await stream.receive_some(65536))
            request = next((e for e in conn.events() if isinstance(e, Request)), None)
            if request is not None:
                break
        if request.target == "/refuse":
            await stream.send_all(conn.send(RejectConnection(status_code=401)))
            await stream.aclose()
            return
        await stream.send_all(conn.send(AcceptConnection()))
        await handler(stream, conn)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_client_pings_messages_and_a_close_right_behind_the_last_message(nursery):
    async def handler(stream, conn) -> None:
        while True:
            conn.receive_data(await stream.receive_some(65536))
            for event in conn.events():
                if isinstance(event, Ping):
                    await stream.send_all(conn.send(event.response()))
                if isinstance(event, TextMessage) and event.data == "bye":
                    # the last message and the close in one write: the message still counts
                    await stream.send_all(conn.send(BytesMessage(b"\x00\x01")) +
                                          conn.send(CloseConnection(code=1000)))
                    return

    url = await wsproto_server(nursery, handler)
    ws = await connect(url + "/ok", [("X-Tenant", "acme")])
    received: list = []

    async def reader() -> None:
        with pytest.raises(ConnectionClosed, match="1000"):
            while True:
                received.append(await ws.receive())

    with trio.fail_after(1):
        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            await ws.ping()  # answered by the server, the pong seen by the reader
            await ws.send("bye")
    assert received == [b"\x00\x01"]
    await ws.close()


async def test_client_reports_the_status_of_a_refused_upgrade(nursery):
    url = await wsproto_server(nursery, None)
    with pytest.raises(HandshakeError) as refused:
        await connect(url + "/refuse")
    assert refused.value.status == 401


async def upgrade_request(stream: trio.SocketStream) -> WSConnection:
    """A server side (wsproto) that has read the client's upgrade request from `stream`."""
    conn = WSConnection(ConnectionType.SERVER)
    while True:
        conn.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, Request) for e in conn.events()):
            return conn


async def test_client_gets_frames_that_came_with_the_101_and_answers_their_pings(nursery):
    url_holder: dict = {}
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        conn = await upgrade_request(stream)
        # the 101, a ping and a greeting in one write
        await stream.send_all(conn.send(AcceptConnection()) + conn.send(Ping(b"hi")) +
                              conn.send(TextMessage("welcome")))
        events: list = []
        while not any(isinstance(e, TextMessage) for e in events):
            conn.receive_data(await stream.receive_some(65536))
            events += list(conn.events())
        url_holder["events"] = events
        done.set()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    ws = await connect(f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/")
    with trio.fail_after(1):
        assert await ws.receive() == "welcome"
        await ws.send("thanks")
        await done.wait()
    kinds = [(type(e).__name__, getattr(e, "payload", getattr(e, "data", None)))
             for e in url_holder["events"]]
    assert kinds == [("Pong", b"hi"), ("TextMessage", "thanks")]
    await ws.close()


async def test_invalid_utf8_fails_after_the_messages_before_it():
    websocket, peer = await open_pair()
    await peer.stream.send_all(peer.ws.send(TextMessage("first")) +
                               b"\x81\x82\x00\x00\x00\x00\xff\xfe")  # masked text, not UTF-8
    assert await websocket.receive() == "first"
    with pytest.raises(ConnectionClosed, match="1007"):
        await websocket.receive()
    with pytest.raises(ConnectionClosed):
        await websocket.ping()  # closed: refused at once, never left waiting for a pong


async def test_a_send_cut_off_mid_frame_makes_the_socket_refuse_further_sends():
    server_stream, client_stream = trio.testing.lockstep_stream_pair()
    peer = Peer(client_stream)
    handshake = ServerHandshake(server_stream, peer.upgrade())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.events)
        websocket = await handshake.accept(1000)
    with trio.move_on_after(0.05):
        await websocket.send("nobody reads this")  # lockstep: blocks until read
    with pytest.raises(ConnectionClosed):
        await websocket.send("end-of-call")


# -- bytes that came with the upgrade head, and the size limit from the first byte ----------


async def test_frames_sent_with_the_head_are_not_parsed_or_answered_before_a_refusal():
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    data = (peer.upgrade() + client_frames(lambda c: c.send_ping(b"early"))
            + b"\x81\xff" + (1 << 20).to_bytes(8, "big") + b"mask" + b"x" * 100)
    handshake = ServerHandshake(server_stream, data)  # and the start of a 1 MiB text frame
    await handshake.reject(403)
    await server_stream.aclose()
    answer = b""
    while chunk := await client_stream.receive_some(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 ")  # nothing (no pong) before the refusal
    head_end = answer.index(b"\r\n\r\n") + 4
    length = int(next(line.split(b":")[1] for line in answer[:head_end].split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert len(answer) == head_end + length  # and nothing after it


async def test_frames_sent_with_the_head_are_answered_after_the_101_in_order():
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    data = peer.upgrade() + client_frames(lambda c: (c.send_ping(b"early"), c.send_text(b"one"),
                                                     c.send_text(b"two")))
    websocket = await ServerHandshake(server_stream, data).accept(1000)
    with trio.fail_after(2):
        assert await websocket.receive() == "one"
        assert await websocket.receive() == "two"
        events = await peer.events()
        while not any(isinstance(e, Pong) for e in events):
            events += await peer.events()
    assert isinstance(events[0], AcceptConnection)
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"early"]


@pytest.mark.parametrize("with_head", [True, False])
async def test_the_size_limit_holds_from_the_first_frame(with_head):
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    big = client_frames(lambda c: c.send_text(b"x" * 5000))  # over 1000, under 1 MiB
    handshake = ServerHandshake(server_stream, peer.upgrade() + (big if with_head else b""))
    websocket = await handshake.accept(1000)
    if not with_head:
        await client_stream.send_all(big)
    with pytest.raises(MessageTooBig, match="limit of 1000"), trio.fail_after(2):
        await websocket.receive()


# -- fairness: a flood of tiny frames never holds the event loop for long ------------------


class LongestStep(trio.abc.Instrument):
    """The CPU time of the longest step (run between two yields) of the tasks named `name`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.longest = 0.0
        self.steps = 0
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.steps += 1
            self.longest = max(self.longest, time.thread_time() - self._started)


FAIR_BOUND_SECONDS = 0.008
"""The longest a receiving task may run at once in the tests below: the code yields after
~0.5 ms plus one slice of parsing (~0.6 ms); before it did, one read of 64 KiB took 20-40 ms
here."""


QUIET = logging.getLogger("tests.unit.test_net.protocol")
"""The protocols' own per-frame lines stay out, whatever level an earlier test left logging
at (at DEBUG they cost these flood tests seconds and megabytes)."""
QUIET.setLevel(logging.WARNING)


def direct_pair() -> tuple[WebSocket, socket.socket]:
    """voxd's server-side WebSocket (open) on a DirectStream, and the raw client socket."""
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    stream = DirectStream(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    return WebSocket(stream, ServerProtocol(state=State.OPEN, max_size=1000, logger=QUIET)), b


def client_frames(build) -> bytes:
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, logger=QUIET)
    build(client)
    return b"".join(client.data_to_send())


async def receive_under_watch(websocket: WebSocket, count: int) -> tuple[LongestStep, int, list]:
    """Receive `count` messages in a task of its own, its steps timed, while another task
    counts how often it gets to run."""
    messages: list = []
    ticks = 0
    watch = LongestStep("flooded_receiver")

    async def flooded_receiver() -> None:
        while len(messages) < count:
            messages.append(await websocket.receive())

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    trio.lowlevel.add_instrument(watch)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                await trio.lowlevel.checkpoint()
                async with trio.open_nursery() as inner:
                    inner.start_soon(flooded_receiver)
                nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert watch.steps > 0
    return watch, ticks, messages


async def test_a_flood_of_pings_in_one_read_does_not_hold_the_loop():
    websocket, client = direct_pair()
    pings = client_frames(lambda c: [c.send_ping(b"") for _ in range(10_900)])  # 65,400 bytes
    client.sendall(pings + client_frames(lambda c: c.send_text(b"end")))
    watch, ticks, messages = await receive_under_watch(websocket, 1)
    assert messages == ["end"]
    assert watch.longest < FAIR_BOUND_SECONDS, f"{watch.longest * 1000:.1f} ms at once"
    assert ticks >= 5
    received = b""  # every ping was answered
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while chunk := client.recv(1 << 20):
            received += chunk
    assert received == b"\x8a\x00" * 10_900
    client.close()


async def test_a_flood_of_tiny_messages_in_one_read_does_not_hold_the_loop():
    websocket, client = direct_pair()
    count = 65_000 // 7  # one-byte masked text frames: 7 bytes each
    client.sendall(client_frames(lambda c: [c.send_text(b"x") for _ in range(count)]))
    watch, ticks, messages = await receive_under_watch(websocket, count)
    assert messages == ["x"] * count
    assert watch.longest < FAIR_BOUND_SECONDS, f"{watch.longest * 1000:.1f} ms at once"
    assert ticks >= 5
    client.close()


async def test_a_fragmented_message_of_empty_frames_costs_no_memory_per_frame():
    websocket, client = direct_pair()
    frames = client_frames(lambda c: [c.send_text(b"a", fin=False),
                                      *(c.send_continuation(b"", fin=False)
                                        for _ in range(100_000)),
                                      c.send_continuation(b"b", fin=True)])
    received: list = []

    async def read() -> None:
        received.append(await websocket.receive())

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.to_thread.run_sync(client.sendall, frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == ["ab"]
    assert peak < 400_000  # the frames are 600 kB; a list of 100,000 parts alone is 800 kB
    client.close()


def test_a_header_given_twice_counts_as_absent():
    server_stream, _ = trio.testing.memory_stream_pair()
    twice = UPGRADE.replace(b"X-Twilio-Signature: abc\r\n",
                            b"X-Twilio-Signature: abc\r\nX-Twilio-Signature: abc\r\n")
    handshake = ServerHandshake(server_stream, twice)
    assert handshake.header(b"x-twilio-signature") is None
    assert handshake.header(b"sec-websocket-version") == "13"
    assert handshake.header(b"x-absent") is None


async def test_a_flood_behind_the_101_does_not_hold_the_loop_either(nursery):
    async def serve(stream: trio.SocketStream) -> None:
        conn = await upgrade_request(stream)
        # the 101, 30,000 empty pings (2 bytes each, unmasked) and a greeting in one write
        await stream.send_all(conn.send(AcceptConnection()) + b"\x89\x00" * 30_000
                              + conn.send(TextMessage("welcome")))
        while await stream.receive_some(65536):  # the pongs
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
    greeting: list = []
    watch = LongestStep("flooded_client")

    async def flooded_client() -> None:
        ws = await connect(url)
        greeting.append(await ws.receive())
        await ws.close()

    trio.lowlevel.add_instrument(watch)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(flooded_client)
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert greeting == ["welcome"]
    assert watch.longest < FAIR_BOUND_SECONDS, f"{watch.longest * 1000:.1f} ms at once"

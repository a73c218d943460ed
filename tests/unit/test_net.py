"""voxd's own WebSocket path and request-head routing, on in-memory streams."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
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

from voxd.net.request_head import HeadError, parse_head
from voxd.net.websocket import (
    ConnectionClosed,
    HandshakeError,
    MessageTooBig,
    ServerHandshake,
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


@given(st.binary(max_size=300))
def test_parse_head_takes_any_bytes(data):
    try:
        head = parse_head(data)
    except HeadError:
        return
    assert head.path and head.method.isalpha()


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


async def test_client_gets_frames_that_came_with_the_101_and_answers_their_pings(nursery):
    url_holder: dict = {}
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        while True:
            conn.receive_data(await stream.receive_some(65536))
            if any(isinstance(e, Request) for e in conn.events()):
                break
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

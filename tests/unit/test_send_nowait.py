"""WebSocket.send_nowait (voxd/net/websocket.py): what the socket does not take at once is owed,
goes out before anything else, and the peer sees every message whole and in order."""

from __future__ import annotations

import socket

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from voxd.net.stream import DirectStream
from voxd.net.websocket import WebSocket


def open_pair() -> tuple[WebSocket, trio.SocketStream]:
    """voxd's server-side WebSocket (already open) and the raw client end of its socket."""
    a, b = socket.socketpair()
    server = WebSocket(DirectStream(trio.SocketStream(trio.socket.from_stdlib_socket(a))),
                       ServerProtocol(state=State.OPEN))
    return server, trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def read_messages(stream: trio.SocketStream, count: int) -> list[str]:
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN)
    messages: list[str] = []
    while len(messages) < count:
        client.receive_data(await stream.receive_some(65536))
        messages += [e.data.decode() for e in client.events_received() if isinstance(e, Frame)]
    return messages


async def test_owed_bytes_go_out_first_and_every_message_arrives_whole_in_order():
    server, client = open_pair()
    sent: list[str] = []
    whole = True
    while whole:  # the client does not read yet: the socket fills, then a frame is cut
        sent.append(f"{len(sent):06d}" + "x" * 250)
        whole = server.send_nowait(sent[-1])
        assert len(sent) < 100_000
    assert server.owes and not server.writing
    sent.append("after the cut")  # owed behind the rest, not written ahead of it
    assert server.send_nowait(sent[-1]) is False
    received: list[str] = []

    async def read() -> None:
        received.extend(await read_messages(client, len(sent) + 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await server.flush()
        assert not server.owes
        sent.append("sent normally")
        await server.send(sent[-1])
    assert received == sent


async def test_a_send_waits_behind_nothing_and_flush_without_debt_returns_at_once():
    server, client = open_pair()
    assert server.send_nowait("one") is True and not server.owes
    with trio.fail_after(1):
        await server.flush()
        await server.send("two")
        assert await read_messages(client, 2) == ["one", "two"]

"""The per-message cost of the media path's transport pieces, each against what it replaced.

Run: .venv/bin/python bench/transport.py [--messages 20000]

- socket: one send and one receive of a 300-byte message over a connected socket pair, through
  trio's SocketStream and through voxd's DirectStream (voxd/net/stream.py);
- framing: a Twilio-sized text frame parsed (masked, from the client) and built (to the
  client), and a 160-byte binary frame built (masked, to an assistant) and parsed (from it),
  with wsproto and with websockets' sans-I/O protocol (voxd/net/websocket.py);
- receive: voxd's whole receiving path (`WebSocket.receive` on a `DirectStream`) for one
  Twilio-sized message that arrives after the receiver waited for it (the per-frame path of a
  call), and for a flood: 64 KiB of empty pings, or of one-byte text messages, in one read,
  with the longest the receiving task ran without yielding (its CPU time per step).
Figures are microseconds per operation on this machine (noisy: compare within one run).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing
from websockets.client import ClientProtocol
from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.net.stream import DirectStream
from voxd.net.websocket import WebSocket

TEXT = ('{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"2",'
        '"timestamp":"20","payload":"' + "A" * 216 + '"},"streamSid":"MZ' + "0" * 32 + '"}')
AUDIO = bytes(160)


def per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


async def socket_round(kind: str, n: int) -> float:
    a, b = socket.socketpair()
    streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in (a, b)]
    if kind == "DirectStream":
        streams = [DirectStream(s) for s in streams]  # type: ignore[misc]
    sender, receiver = streams
    data = b"x" * 300
    start = time.perf_counter()
    for _ in range(n):
        await sender.send_all(data)
        await receiver.receive_some(65536)
    elapsed = (time.perf_counter() - start) / n * 1e6
    for s in streams:
        await s.aclose()
    return elapsed


def wsproto_ops(n: int) -> list[float]:
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    masked_text = client.send(Message(data=TEXT))
    plain_binary = server.send(Message(data=AUDIO))

    def parse_text() -> None:
        server.receive_data(masked_text)
        list(server.events())

    def parse_binary() -> None:
        client.receive_data(plain_binary)
        list(client.events())

    return [per_call(parse_text, n), per_call(lambda: server.send(Message(data=TEXT)), n),
            per_call(lambda: client.send(Message(data=AUDIO)), n), per_call(parse_binary, n)]


def websockets_ops(n: int) -> list[float]:
    server, client = Protocol(Side.SERVER), Protocol(Side.CLIENT)
    client.send_text(TEXT.encode())
    masked_text = b"".join(client.data_to_send())
    server.send_binary(AUDIO)
    plain_binary = b"".join(server.data_to_send())

    def parse_text() -> None:
        server.receive_data(masked_text)
        server.events_received()

    def build_text() -> None:
        server.send_text(TEXT.encode())
        server.data_to_send()

    def build_binary() -> None:
        client.send_binary(AUDIO)
        client.data_to_send()

    def parse_binary() -> None:
        client.receive_data(plain_binary)
        client.events_received()

    return [per_call(f, n) for f in (parse_text, build_text, build_binary, parse_binary)]


def receiving_pair() -> tuple[WebSocket, socket.socket]:
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    stream = DirectStream(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    return WebSocket(stream, ServerProtocol(state=State.OPEN, max_size=65536)), b


def client_bytes(*messages: bytes, pings: int = 0) -> bytes:
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN)
    for _ in range(pings):
        client.send_ping(b"")
    for message in messages:
        client.send_text(message)
    return b"".join(client.data_to_send())


class Steps(trio.abc.Instrument):
    """The longest and the total CPU time of the steps of the tasks named `name`."""

    def __init__(self, name: str) -> None:
        self.name, self.longest, self.total, self._started = name, 0.0, 0.0, 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            step = time.thread_time() - self._started
            self.total += step
            self.longest = max(self.longest, step)


async def receive_round(n: int) -> float:
    """The receiving task's CPU per message, each message sent once it waits for it."""
    websocket, client = receiving_pair()
    frame = client_bytes(TEXT.encode())
    watch = Steps("waiting_receiver")

    async def waiting_receiver() -> None:
        for _ in range(n):
            await websocket.receive()

    trio.lowlevel.add_instrument(watch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting_receiver)
        for _ in range(n):
            await trio.testing.wait_all_tasks_blocked()  # the receiver waits for the socket
            client.send(frame)
    trio.lowlevel.remove_instrument(watch)
    client.close()
    return watch.total / n * 1e6


async def flood(kind: str) -> tuple[float, float]:
    """(us per frame, longest ms without yielding) for 64 KiB of tiny frames in one read."""
    websocket, client = receiving_pair()
    if kind == "pings":
        count, data = 10_900, client_bytes(b"end", pings=10_900)
    else:
        count = 65_000 // 7
        data = client_bytes(*[b"x"] * count)
    client.sendall(data)
    wanted = 1 if kind == "pings" else count
    watch = Steps("flooded_receiver")

    async def flooded_receiver() -> None:
        for _ in range(wanted):
            await websocket.receive()

    trio.lowlevel.add_instrument(watch)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flooded_receiver)
    elapsed = time.perf_counter() - start
    trio.lowlevel.remove_instrument(watch)
    client.close()
    return elapsed / count * 1e6, watch.longest * 1000


async def main(n: int) -> None:
    print(f"{'socket send + receive':28}{'us':>8}")
    for kind in ("trio SocketStream", "DirectStream"):
        print(f"{kind:28}{await socket_round(kind, n):8.2f}")
    print()
    print(f"{'framing':14}{'text in':>9}{'text out':>9}{'bin out':>9}{'bin in':>9}{'total':>9}")
    for name, ops in (("wsproto", wsproto_ops(n)), ("websockets", websockets_ops(n))):
        print(f"{name:14}" + "".join(f"{v:9.2f}" for v in ops) + f"{sum(ops):9.2f}")
    print()
    print(f"{'receive (WebSocket on DirectStream)':44}{'us':>8}")
    print(f"{'one message after a wait (receiver CPU)':44}{await receive_round(n):8.2f}")
    print()
    print(f"{'flood: 64 KiB in one read':28}{'us/frame':>10}{'longest ms':>12}")
    for kind in ("pings", "1-byte messages"):
        per_frame, longest = await flood(kind)
        print(f"{kind:28}{per_frame:10.2f}{longest:12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    trio.run(main, parser.parse_args().messages)

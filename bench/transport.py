"""The per-message cost of the media path's transport pieces, each against what it replaced.

Run: .venv/bin/python bench/transport.py [--messages 20000]

- socket: one send and one receive of a 300-byte message over a connected socket pair, through
  trio's SocketStream and through voxd's DirectStream (voxd/net/stream.py);
- framing: a Twilio-sized text frame parsed (masked, from the client) and built (to the
  client), and a 160-byte binary frame built (masked, to an assistant) and parsed (from it),
  with wsproto and with websockets' sans-I/O protocol (voxd/net/websocket.py).
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
from websockets.protocol import Protocol, Side
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.net.stream import DirectStream

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


async def main(n: int) -> None:
    print(f"{'socket send + receive':28}{'us':>8}")
    for kind in ("trio SocketStream", "DirectStream"):
        print(f"{kind:28}{await socket_round(kind, n):8.2f}")
    print()
    print(f"{'framing':14}{'text in':>9}{'text out':>9}{'bin out':>9}{'bin in':>9}{'total':>9}")
    for name, ops in (("wsproto", wsproto_ops(n)), ("websockets", websockets_ops(n))):
        print(f"{name:14}" + "".join(f"{v:9.2f}" for v in ops) + f"{sum(ops):9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    trio.run(main, parser.parse_args().messages)

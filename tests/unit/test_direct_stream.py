"""DirectStream (voxd/net/stream.py): plain system calls, still a well-behaved trio stream."""

from __future__ import annotations

import socket

import pytest
import trio

from voxd.net.stream import FAIRNESS, DirectStream


def pair() -> tuple[DirectStream, DirectStream]:
    a, b = socket.socketpair()
    return tuple(DirectStream(trio.SocketStream(trio.socket.from_stdlib_socket(s)))
                 for s in (a, b))  # type: ignore[return-value]


async def test_bytes_arrive_whole_also_past_the_socket_buffer():
    sender, receiver = pair()
    data = bytes(range(256)) * 40000  # 10 MB: send_all must wait for room many times
    received = bytearray()

    async def read() -> None:
        while len(received) < len(data):
            received.extend(await receiver.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await sender.send_all(data)
    assert received == data


async def test_a_flooded_reader_still_lets_other_tasks_run():
    sender, receiver = pair()
    await sender.send_all(b"x" * 60000)  # every receive below completes without waiting
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(4 * FAIRNESS):
            await receiver.receive_some(10)
        nursery.cancel_scope.cancel()
    assert ticks >= 3


async def test_waits_are_cancellable_and_closed_streams_say_so():
    sender, receiver = pair()
    with trio.move_on_after(0.05) as scope:
        await receiver.receive_some()
    assert scope.cancelled_caught
    await receiver.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the peer is gone: a send fails (at once, or at the next one)
            await sender.send_all(b"x" * 65536)
    assert await sender.receive_some() == b""


async def test_a_cancelled_task_does_not_send():
    sender, receiver = pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await sender.send_all(b"never")
    await sender.send_all(b"after")
    assert await receiver.receive_some() == b"after"


async def test_a_stream_closed_while_it_yields_never_touches_a_reused_descriptor():
    for _ in range(20):  # trio runs the two tasks in either order: cover both
        reader, _writer = pair()
        reader._streak = FAIRNESS - 1  # its next receive yields before it reads
        others: list[socket.socket] = []
        outcome: list[object] = []

        async def read(reader: DirectStream = reader, outcome: list = outcome) -> None:
            try:
                outcome.append(await reader.receive_some())
            except trio.ClosedResourceError:
                outcome.append("closed")

        async def close_and_reuse(reader: DirectStream = reader,
                                  others: list = others) -> None:
            await reader.aclose()
            others.extend(socket.socketpair())  # likely takes the freed descriptor number
            others[1].send(b"another call's audio")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(close_and_reuse)
        assert outcome == ["closed"]
        assert others[0].recv(100) == b"another call's audio"  # nobody else took it
        for s in [*others, _writer.socket]:
            s.close()


async def test_send_nowait_writes_what_the_socket_takes_and_never_waits():
    sender, receiver = pair()
    written = sender.send_nowait(b"x" * 100)
    assert written == 100
    total = 0
    while (n := sender.send_nowait(b"y" * 65536)) > 0:  # the peer does not read: it fills
        total += n
    assert sender.send_nowait(b"z") == 0  # full: nothing written, no wait
    got = 0
    while got < 100 + total:
        got += len(await receiver.receive_some())
    assert got == 100 + total
    await sender.aclose()
    with pytest.raises(trio.ClosedResourceError):
        sender.send_nowait(b"after close")

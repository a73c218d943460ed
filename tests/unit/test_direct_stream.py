"""DirectStream (voxd/net/stream.py): plain system calls, still a well-behaved trio stream."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from voxd.net.stream import FAIR_SECONDS, DirectStream


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


def spin(seconds: float) -> None:
    """Use `seconds` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_flooded_reader_yields_by_time_not_by_count():
    sender, receiver = pair()
    await sender.send_all(b"x" * 60000)  # every receive below completes without waiting
    ticks = 0
    longest = 0.0
    started = 0.0

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal started
            if task.name.endswith("reader"):
                started = time.thread_time()

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal longest
            if task.name.endswith("reader"):
                longest = max(longest, time.thread_time() - started)

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def reader() -> None:
        for _ in range(100):  # each read's bytes take 0.3 ms of work
            await receiver.receive_some(10)
            spin(0.0003)

    instrument = Steps()
    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(instrument)
    # FAIR_SECONDS (0.5 ms) plus one read's work; by count (every 32 reads) it was ~10 ms.
    assert longest < FAIR_SECONDS + 0.0003 + 0.003, f"{longest * 1000:.1f} ms at once"
    assert ticks >= 10


async def test_a_few_reads_that_do_not_wait_do_not_yield():
    sender, receiver = pair()
    await sender.send_all(b"x" * 600)
    receiver.resumed = time.perf_counter() + 60  # no yield is due for a minute
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(50):  # never waits: the data is there and no read empties the socket
            await receiver.receive_some(10)
        assert not ran  # the common path pays no scheduler round trip
        nursery.cancel_scope.cancel()


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
        reader.resumed -= 1.0  # its next receive yields before it reads
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

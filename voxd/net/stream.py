"""A TCP connection read and written with plain non-blocking system calls: the media path's
transport.

trio's `SocketStream` goes back to the scheduler after every send and every receive, even when
the socket was ready: a send plus a receive of one small message costs ~13 us that way, against
~2 us for the system calls themselves (`bench/transport.py`). A call moves four such messages
per 20 ms frame pair, so that was a fifth of a bridged call's CPU. `DirectStream` does the
system call first and waits (through trio's epoll) only when the socket would block; after a
read that emptied the socket, the next read waits first (a message every 20 ms is not there yet,
and a read that fails costs a system call and an exception).

It stays a well-behaved trio stream:
- every call checks for cancellation first, and waits are ordinary trio waits (cancellable);
- a peer that floods a connection cannot starve the other calls: a receive that would not wait
  yields to the scheduler anyway once the receiving task has run `FAIR_SECONDS` since its last
  wait (by time, not by count: what a read costs depends on what the caller does with it; the
  check is one clock read, and the common path, a read after a wait, never yields twice).
  `resumed` is when the receiving task last waited here, for the layer above to take over the
  same budget (`voxd.net.websocket` checks it while it parses and hands out what one read
  brought). Sends yield after `FAIRNESS` in a row that did not wait: a sender is voxd's own
  code, paced by the call;
- one task sends and one task receives at a time (the WebSocket above guarantees it);
- closing goes through the wrapped `trio.SocketStream`, which owns the socket; every system call
  is preceded (with no yield between) by a check that the socket is still open, since another
  task may close it while this one yields and the number may then belong to a new connection.
"""

from __future__ import annotations

import errno
import os
from time import perf_counter
from typing import Final

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

RECEIVE_BYTES: Final = 65536
FAIR_SECONDS: Final = 0.0005
"""How long a receiving task may run without waiting before a receive yields anyway."""
FAIRNESS: Final = 32
"""Sends without a wait after which the sending task yields anyway."""


class DirectStream(trio.abc.HalfCloseableStream):
    """A connected `trio.SocketStream`, read and written directly (see the module doc)."""

    __slots__ = ("_drained", "_fd", "_streak", "resumed", "socket", "transport")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.transport = stream
        self.socket = stream.socket  # for the peer's address
        self._fd = stream.socket.fileno()
        self._streak = 0
        self._drained = False
        self.resumed = perf_counter()
        """`perf_counter()` when the receiving task last came back from a wait or a yield in
        `receive_some`."""

    def _check_open(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the stream is closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()  # before waiting on the number, too
        size = max_bytes or RECEIVE_BYTES
        if self._drained:  # the last read emptied the socket: a read now would only fail
            await wait_readable(self._fd)
            self.resumed = perf_counter()
        else:
            await checkpoint_if_cancelled()
            if perf_counter() - self.resumed >= FAIR_SECONDS:  # see the module doc
                await cancel_shielded_checkpoint()
                self.resumed = perf_counter()
        while True:
            self._check_open()  # after every yield: a closed fd's number may be reused already
            try:
                data = os.read(self._fd, size)
            except BlockingIOError:
                await wait_readable(self._fd)
                self.resumed = perf_counter()
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            self._drained = 0 < len(data) < size
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        self._streak += 1
        if self._streak >= FAIRNESS:
            self._streak = 0
            await cancel_shielded_checkpoint()
        total = len(data)
        sent = self.send_nowait(data)  # after the yields above: it checks the socket is open
        if sent == total:
            return
        view = memoryview(data)
        while sent < total:
            self._streak = 0
            await wait_writable(self._fd)
            sent += self.send_nowait(view[sent:])

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting: the number of bytes written (0 if
        it is full). Only when no other task is sending; checks the socket is open first (see
        the module doc)."""
        self._check_open()
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _broken(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await wait_writable(self._fd)

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


def _broken(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the stream is closed")
    return trio.BrokenResourceError(f"socket error: {exc}")

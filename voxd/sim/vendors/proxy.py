"""A loopback TCP proxy that can go silent: the network fault a keep-alive must detect (the
vendor simulators sit behind one, for their scripts' `silent_after`).

`freeze()` stops forwarding in both directions without closing anything, so the far end looks
alive to the kernel (no RST, no FIN) but answers nothing: not data, not WebSocket pings.
"""

from __future__ import annotations

import trio

__all__ = ["FreezableProxy"]


class FreezableProxy:
    """Forwards 127.0.0.1:`port` -> 127.0.0.1:`target_port` until frozen."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.frozen = trio.Event()
        self.connections = 0

    def freeze(self) -> None:
        """Stop forwarding anything, on every connection, from now on."""
        self.frozen.set()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the proxy; `nursery.start(proxy.serve)` returns the listening port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pipe, server, client, nursery.cancel_scope)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                if self.frozen.is_set():
                    await trio.sleep_forever()  # swallow it, and everything after
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if not self.frozen.is_set():
            scope.cancel()

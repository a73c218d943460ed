"""A fast echo assistant for load tests (`voxd echo-upstream`): it speaks voxd's generic
WebSocket protocol (README, "Generic WebSocket assistants"), ignores the control messages and
sends every audio message straight back. It runs in its own process so that its cost is not
counted as voxd's, and on voxd's lean WebSocket so that it stays small next to voxd."""

from __future__ import annotations

import logging

import trio

from voxd.config import parse_listen
from voxd.net.front import receive_head
from voxd.net.request_head import HeadError
from voxd.net.stream import DirectStream
from voxd.net.websocket import ConnectionClosed, HandshakeError, ServerHandshake

log = logging.getLogger("voxd.echo")


async def serve_echo(listen: str,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on `host:port` (port 0 picks one; `task_status` gets the port) until cancelled."""
    host, port = parse_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(_echo, listeners)


async def _echo(tcp: trio.SocketStream) -> None:
    stream = DirectStream(tcp)
    try:
        with trio.move_on_after(5):
            head = await receive_head(stream)
        if not head:
            return
        websocket = await ServerHandshake(stream, head).accept(1 << 20)
    except (HeadError, HandshakeError, trio.BrokenResourceError) as exc:
        log.warning("echo upstream: bad connection: %s", exc)
        await trio.aclose_forcefully(stream)
        return
    try:
        while True:
            message = await websocket.receive()
            if type(message) is bytes:
                await websocket.send(message)
    except ConnectionClosed:
        pass
    finally:
        await websocket.close()

"""A fast echo assistant for load tests (`voxd echo-upstream`): it speaks voxd's generic
WebSocket protocol (README, "Generic WebSocket assistants"), ignores the control messages and
sends every audio message straight back. It runs in its own process so that its cost is not
counted as voxd's, and on voxd's lean WebSocket so that it stays small next to voxd.

With `reply_after` (`--reply-after-ms`) it takes turns instead, like an assistant: it keeps
each stretch of caller speech and says it back once the caller has been quiet for that long.
voxd's turn latency (end of caller speech -> first assistant audio) is then `reply_after` plus
what voxd and the sockets add."""

from __future__ import annotations

import contextlib
import json
import logging
from functools import partial

import trio

from voxd.audio.vad import frame_energy_dbfs_pcm16, frame_energy_dbfs_ulaw
from voxd.config import parse_listen
from voxd.net.front import receive_head
from voxd.net.request_head import HeadError
from voxd.net.stream import DirectStream
from voxd.net.websocket import ConnectionClosed, HandshakeError, ServerHandshake, WebSocket

log = logging.getLogger("voxd.echo")

SPEECH_DBFS = -45.0
"""Audio louder than this is caller speech (turn mode)."""


async def serve_echo(listen: str,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED, *,
                     reply_after: float = 0.0) -> None:
    """Serve on `host:port` (port 0 picks one; `task_status` gets the port) until cancelled;
    with `reply_after` > 0, answer turns (see the module doc)."""
    host, port = parse_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_echo, reply_after=reply_after), listeners)


async def _echo(tcp: trio.SocketStream, reply_after: float = 0.0) -> None:
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
        if reply_after > 0:
            await _answer_turns(websocket, reply_after)
        while True:
            message = await websocket.receive()
            if type(message) is bytes:
                await websocket.send(message)
    except ConnectionClosed:
        pass
    finally:
        await websocket.close()


async def _answer_turns(websocket: WebSocket, hold: float) -> None:
    """Say each stretch of caller speech back once the caller has been quiet for `hold` s."""
    energy, bytes_per_second = frame_energy_dbfs_pcm16, 32000
    turn: list[bytes] = []
    quiet = 0.0
    while True:
        message = await websocket.receive()
        if type(message) is str:
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(message).get("audio") == "mulaw":
                    energy, bytes_per_second = frame_energy_dbfs_ulaw, 8000
            continue
        if energy(message) > SPEECH_DBFS:
            turn.append(message)
            quiet = 0.0
        elif turn:
            quiet += len(message) / bytes_per_second
            if quiet >= hold:
                await websocket.send(b"".join(turn))
                turn = []

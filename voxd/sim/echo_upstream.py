"""A fast echo assistant for load tests (`voxd echo-upstream`): it speaks voxd's generic
WebSocket protocol (README, "Generic WebSocket assistants"), reads the `start` message for the
audio format, ignores the other control messages and sends every audio message straight back.
It runs in its own process so that its cost is not counted as voxd's, and on voxd's lean
WebSocket so that it stays small next to voxd.

With `reply_after` (`--reply-after-ms`) it takes turns instead, like an assistant: it keeps
each stretch of caller speech and says it back once the caller has been quiet for that long.
voxd's turn latency (end of caller speech -> first assistant audio) is then `reply_after` plus
what voxd and the sockets add.

Whatever it sends goes out as 20 ms frames, as a real assistant's stream does (640 bytes of
pcm16, 160 of mu-law): an answer is a burst of frames sent at once (voxd paces them), never one
message per utterance, which for a few seconds of pcm16 would exceed a peer's message limit.

One connection's failure (a client that never completes the upgrade within
`handshake_timeout`, garbage, a reset) ends that connection with one log line; the server and
its other connections go on."""

from __future__ import annotations

import contextlib
import json
import logging
from functools import partial

import trio

from voxd.audio.line import FRAME_SECONDS
from voxd.audio.vad import frame_energy_dbfs_pcm16, frame_energy_dbfs_ulaw
from voxd.config import parse_listen
from voxd.net.front import receive_head
from voxd.net.stream import DirectStream
from voxd.net.websocket import ConnectionClosed, ServerHandshake, WebSocket

log = logging.getLogger("voxd.echo")

SPEECH_DBFS = -45.0
"""Audio louder than this is caller speech (turn mode)."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a new connection has to complete its WebSocket upgrade."""
MAX_MESSAGE_BYTES = 1 << 20
BYTES_PER_SECOND = {"pcm16": 32000, "mulaw": 8000}
CLOSE_SECONDS = 2.0
"""Longest a connection's close may take (a peer that stopped reading cannot hold it)."""


async def serve_echo(listen: str,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED, *,
                     reply_after: float = 0.0,
                     handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Serve on `host:port` (port 0 picks one; `task_status` gets the port) until cancelled;
    with `reply_after` > 0, answer turns (see the module doc)."""
    host, port = parse_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_echo, reply_after=reply_after,
                                       handshake_timeout=handshake_timeout), listeners)


async def _echo(tcp: trio.SocketStream, reply_after: float = 0.0,
                handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """One connection, from the upgrade to the close; never raises (serve_listeners would end
    the whole server)."""
    stream = DirectStream(tcp)
    try:
        websocket = await _accept(stream, handshake_timeout)
    except Exception as exc:  # the connection's boundary: one line, then gone
        log.warning("echo upstream: bad connection: %s: %s", type(exc).__name__, exc)
        websocket = None
    if websocket is None:
        await trio.aclose_forcefully(stream)
        return
    try:
        if reply_after > 0:
            await _answer_turns(websocket, reply_after)
        else:
            await _pass_through(websocket)
    except ConnectionClosed:
        pass
    except Exception as exc:  # the connection's boundary, as above
        log.warning("echo upstream: connection failed: %s: %s", type(exc).__name__, exc)
    finally:
        with trio.move_on_after(CLOSE_SECONDS), contextlib.suppress(Exception):
            await websocket.close()
        await trio.aclose_forcefully(stream)


async def _accept(stream: DirectStream, within: float) -> WebSocket | None:
    """The upgrade, within `within` seconds; None when the client closed or took too long."""
    with trio.move_on_after(within):
        head = await receive_head(stream)
        if not head:
            return None  # closed before a request: nothing to say
        return await ServerHandshake(stream, head).accept(MAX_MESSAGE_BYTES)
    log.info("echo upstream: no WebSocket upgrade within %.1fs; closing the connection",
             within)
    return None


def _audio_format(text: str, current: str) -> str:
    """The audio format a `start` message names (else `current`)."""
    with contextlib.suppress(ValueError, AttributeError):
        audio = json.loads(text).get("audio")
        if audio in BYTES_PER_SECOND:
            return str(audio)
    return current


def _frame_bytes(audio: str) -> int:
    return int(BYTES_PER_SECOND[audio] * FRAME_SECONDS)


async def _send_frames(websocket: WebSocket, audio: bytes, frame: int) -> None:
    """`audio` as consecutive `frame`-byte messages (the last may be shorter)."""
    for i in range(0, len(audio), frame):
        await websocket.send(audio[i:i + frame])


async def _pass_through(websocket: WebSocket) -> None:
    """Every audio message straight back (voxd's are 20 ms frames: sent back as they are)."""
    audio = "pcm16"
    frame = _frame_bytes(audio)
    while True:
        message = await websocket.receive()
        if isinstance(message, bytes):
            if len(message) <= frame:
                await websocket.send(message)
            else:
                await _send_frames(websocket, message, frame)
        else:
            audio = _audio_format(message, audio)
            frame = _frame_bytes(audio)


async def _answer_turns(websocket: WebSocket, hold: float) -> None:
    """Say each stretch of caller speech back once the caller has been quiet for `hold` s."""
    audio = "pcm16"
    energy, bytes_per_second = frame_energy_dbfs_pcm16, BYTES_PER_SECOND[audio]
    frame = _frame_bytes(audio)
    turn: list[bytes] = []
    quiet = 0.0
    while True:
        message = await websocket.receive()
        if isinstance(message, str):
            audio = _audio_format(message, audio)
            energy = frame_energy_dbfs_pcm16 if audio == "pcm16" else frame_energy_dbfs_ulaw
            bytes_per_second, frame = BYTES_PER_SECOND[audio], _frame_bytes(audio)
            continue
        if energy(message) > SPEECH_DBFS:
            turn.append(message)
            quiet = 0.0
        elif turn:
            quiet += len(message) / bytes_per_second
            if quiet >= hold:
                await _send_frames(websocket, b"".join(turn), frame)
                turn = []

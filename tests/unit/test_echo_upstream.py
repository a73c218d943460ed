"""`voxd echo-upstream`: it answers in 20 ms frames, like a real assistant, and one connection's
failure (its own handshake timeout among them) never ends the server."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
import trio

from voxd.net import websocket
from voxd.sim.echo_upstream import serve_echo

FRAME = {"pcm16": 640, "mulaw": 160}
SECOND = {"pcm16": 32000, "mulaw": 8000}


def speech(audio: str, seconds: float) -> bytes:
    """Loud noise in the given format (well above the echo's speech threshold)."""
    rng = np.random.default_rng(7)
    if audio == "pcm16":
        return (rng.standard_normal(int(seconds * 16000)) * 6000).astype("<i2").tobytes()
    return rng.integers(0x00, 0x40, int(seconds * 8000), dtype=np.uint8).tobytes()  # loud codes


def quiet(audio: str, seconds: float) -> bytes:
    return bytes([0 if audio == "pcm16" else 0xFF]) * int(seconds * SECOND[audio])


async def start_echo(nursery: trio.Nursery, **options) -> str:
    port = await nursery.start(partial(serve_echo, "127.0.0.1:0", **options))
    return f"ws://127.0.0.1:{port}/"


async def open_call(url: str, audio: str) -> websocket.WebSocket:
    ws = await websocket.connect(url)
    await ws.send(f'{{"type":"start","callSid":"CA1","streamSid":"MZ1","audio":"{audio}"}}')
    return ws


async def receive_audio(ws: websocket.WebSocket, nbytes: int) -> list[bytes]:
    """Audio messages until `nbytes` have arrived."""
    messages: list[bytes] = []
    with trio.fail_after(5):
        while sum(map(len, messages)) < nbytes:
            message = await ws.receive()
            assert isinstance(message, bytes)
            messages.append(message)
    return messages


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_a_long_message_is_echoed_as_20_ms_frames(nursery, audio):
    url = await start_echo(nursery)
    ws = await open_call(url, audio)
    sent = speech(audio, 3.0)  # 96000 bytes of pcm16: over 64 KiB as one message
    await ws.send(sent)
    back = await receive_audio(ws, len(sent))
    assert {len(m) for m in back} == {FRAME[audio]}
    assert b"".join(back) == sent
    await ws.close()


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_turns_are_answered_after_the_pause_in_20_ms_frames(nursery, audio):
    url = await start_echo(nursery, reply_after=0.1)
    ws = await open_call(url, audio)
    said = speech(audio, 3.0)  # as voxd sends it: 20 ms frames
    frame = FRAME[audio]
    for i in range(0, len(said), frame):
        await ws.send(said[i:i + frame])
    for _ in range(4):  # 80 ms of quiet: not yet the 100 ms pause
        await ws.send(quiet(audio, 0.02))
    with trio.move_on_after(0.3):
        early = await ws.receive()
        pytest.fail(f"answered before the pause: {len(early)} bytes")
    await ws.send(quiet(audio, 0.02))  # 100 ms: the turn is over
    back = await receive_audio(ws, len(said))
    assert {len(m) for m in back} == {frame}
    assert b"".join(back) == said
    await ws.close()


async def test_a_client_that_sends_nothing_is_dropped_and_the_server_goes_on(nursery, caplog):
    caplog.set_level(logging.INFO, logger="voxd.echo")
    url = await start_echo(nursery, handshake_timeout=0.3)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    with trio.fail_after(3):
        assert await silent.receive_some(100) == b""  # closed by the echo, after its timeout
    assert trio.current_time() - started >= 0.3
    await silent.aclose()
    assert any("no WebSocket upgrade within 0.3s" in r.getMessage() for r in caplog.records)
    # not a WebSocket at all: refused with a line, and the server still goes on
    garbage = await trio.open_tcp_stream("127.0.0.1", port)
    await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(3):
        while await garbage.receive_some(100):
            pass
    await garbage.aclose()
    assert any("bad connection" in r.getMessage() for r in caplog.records)
    # a proper client after both is served
    ws = await open_call(url, "pcm16")
    sent = speech("pcm16", 0.1)
    await ws.send(sent)
    assert b"".join(await receive_audio(ws, len(sent))) == sent
    await ws.close()

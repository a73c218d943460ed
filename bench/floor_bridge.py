"""The trio floor: the reference bridge's bare pass-through (bench/peer_bridge.py), written on
voxd's own transport (trio, `DirectStream`, `websockets`' sans-I/O framing) with none of
voxd's call handling. It answers "what does this stack cost per call before voxd does anything
of its own", so voxd's CPU per call splits into the stack's share and voxd's.

Per Twilio connection: one task reads Twilio (JSON parsed, base64 decoded, audio sent
upstream), one reads the upstream (base64 encoded, JSON sent to Twilio): the peer's shape.
No pacing, no VAD, no turn timing, no limits, no signatures, no teardown guarantees.

Run: .venv/bin/python bench/floor_bridge.py --port 3200 --upstream ws://127.0.0.1:9100/
(bench/calls_per_core.py starts it next to voxd and the peer).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from functools import partial

import trio

from voxd.net.front import receive_head
from voxd.net.stream import DirectStream
from voxd.net.websocket import (
    ConnectionClosed,
    HandshakeError,
    ServerHandshake,
    WebSocket,
    connect,
)


async def connection(upstream_url: str, public: str, tcp: trio.SocketStream) -> None:
    try:
        await bridge(upstream_url, public, tcp)
    except (HandshakeError, OSError, trio.BrokenResourceError) as exc:  # this call only
        print(f"floor bridge: {type(exc).__name__}: {exc}", file=sys.stderr)


async def bridge(upstream_url: str, public: str, tcp: trio.SocketStream) -> None:
    stream = DirectStream(tcp)
    async with tcp:
        head = await receive_head(stream)
        if head.startswith(b"POST"):
            await webhook(stream, head, public)
            return
        twilio = await ServerHandshake(stream, head).accept(1 << 16)
        upstream = await connect(upstream_url)
        stream_sid = [""]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_twilio, twilio, upstream, stream_sid,
                                   nursery.cancel_scope)
                nursery.start_soon(to_twilio, upstream, twilio, stream_sid, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await upstream.close()
                await twilio.close()


async def webhook(stream: DirectStream, head: bytes, public: str) -> None:
    """Answer the voice webhook with TwiML pointing at this bridge's stream URL."""
    headers, _, body = head.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += await stream.receive_some()
    twiml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream '
             f'url="{public}/media-stream"/></Connect></Response>').encode()
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: "
                          + str(len(twiml)).encode() + b"\r\nconnection: close\r\n\r\n" + twiml)


async def from_twilio(twilio: WebSocket, upstream: WebSocket, stream_sid: list[str],
                      done: trio.CancelScope) -> None:
    try:
        while True:
            data = json.loads(await twilio.receive())
            event = data["event"]
            if event == "media":
                await upstream.send(base64.b64decode(data["media"]["payload"]))
            elif event == "start":
                stream_sid[0] = data["start"]["streamSid"]
                await upstream.send(json.dumps({"type": "start", "audio": "mulaw"}))
            elif event == "stop":
                break
    except ConnectionClosed:
        pass
    done.cancel()


async def to_twilio(upstream: WebSocket, twilio: WebSocket, stream_sid: list[str],
                    done: trio.CancelScope) -> None:
    try:
        while True:
            audio = await upstream.receive()
            if type(audio) is bytes:
                await twilio.send(json.dumps({
                    "event": "media", "streamSid": stream_sid[0],
                    "media": {"payload": base64.b64encode(audio).decode()}}))
    except ConnectionClosed:
        pass
    done.cancel()


async def main(port: int, upstream: str) -> None:
    handler = partial(connection, upstream, f"ws://127.0.0.1:{port}")
    await trio.serve_tcp(handler, port, host="127.0.0.1")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3200)
    parser.add_argument("--upstream", default="ws://127.0.0.1:9100/")
    args = parser.parse_args()
    trio.run(main, args.port, args.upstream)

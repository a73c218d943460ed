"""The reference bridge: Twilio Media Streams to a WebSocket assistant written the way most
tutorials do it (asyncio, one ASGI server, a `websockets` client, JSON parsed per message,
base64 passed through). It exists only to be measured next to voxd (bench/calls_per_core.py);
it has none of voxd's checks, pacing, barge-in or teardown guarantees.

Run: .venv/bin/python bench/peer_bridge.py --port 3100 --upstream ws://127.0.0.1:9100/
(needs `pip install -e '.[bench]'`: uvicorn and websockets)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from urllib.parse import parse_qs

import uvicorn
import websockets

UPSTREAM = "ws://127.0.0.1:9100/"
PUBLIC = "ws://127.0.0.1:3100"


async def app(scope, receive, send):
    if scope["type"] == "http":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        call_sid = parse_qs(body.decode()).get("CallSid", [""])[0]
        twiml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream '
                 f'url="{PUBLIC}/media-stream"><Parameter name="callSid" value="{call_sid}"/>'
                 f"</Stream></Connect></Response>")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/xml")]})
        await send({"type": "http.response.body", "body": twiml.encode()})
        return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    stream_sid = None
    async with websockets.connect(UPSTREAM) as upstream:

        async def from_twilio() -> None:
            nonlocal stream_sid
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = json.loads(message["text"])
                if data["event"] == "start":
                    stream_sid = data["start"]["streamSid"]
                    await upstream.send(json.dumps({"type": "start", "audio": "mulaw"}))
                elif data["event"] == "media":
                    await upstream.send(base64.b64decode(data["media"]["payload"]))
                elif data["event"] == "stop":
                    return

        async def to_twilio() -> None:
            async for audio in upstream:
                if isinstance(audio, bytes):
                    await send({"type": "websocket.send", "text": json.dumps({
                        "event": "media", "streamSid": stream_sid,
                        "media": {"payload": base64.b64encode(audio).decode()}})})

        tasks = [asyncio.create_task(from_twilio()), asyncio.create_task(to_twilio())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
    await send({"type": "websocket.close", "code": 1000})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--upstream", default=UPSTREAM)
    args = parser.parse_args()
    UPSTREAM = args.upstream
    PUBLIC = f"ws://127.0.0.1:{args.port}"
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)

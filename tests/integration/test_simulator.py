"""The simulator plays Twilio's part faithfully: playback in real time, marks, clear."""

from __future__ import annotations

import base64
import contextlib
import json

import numpy as np
import trio
import trio_websocket

from voxd.sim.caller import CallReport, StreamInstruction, TwilioSimulator, _Stream, parse_twiml


def test_parse_twiml_finds_the_stream_and_what_follows():
    found = parse_twiml('<?xml version="1.0"?><Response><Connect><Stream url="wss://h/m">'
                        '<Parameter name="a" value="1"/></Stream></Connect><Say>bye</Say>'
                        "</Response>")
    assert found == StreamInstruction("wss://h/m", {"a": "1"}, "<Say>bye</Say>")


async def test_marks_are_echoed_after_playback_and_at_once_on_clear(nursery):
    marks: list[tuple[str, float]] = []

    async def fake_voxd(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        connected = json.loads(await ws.get_message())
        start = json.loads(await ws.get_message())
        assert connected["event"] == "connected" and start["event"] == "start"
        sid = start["streamSid"]
        t0 = trio.current_time()

        async def send_media(byte: int, count: int) -> None:
            for _ in range(count):
                payload = base64.b64encode(bytes([byte]) * 160).decode()
                await ws.send_message(json.dumps(
                    {"event": "media", "streamSid": sid, "media": {"payload": payload}}))

        async def read_marks() -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    message = json.loads(await ws.get_message())
                    if message["event"] == "mark":
                        marks.append((message["mark"]["name"], trio.current_time() - t0))

        nursery.start_soon(read_marks)
        await send_media(0x01, 10)  # 200 ms of audio
        await ws.send_message(json.dumps({"event": "mark", "streamSid": sid,
                                          "mark": {"name": "a"}}))
        await trio.sleep(0.5)
        await send_media(0x02, 50)  # 1 s of audio ...
        await ws.send_message(json.dumps({"event": "mark", "streamSid": sid,
                                          "mark": {"name": "b"}}))
        await trio.sleep(0.2)
        await ws.send_message(json.dumps({"event": "clear", "streamSid": sid}))  # ... cut short
        await trio.sleep(10)

    server = await nursery.start(trio_websocket.serve_websocket, fake_voxd, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/media-stream"
    sim = TwilioSimulator("http://unused")
    report = CallReport(sim.call_sid, sim.stream_sid)
    frames = [b"\xff" * 160] * 75  # 1.5 s call
    async with trio_websocket.open_websocket_url(url) as ws:
        await _Stream(sim, ws, StreamInstruction(url, {}, ""), frames, report).run()

    assert [name for name, _ in marks] == ["a", "b"]
    assert 0.18 <= marks[0][1] <= 0.30  # after 200 ms of playback, not before
    assert 0.65 <= marks[1][1] <= 0.80  # echoed by the clear at ~0.7 s, unplayed
    heard = np.frombuffer(b"".join(report.heard_frames), np.uint8)
    assert np.count_nonzero(heard == 0x01) == 1600  # all of the first audio, once
    played_02 = np.count_nonzero(heard == 0x02) / 160
    assert 8 <= played_02 <= 12  # ~200 ms of the second before the clear
    assert report.clears == 1 and report.marks_echoed == 2
    assert report.media_received == 60

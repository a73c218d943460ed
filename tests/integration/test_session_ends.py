"""However a call ends, the assistant hears about it exactly when it should."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket
from twilio.request_validator import RequestValidator

from tests.integration.test_malformed import CONNECTED, media, start_message
from voxd.providers.base import AssistantAudio, AssistantEnded


class ScriptedAssistant:
    """An in-process assistant that records what the call did to it."""

    name = "scripted"
    audio = "mulaw"

    def __init__(self) -> None:
        self.received = bytearray()
        self.hung_up = 0
        self.closed = trio.Event()
        self.events_tx, self.events_rx = trio.open_memory_channel(16)

    def prepare(self, call, nursery) -> None:
        pass

    async def aclose(self) -> None:
        pass

    @asynccontextmanager
    async def connect(self, call):
        try:
            yield self
        finally:
            self.closed.set()

    async def send_audio(self, chunk: bytes) -> None:
        self.received += chunk

    async def receive(self):
        return await self.events_rx.receive()

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def hang_up(self) -> None:
        self.hung_up += 1

    async def barge_in(self, heard_seconds: float) -> None:
        pass


async def connect(voxd):
    signature = RequestValidator(voxd.token).compute_signature(voxd.stream_url, {})
    return trio_websocket.open_websocket_url(
        voxd.stream_url, extra_headers=[(b"X-Twilio-Signature", signature.encode())])


@pytest.fixture
async def scripted(start_voxd):
    voxd = await start_voxd(call={"stream_token": False})  # raw streams, no webhook
    assistant = ScriptedAssistant()
    voxd.runtime.provider = assistant
    return voxd, assistant


@pytest.mark.parametrize("ending", ["stop", "disconnect", "bad input"])
async def test_caller_side_endings_hang_up_the_assistant(scripted, caplog, ending):
    voxd, assistant = scripted
    async with await connect(voxd) as ws:
        for message in (CONNECTED, start_message(), media()):
            await ws.send_message(message)
        if ending == "stop":
            await ws.send_message(json.dumps({"event": "stop", "streamSid": "MZ" + "0" * 32}))
        elif ending == "bad input":
            await ws.send_message("{oops")
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    assert assistant.closed.is_set()
    assert assistant.hung_up == 1
    assert bytes(assistant.received) == b"\xff"  # the one media payload ("/w==")


async def test_assistant_ending_closes_the_twilio_stream_once_its_last_words_played(
        scripted, caplog):
    caplog.set_level(logging.INFO)
    voxd, assistant = scripted
    async with await connect(voxd) as ws:
        for message in (CONNECTED, start_message()):
            await ws.send_message(message)
        await assistant.events_tx.send(AssistantAudio(b"\x01" * 200))
        await assistant.events_tx.send(AssistantEnded("goodbye"))
        sent = []
        with trio.fail_after(1), pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                message = json.loads(await ws.get_message())
                sent.append(message)
                if message["event"] == "mark":  # echo it, as Twilio does once played
                    await ws.send_message(json.dumps(message))
    # 200 bytes became a full frame and a padded one, then a mark; the stream was closed only
    # once Twilio confirmed the assistant's last words had played.
    assert [m["event"] for m in sent] == ["media", "media", "mark"]
    assert [len(m["media"]["payload"]) for m in sent[:2]] == [216, 216]
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    # the assistant is still told the call is over: a client-side "end the call" tool (Vapi)
    # ends nothing on the assistant's side by itself
    assert assistant.hung_up == 1
    assert any("reason=assistant-ended:goodbye" in r.getMessage() for r in caplog.records)


async def test_server_shutdown_hangs_up_live_calls(caplog):
    caplog.set_level(logging.INFO)
    import secrets

    from tests.integration.conftest import RunningVoxd, make_settings
    from voxd.server import bound_origin, open_listener, serve

    assistant = ScriptedAssistant()
    sock = open_listener("127.0.0.1:0")
    token = secrets.token_hex(8)
    async with trio.open_nursery() as server:
        settings = make_settings(bound_origin(sock), token, call={"stream_token": False})
        runtime = await server.start(serve, settings, sock)
        runtime.provider = assistant
        voxd = RunningVoxd(bound_origin(sock), token, runtime)
        async with await connect(voxd) as ws:
            for message in (CONNECTED, start_message()):
                await ws.send_message(message)
            await trio.testing.wait_all_tasks_blocked()
            assert len(runtime.calls) == 1
            server.cancel_scope.cancel()  # the whole server is going away
    sock.close()
    assert assistant.hung_up == 1 and assistant.closed.is_set()
    assert any("reason=server-shutdown" in r.getMessage() for r in caplog.records)

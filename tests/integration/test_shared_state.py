"""State shared beyond one process: used stream tokens across a host's workers (a directory)
and across hosts (a real redis-server), and Vapi calls created early by one host's webhook
taken over by the host that gets the stream."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
import trio_websocket

from tests.fakes.vapi import FakeVapi
from tests.integration.audio import burst, silence
from tests.integration.system_tools import missing_after_apt
from voxd.observability import metrics
from voxd.server import bound_origin, open_listener
from voxd.shared_state import DirectoryTokens, RedisState
from voxd.sim.caller import TwilioSimulator
from voxd.twilio.stream_token import TokenRejected

KEY = "vapi-test-key"


@pytest.fixture(scope="module")
def redis_url():
    binary = None if missing_after_apt(("redis-server",), ("redis-server",)) else \
        shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed and could not be (needs root and apt-get: "
                    "apt-get install redis-server)")
    probe = open_listener("127.0.0.1:0")
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.skip("redis-server did not start")
        client.close()
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
async def two_hosts(start_voxd, nursery, redis_url):
    """Two voxd hosts behind one proxy: one Redis, one stream secret, one fake Vapi."""
    fake = FakeVapi()
    await nursery.start(fake.serve)
    shared = {"vapi_api_key": KEY, "stream_secret": "one-secret-for-every-host",
              "redis_url": redis_url}
    hosts = [await start_voxd(signed=False, secrets=shared,
                              assistant={"provider": "vapi", "audio": "mulaw"},
                              vapi={"base_url": fake.base_url, "assistant_id": "asst-1"})
             for _ in range(2)]
    return hosts, fake


async def test_a_stream_on_another_host_takes_the_early_call(two_hosts, caplog):
    """The webhook goes to one host, the stream to the other: exactly one Vapi call."""
    caplog.set_level(logging.INFO)
    (webhook_host, stream_host), fake = two_hosts
    stream_origin = stream_host.stream_url.removesuffix("/media-stream")

    class StreamElsewhere(TwilioSimulator):
        async def request_stream(self):  # type: ignore[no-untyped-def]
            instruction = await super().request_stream()
            path = instruction.url.split("/media-stream", 1)[1]
            return replace(instruction, url=stream_origin + "/media-stream" + path)

    report = await StreamElsewhere(webhook_host.webhook).call(
        np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None
    assert len(fake.create_requests) == 1  # the stream host took the webhook host's call
    assert any("created early by another host's webhook" in r.getMessage()
               for r in caplog.records)


async def test_a_stream_url_is_used_once_across_hosts(two_hosts):
    (first, second), _ = two_hosts
    sim = TwilioSimulator(first.webhook)
    instruction = await sim.request_stream()
    path = instruction.url.split("/media-stream", 1)[1]
    async with trio_websocket.open_websocket_url(instruction.url):
        pass  # the first use (the call itself is not the point here)
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(
                second.stream_url + path):
            pass
    assert rejected.value.status_code == 403


async def test_without_redis_calls_go_on_and_say_so(caplog):
    """A Redis that does not answer: tokens fall back to this process, one throttled line,
    counted; nothing fails."""
    probe = open_listener("127.0.0.1:0")
    url = "redis://" + bound_origin(probe).removeprefix("http://") + "/0"
    probe.close()  # nothing listens there now
    state = RedisState(url)
    before = metrics.ERRORS.labels(kind="state")._value.get()
    await state.claim("mac-1", int(time.time()) + 60, time.time())
    with pytest.raises(TokenRejected, match="already used"):
        await state.claim("mac-1", int(time.time()) + 60, time.time())  # this process knew
    assert await state.take_early("CA" + "1" * 32, 0.0) is None
    assert metrics.ERRORS.labels(kind="state")._value.get() >= before + 2
    lines = [r for r in caplog.records if "shared state (Redis) failed" in r.getMessage()]
    assert len(lines) == 1  # throttled
    await state.aclose()


async def test_workers_of_one_host_share_used_tokens(tmp_path: Path):
    one, other = DirectoryTokens(tmp_path), DirectoryTokens(tmp_path)
    now = time.time()
    await one.claim("A" * 43, int(now) + 60, now)
    with pytest.raises(TokenRejected, match="already used"):
        await other.claim("A" * 43, int(now) + 60, now)
    await other.claim("B" * 43, int(now) - 10, now)  # expired already: pruned later
    other._prune(now)
    assert os.listdir(tmp_path) == ["A" * 43]
    await trio.lowlevel.checkpoint()


async def test_what_follows_a_stream_is_answered_by_whichever_host_gets_the_action(redis_url):
    """Without REST, a call's end leaves its next TwiML; Twilio's action request may land on
    another host: it gets it there, exactly once."""
    from voxd.shared_state import RedisState

    one, other = RedisState(redis_url), RedisState(redis_url)
    sid = "CA" + "4" * 32
    try:
        assert await one.put(sid, "<Response><Hangup/></Response>", 60)
        assert await other.take(sid) == "<Response><Hangup/></Response>"
        assert await one.take(sid) is None and await other.take(sid) is None
    finally:
        await one.aclose()
        await other.aclose()

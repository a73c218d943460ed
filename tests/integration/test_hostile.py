"""Hostile clients against a running voxd: each offender is closed with a clear log line while
a good call keeps flowing with no lost frames (the malformed-message cases, after the
WebSocket is open, are in test_malformed.py)."""

from __future__ import annotations

import logging
import re
import socket
from secrets import token_hex

import httpx
import numpy as np
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings

from tests.integration.audio import burst, silence
from tests.integration.conftest import RunningVoxd, make_settings
from tests.integration.waiting import call_streaming, wait_until
from tests.request_heads import Example, requests
from voxd.observability import metrics
from voxd.server import bound_origin, open_listener, serve
from voxd.sim.caller import TwilioSimulator

SLOW = 0.5  # server.handshake_timeout in these tests
UPGRADE = ("GET /media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")


async def raw_connection(voxd, source: str = "127.0.0.2") -> trio.SocketStream:
    """A TCP connection to voxd from `source` (any 127/8 address is this machine)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    host, port = voxd.origin.removeprefix("http://").rsplit(":", 1)
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything voxd sends until it closes (a reset counts as closed)."""
    received = b""
    try:
        while data := await stream.receive_some(65536):
            received += data
    except trio.BrokenResourceError:
        pass
    return received


async def slowloris(voxd) -> bytes:
    stream = await raw_connection(voxd)
    async with trio.open_nursery() as nursery:
        async def dribble() -> None:
            for byte in UPGRADE.encode():
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.05)  # the slowness is the attack under test

        nursery.start_soon(dribble)
        received = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    return received


async def send_and_read(voxd, data: bytes) -> bytes:
    stream = await raw_connection(voxd)
    await stream.send_all(data)
    return await read_until_closed(stream)


async def unsigned_upgrade(voxd) -> bytes:
    with pytest.raises(trio_websocket.HandshakeError) as caught:
        async with trio_websocket.open_websocket_url(voxd.stream_url):
            pass
    return str(caught.value).encode()


H2C = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       b"Upgrade: h2c\r\nHTTP2-Settings: AAQAAAAA\r\n\r\n")
POST = b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n"


async def slow_body(voxd) -> bytes:
    """A whole head, then the body a byte at a time: bounded like a slow head."""
    stream = await raw_connection(voxd)
    await stream.send_all(POST + b"Content-Length: 200\r\n\r\n")
    async with trio.open_nursery() as nursery:
        async def dribble() -> None:
            for _ in range(200):
                await stream.send_all(b"x")
                await trio.sleep(0.05)  # the slowness is the attack under test

        nursery.start_soon(dribble)
        received = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    return received


CASES = {
    "slowloris handshake": (slowloris, b"",
                            f"no complete request within {SLOW}s (server.handshake_timeout)"),
    "huge request head": (lambda v: send_and_read(v, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000),
                          b"", "request head over 16384 bytes"),
    "not HTTP": (lambda v: send_and_read(v, b"SSH-2.0-Go\r\n\r\n"), b"",
                 "not an HTTP/1.x request line"),
    "upgrade without a key": (lambda v: send_and_read(v, (UPGRADE + "\r\n").encode()),
                              b"400 Bad Request", "bad WebSocket upgrade"),
    "unsigned upgrade": (unsigned_upgrade, b"403", "rejected: missing X-Twilio-Signature"),
    "h2c upgrade": (lambda v: send_and_read(v, H2C), b"400 Bad Request",
                    "voxd serves HTTP/1.1 only (Upgrade: h2c)"),
    "HTTP/2 preface": (lambda v: send_and_read(v, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
                       b"", "not an HTTP/1.x request line"),
    "slow body": (slow_body, b"", f"no complete request within {SLOW}s"),
    "chunked body": (lambda v: send_and_read(v, POST + b"Transfer-Encoding: chunked\r\n\r\n"),
                     b"411 Length Required", "a body without Content-Length"),
    "huge body": (lambda v: send_and_read(v, POST + b"Content-Length: 99999999\r\n\r\n"),
                  b"413", "a body of 99999999 bytes"),
    "two lengths": (lambda v: send_and_read(
        v, POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"), b"",
        "ambiguous body length"),
    "WebSocket elsewhere, a byte more": (
        lambda v: send_and_read(v, (UPGRADE.replace("/media-stream", "/healthz") +
                                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nx")
                                .encode()), b"404 Not Found", "only /media-stream takes one"),
}


def rejected_per_address() -> float:
    return metrics.REGISTRY.get_sample_value("voxd_connections_rejected_total",
                                             {"reason": "per_address"}) or 0.0


async def good_call(voxd, result: dict) -> None:
    caller = np.concatenate([burst(0.4), silence(1.6)])
    result["report"] = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)


def assert_good_call_intact(result: dict, caplog) -> None:
    report = result["report"]
    assert report.errors == [] and report.closed_by == "caller"
    assert report.media_received > 0 and len(report.turns()) == 1
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(summaries) == 1, summaries
    assert re.search(r"frames_in=100 frames_out=\d+ dropped_in=0 dropped_out=0", summaries[0])


@pytest.mark.parametrize("case", list(CASES))
async def test_offender_is_closed_and_the_good_call_flows(start_voxd, caplog, case):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(server={"handshake_timeout": SLOW}, assistant={"audio": "mulaw"})
    act, expected_reply, expected_log = CASES[case]
    result: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_call, voxd, result)
        await wait_until(call_streaming(lambda: voxd.runtime.calls), 5,
                         "the good call streams caller audio")
        with trio.fail_after(SLOW + 1.5):  # closed promptly
            reply = await act(voxd)
    assert expected_reply in reply
    assert any(expected_log in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert_good_call_intact(result, caplog)


async def test_a_flood_from_one_address_is_refused_beyond_its_limit(start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(server={"handshake_timeout": 2.0, "max_connections_per_address": 20},
                            assistant={"audio": "mulaw"})
    result: dict = {}
    flood: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_call, voxd, result)
        await wait_until(call_streaming(lambda: voxd.runtime.calls), 5,
                         "the good call streams caller audio")
        rejected = rejected_per_address()
        refused = 0
        for _ in range(60):
            try:
                flood.append(await raw_connection(voxd))
            except ConnectionResetError:  # reset before connect() returned
                refused += 1
        await wait_until(lambda: rejected_per_address() - rejected >= 40, 5,
                         "voxd refuses the 40 connections beyond the limit",
                         seen=lambda: rejected_per_address() - rejected)
        # Those resets have arrived; a connection voxd holds stays open until the handshake
        # deadline (2 s), so a short look tells the two apart.
        async def look(stream: trio.SocketStream) -> None:
            nonlocal refused
            with trio.move_on_after(0.2):
                await read_until_closed(stream)
                refused += 1

        async with trio.open_nursery() as looking:
            for stream in flood:
                looking.start_soon(look, stream)
        for stream in flood:
            await stream.aclose()
    assert refused == 40
    lines = [r.getMessage() for r in caplog.records]
    limit_lines = [line for line in lines if "server.max_connections_per_address reached" in line]
    assert 1 <= len(limit_lines) <= 2, limit_lines  # throttled, with a count
    assert_good_call_intact(result, caplog)
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(voxd.origin + "/metrics")).text
    assert 'voxd_connections_rejected_total{reason="per_address"} 40.0' in metrics


async def test_total_connections_are_limited_and_slots_come_back(start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(server={"handshake_timeout": SLOW, "max_connections": 3})
    opened = metrics.CONNECTIONS_OPEN._value.get()
    idle = [await raw_connection(voxd) for _ in range(3)]
    await wait_until(lambda: metrics.CONNECTIONS_OPEN._value.get() >= opened + 3, 2,
                     "voxd admits the three idle connections",
                     seen=lambda: metrics.CONNECTIONS_OPEN._value.get() - opened)
    with trio.fail_after(1):  # reset: either before connect() returns or on the first read
        try:
            refused = await raw_connection(voxd, "127.0.0.1")
        except ConnectionResetError:
            pass
        else:
            assert await read_until_closed(refused) == b""
    assert any("server.max_connections reached (3 open" in r.getMessage()
               for r in caplog.records)
    with trio.fail_after(SLOW + 1):  # the idle ones are closed at the handshake deadline
        for stream in idle:
            await read_until_closed(stream)
    async with httpx.AsyncClient() as client:
        assert (await client.get(voxd.origin + "/healthz")).status_code == 200


async def test_a_request_the_http_stack_refuses_frees_its_slot_at_once(start_voxd, caplog):
    """Hypercorn answers a malformed request line 400 by itself and used to keep the
    connection's task (and so its max_connections slot) for its 75 s keep-alive (found by
    bench/fuzz.py); and a request followed by bytes it cannot parse raced its own close
    against the response (a traceback each, BusyResourceError)."""
    voxd = await start_voxd(server={"handshake_timeout": SLOW})
    opened = metrics.CONNECTIONS_OPEN._value.get()
    for _ in range(20):
        reply = await send_and_read(voxd, b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
    for _ in range(50):
        await send_and_read(voxd, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                  b"\r\nabcdefgh\x00\x01\r\n\r\n")
    await wait_until(lambda: metrics.CONNECTIONS_OPEN._value.get() <= opened, SLOW + 3,
                     "the refused requests' connection slots come back",
                     seen=lambda: metrics.CONNECTIONS_OPEN._value.get() - opened)
    assert not any("BusyResourceError" in r.getMessage() or r.exc_info
                   for r in caplog.records), [r.getMessage() for r in caplog.records][-5:]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=requests())
async def test_request_shaped_input_is_served_or_refused_never_an_internal_error(
        caplog, example: Example):
    """Request heads as clients and scanners send them, mostly mangled (tests/request_heads.py)
    against a voxd with signatures on: each is answered with a 2xx-4xx status and closed, or
    (a head the front door refuses) closed without an answer, promptly; never a 5xx or a 101,
    nothing logged as voxd's error, and the next connection is served as usual."""
    caplog.set_level(logging.INFO)
    seen = len(caplog.records)
    sock = open_listener("127.0.0.1:0")  # a voxd per example (fixtures are per test)
    async with trio.open_nursery() as nursery:
        origin = bound_origin(sock)
        settings = make_settings(origin, token_hex(16), server={"handshake_timeout": SLOW})
        voxd = RunningVoxd(origin, None, await nursery.start(serve, settings, sock))
        try:
            await check_request_shaped(voxd, example, caplog, seen)
        finally:
            nursery.cancel_scope.cancel()
            sock.close()


async def check_request_shaped(voxd: RunningVoxd, example: Example, caplog, seen: int) -> None:
    with trio.fail_after(SLOW + 2):  # closed within the handshake deadline, or answered
        reply = await send_and_read(voxd, example.data)
    status = reply.split(b"\r\n", 1)[0]
    if example.error is not None:  # refused by the front door: closed without an answer
        assert reply == b"", (example, reply[:300])
    elif example.head is not None or reply:
        assert re.fullmatch(rb"HTTP/1\.1 [234]\d\d( .*)?", status), (example, reply[:300])
    lines = [r.getMessage() for r in caplog.records[seen:]]
    if not reply:
        assert any("connection from" in line for line in lines), (example, lines)
    assert not [r for r in caplog.records[seen:] if r.levelno >= logging.ERROR or r.exc_info], \
        (example, lines)
    async with httpx.AsyncClient() as client:
        assert (await client.get(voxd.origin + "/healthz")).status_code == 200

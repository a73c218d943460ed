"""Bad input from the Twilio side ends that call with one clear log line; other calls go on."""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from tests.integration.audio import burst, silence
from tests.integration.waiting import call_streaming, logged, wait_until
from voxd.sim.caller import TwilioSimulator

SID = "MZ" + "0" * 32


def start_message(stream_sid: str = SID) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                       "start": {"accountSid": "AC1", "streamSid": stream_sid,
                                 "callSid": "CA" + "1" * 32, "tracks": ["inbound"],
                                 "customParameters": {},
                                 "mediaFormat": {"encoding": "audio/x-mulaw",
                                                 "sampleRate": 8000, "channels": 1}}})


def media(payload: str = "/w==", stream_sid: str = SID) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                                 "payload": payload}})


CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'

CASES = {
    "invalid JSON": ([CONNECTED, start_message(), "{not json"], "invalid JSON"),
    "unknown event": ([CONNECTED, start_message(), f'{{"event":"bogus","streamSid":"{SID}"}}'],
                      "unknown event 'bogus'"),
    "missing field": ([CONNECTED, start_message(),
                       f'{{"event":"media","streamSid":"{SID}","media":{{"timestamp":"0"}}}}'],
                      "missing required field `payload`"),
    "wrong streamSid": ([CONNECTED, start_message(), media(stream_sid="MZ" + "9" * 32)],
                        "but this stream is"),
    "media before start": ([CONNECTED, media()], "'media' received while awaiting start"),
    "bad base64": ([CONNECTED, start_message(), media(payload="@@@@")],
                   "not valid base64"),
    "duplicate start": ([CONNECTED, start_message(), start_message()], "duplicate 'start'"),
    "oversized frame": ([CONNECTED, start_message(), media(payload="A" * 80_000)],
                        "exceeds the limit of 65536"),
    "binary frame": ([CONNECTED, start_message(), b"\x00\x01"], "binary frame"),
    "wrong media format": ([CONNECTED, start_message().replace("audio/x-mulaw", "audio/l16")],
                           "unsupported media format"),
    # JSON nested past msgspec's depth guard: a protocol error, never a RecursionError
    "1,000 deep before start": ([CONNECTED, '{"event":' + "[" * 1_000 + "]" * 1_000 + "}"],
                                "JSON nested too deeply"),
    "30,000 deep while streaming": ([CONNECTED, start_message(),
                                     f'{{"event":"media","streamSid":"{SID}","x":'
                                     + "[" * 30_000 + "]" * 30_000 + "}"],
                                    "JSON nested too deeply"),
    "a second connected": ([CONNECTED, CONNECTED], "'connected' received twice"),
}


async def open_stream(voxd):
    signature = RequestValidator(voxd.token).compute_signature(voxd.stream_url, {})
    return trio_websocket.open_websocket_url(
        voxd.stream_url, extra_headers=[(b"X-Twilio-Signature", signature.encode())])


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_ends_only_that_call(start_voxd, caplog, case):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(assistant={"audio": "mulaw"}, call={"stream_token": False})
    messages, problem = CASES[case]
    good: dict[str, object] = {}

    async def good_call() -> None:
        caller = np.concatenate([burst(0.4), silence(1.2)])
        good["report"] = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_call)
        await wait_until(call_streaming(lambda: voxd.runtime.calls), 5,
                         "the good call streams caller audio")
        async with await open_stream(voxd) as ws:
            for message in messages:
                await ws.send_message(message)
            with trio.fail_after(1.0):  # closed promptly by voxd
                with pytest.raises(trio_websocket.ConnectionClosed):
                    while True:
                        await ws.get_message()

    report = good["report"]
    assert report.errors == [] and report.closed_by == "caller"
    assert len(report.caller_frames) == 80 and report.media_received > 0
    assert len(report.turns()) == 1 and report.turns()[0].latency is not None
    # one line, no traceback, nothing logged as an error of voxd's
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if r.name == "voxd.call"]
    errors = [line for line in lines if "protocol error" in line]
    assert len(errors) == 1, lines
    assert problem in errors[0]
    assert "\n" not in errors[0] and len(errors[0]) < 400
    summaries = [line for line in lines if line.startswith("call ended")]
    assert len(summaries) == 2  # the bad call and the good one, one line each
    assert sum("reason=protocol-error" in s for s in summaries) == 1


async def test_no_start_within_the_timeout_closes_the_socket(start_voxd, caplog):
    voxd = await start_voxd(call={"start_timeout": 0.3, "stream_token": False})
    async with await open_stream(voxd) as ws:
        await ws.send_message(CONNECTED)
        with trio.fail_after(1.5), pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    assert any("no 'start' within 0.3s" in r.getMessage() for r in caplog.records)


async def test_a_silent_twilio_socket_ends_the_call(start_voxd, caplog):
    """No FIN, no RST, just nothing: the call must not hold its slot forever."""
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(call={"media_timeout": 0.5, "stream_token": False})
    async with await open_stream(voxd) as ws:
        for message in (CONNECTED, start_message(), media()):
            await ws.send_message(message)
        with trio.fail_after(2), pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()  # voxd closes it
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    lines = [r.getMessage() for r in caplog.records]
    assert any("no message from Twilio for 0.5s" in line for line in lines)
    assert any("reason=twilio-silent" in line for line in lines)


async def test_dtmf_digits_are_never_logged(start_voxd, caplog):
    caplog.set_level(logging.DEBUG)
    voxd = await start_voxd(call={"stream_token": False})
    async with await open_stream(voxd) as ws:
        for message in (CONNECTED, start_message()):
            await ws.send_message(message)
        await ws.send_message(json.dumps({"event": "dtmf", "streamSid": SID,
                                          "dtmf": {"track": "inbound_track", "digit": "7"}}))
        await wait_until(logged(caplog, "keypad entry of 1 key(s) passed to the assistant"), 3,
                         "the key reaches the assistant")
        await ws.send_message(json.dumps({"event": "stop", "streamSid": SID}))
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    keypad = [r.getMessage() for r in caplog.records if "key" in r.getMessage()]
    assert keypad and not any("7" in line for line in keypad), keypad


async def test_streams_need_this_services_token_for_this_call(start_voxd, caplog):
    """The per-call stream URL: its token is checked at the upgrade (missing, malformed,
    forged or replayed: 403 before anything else), and at `start` the stream must be the
    token's call with exactly the webhook's parameters; a call set up by the webhook goes
    through. Every refusal is one line, never a traceback."""
    caplog.set_level(logging.INFO)
    voxd = await start_voxd()
    origin = voxd.stream_url.removesuffix("/media-stream")

    async def stream_url(call_sid: str) -> str:
        form = {"CallSid": call_sid, "From": "+1", "To": "+2"}
        signature = RequestValidator(voxd.token).compute_signature(voxd.webhook, form)
        async with httpx.AsyncClient() as client:
            body = (await client.post(voxd.webhook, data=form,
                                      headers={"X-Twilio-Signature": signature})).text
        return ET.fromstring(body).find("Connect/Stream").get("url")

    def start_with(call_sid: str, **parameters: str) -> str:
        message = json.loads(start_message())
        message["start"]["customParameters"] = {"from": "+1", "to": "+2", **parameters}
        message["start"]["callSid"] = call_sid
        return json.dumps(message)

    async def outcome(url: str, start: str) -> str:
        signature = RequestValidator(voxd.token).compute_signature(url, {})
        try:
            async with trio_websocket.open_websocket_url(
                    url, extra_headers=[(b"X-Twilio-Signature", signature.encode())]) as ws:
                await ws.send_message(CONNECTED)
                await ws.send_message(start)
                await ws.send_message(media())
                with trio.move_on_after(0.5):
                    try:
                        while True:
                            await ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        return "closed"
                return "open"
        except trio_websocket.ConnectionRejected as exc:
            return f"refused {exc.status_code}"

    sids = ["CA" + f"{i:x}" * 32 for i in range(1, 7)]
    url = await stream_url(sids[0])
    token = url.rsplit("/", 1)[1]
    assert await outcome(origin + "/media-stream", start_with(sids[0])) == "refused 403"
    for bad in (token[:-4] + "AAAA",  # forged
                token.replace(".", ".0", 2),  # the expiry spelled otherwise
                "v3.%C2%B9%C2%B2", "x" * 5000, token + "%0d%0a"):
        assert await outcome(f"{origin}/media-stream/{bad}", start_with(sids[0])) == \
            "refused 403", bad
    assert await outcome(await stream_url(sids[1]), start_with(sids[2])) == "closed"
    assert await outcome(await stream_url(sids[3]), start_with(sids[3], **{"from": "+9"})) == \
        "closed"  # a forged caller number
    assert await outcome(await stream_url(sids[4]), start_with(sids[4], extra="x")) == \
        "closed"  # a parameter added
    assert await outcome(url, start_with(sids[0])) == "open"  # the real one
    assert await outcome(url, start_with(sids[0])) == "refused 403"  # replayed
    reasons = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert not any(r.exc_info for r in caplog.records)  # one line each, no traceback
    assert any("no stream token" in r for r in reasons)
    assert any("malformed" in r for r in reasons) and any("forged" in r for r in reasons)
    assert any("not the one its token was issued for" in r for r in reasons)
    assert sum("parameters were changed" in r for r in reasons) == 2
    assert any("already used" in r for r in reasons)


async def test_calls_end_at_the_maximum_duration(start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(assistant={"audio": "mulaw"}, call={"max_call_seconds": 0.6})
    caller = np.concatenate([burst(0.4), silence(2.6)])
    with trio.fail_after(3):
        report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)
    assert report.closed_by == "voxd" and len(report.caller_frames) < 60
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    lines = [r.getMessage() for r in caplog.records]
    assert any("call reached call.max_call_seconds (1s)" in line for line in lines)
    assert any("reason=max-duration" in line for line in lines)


async def test_an_oversized_media_payload_is_refused(start_voxd, caplog):
    voxd = await start_voxd(call={"max_payload_bytes": 400, "stream_token": False})
    async with await open_stream(voxd) as ws:
        for message in (CONNECTED, start_message(), media(payload="AAAA" * 135)):
            await ws.send_message(message)
        with trio.fail_after(1), pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    assert any("media payload of about 405 bytes exceeds the limit of 400 "
               "(call.max_payload_bytes)" in r.getMessage() for r in caplog.records)


async def test_a_twilio_that_stops_reading_ends_the_call(start_voxd, caplog, monkeypatch):
    """A stalled reader (its TCP window shut) is simulated at the socket adapter: after 5
    frames of the assistant's answer, a send never completes, a send without waiting leaves
    all of its frame owed, and writing what is owed never completes."""
    from voxd.twilio.media_socket import TwilioMediaSocket as WsTwilioSocket

    caplog.set_level(logging.INFO)
    real_send, real_send_nowait = WsTwilioSocket.send, WsTwilioSocket.send_nowait
    sent = 0

    def stalled(text: str) -> bool:
        nonlocal sent
        if '"media"' in text:
            sent += 1
        return sent > 5

    async def stalling_send(self, text: str) -> None:
        if stalled(text):
            await trio.sleep_forever()
        await real_send(self, text)

    def stalling_send_nowait(self, text: str) -> bool:
        return False if stalled(text) else real_send_nowait(self, text)

    async def stalling_flush(self) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(WsTwilioSocket, "send", stalling_send)
    monkeypatch.setattr(WsTwilioSocket, "send_nowait", stalling_send_nowait)
    monkeypatch.setattr(WsTwilioSocket, "flush", stalling_flush)
    voxd = await start_voxd(assistant={"audio": "mulaw"}, call={"send_timeout": 0.5})
    caller = np.concatenate([burst(0.6), silence(4.0)])
    with trio.fail_after(4):
        report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)
        await voxd.runtime.wait_idle()
    assert report.closed_by == "voxd" and report.media_received == 5
    lines = [r.getMessage() for r in caplog.records]
    assert any("Twilio stopped reading" in line and "(call.send_timeout)" in line
               for line in lines), lines
    assert any("reason=twilio-stalled" in line for line in lines)

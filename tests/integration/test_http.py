"""The HTTP side: the voice webhook's TwiML, signatures, health, and connections closing."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from tests.integration.waiting import wait_until
from voxd.sim.caller import TwilioSimulator

FORM = {"CallSid": "CA" + "a" * 32, "AccountSid": "AC" + "b" * 32, "From": "+15551230000",
        "To": "+15559870000", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
        "Direction": "inbound"}


def signed(voxd, url: str, form: dict[str, str]) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(voxd.token).compute_signature(url, form)}


async def test_webhook_answers_connect_stream_then_the_fallback(start_voxd):
    """With REST call control (the auth token is there), the fallback follows the stream: it
    runs if voxd never gets to say anything else (a crash)."""
    voxd = await start_voxd(call={"fallback_twiml": "<Say>Try later.</Say><Hangup/>"},
                            twilio={"rest_call_control": True,
                                    "api_base_url": "http://127.0.0.1:9"})
    async with httpx.AsyncClient() as client:
        r = await client.post(voxd.webhook, data=FORM, headers=signed(voxd, voxd.webhook, FORM))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(r.text)
    assert [v.tag for v in root] == ["Connect", "Say", "Hangup"]
    stream = root.find("Connect/Stream")
    base, token = stream.get("url").rsplit("/", 1)
    assert base == voxd.origin.replace("http://", "ws://") + "/media-stream"
    assert token.startswith("v3." + FORM["CallSid"] + ".")  # each call its own stream URL
    params = {p.get("name"): p.get("value") for p in stream.iter("Parameter")}
    assert params == {"from": "+15551230000", "to": "+15559870000"}


async def test_without_rest_the_stream_has_an_action_and_nothing_after_it(start_voxd):
    voxd = await start_voxd(call={"fallback_twiml": "<Say>Try later.</Say>"})
    async with httpx.AsyncClient() as client:
        r = await client.post(voxd.webhook, data=FORM, headers=signed(voxd, voxd.webhook, FORM))
        root = ET.fromstring(r.text)
        assert [v.tag for v in root] == ["Connect"]
        action = root.find("Connect").get("action")
        assert action == voxd.origin + "/twilio/stream-ended"
        # nothing left for the call (a failure, or a crash): the fallback
        after = {"CallSid": FORM["CallSid"], "AccountSid": FORM["AccountSid"],
                 "CallStatus": "in-progress"}
        answer = await client.post(action, data=after, headers=signed(voxd, action, after))
        assert answer.status_code == 200
        assert [(v.tag, v.text) for v in ET.fromstring(answer.text)] == [("Say", "Try later.")]
        # the action is signed like the webhook, and takes only a well-formed CallSid
        forged = await client.post(action, data=after, headers=signed(voxd, voxd.webhook, after))
        assert forged.status_code == 403
        bad = {**after, "CallSid": "../../etc/passwd"}
        assert (await client.post(action, data=bad, headers=signed(voxd, action, bad))
                ).status_code == 400


async def test_dial_ended_hangs_up_after_a_conversation_else_says_nobody_answered(start_voxd):
    voxd = await start_voxd(transfer={"no_answer_twiml": "<Say>Nobody.</Say>"})
    url = voxd.origin + "/twilio/dial-ended"
    async with httpx.AsyncClient() as client:
        for status, verbs in [("completed", ["Hangup"]), ("answered", ["Hangup"]),
                              ("no-answer", ["Say"]), ("busy", ["Say"]), ("failed", ["Say"])]:
            form = {"CallSid": FORM["CallSid"], "DialCallStatus": status}
            r = await client.post(url, data=form, headers=signed(voxd, url, form))
            assert [v.tag for v in ET.fromstring(r.text)] == verbs, status


async def test_webhook_signature_is_checked_against_the_public_url(start_voxd):
    voxd = await start_voxd()
    async with httpx.AsyncClient() as client:
        unsigned = await client.post(voxd.webhook, data=FORM)
        forged = await client.post(voxd.webhook, data=FORM,
                                   headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"})
        tampered = await client.post(voxd.webhook, data={**FORM, "From": "+1666"},
                                     headers=signed(voxd, voxd.webhook, FORM))
        wrong_url = await client.post(
            voxd.webhook, data=FORM,
            headers=signed(voxd, "https://elsewhere.example/twilio/voice", FORM))
        good = await client.post(voxd.webhook, data=FORM, headers=signed(voxd, voxd.webhook, FORM))
        query = voxd.webhook + "?tenant=7"
        good_query = await client.post(query, data=FORM, headers=signed(voxd, query, FORM))
    assert [r.status_code for r in (unsigned, forged, tampered, wrong_url)] == [403] * 4
    assert good.status_code == 200 and good_query.status_code == 200


async def test_webhook_by_get_is_signed_over_the_url(start_voxd):
    """A number can be configured to GET the webhook: the parameters are in the signed URL."""
    voxd = await start_voxd()
    url = str(httpx.URL(voxd.webhook, params=FORM))
    async with httpx.AsyncClient() as client:
        good = await client.get(url, headers=signed(voxd, url, {}))
        bad = await client.get(url, headers=signed(voxd, voxd.webhook, {}))
    assert good.status_code == 200 and "<Connect" in good.text
    assert bad.status_code == 403


async def test_webhook_without_validation_needs_no_signature(start_voxd):
    voxd = await start_voxd(signed=False)
    async with httpx.AsyncClient() as client:
        r = await client.post(voxd.webhook, data=FORM)
        missing = await client.post(voxd.webhook, data={"From": "+1"})
    assert r.status_code == 200
    assert missing.status_code == 400


async def test_media_upgrade_signature_is_checked(start_voxd):
    voxd = await start_voxd(call={"stream_token": False})
    good = RequestValidator(voxd.token).compute_signature(voxd.stream_url, {})
    https_form = RequestValidator(voxd.token).compute_signature(
        voxd.stream_url.replace("ws://", "http://"), {})
    for headers in ([], [(b"X-Twilio-Signature", b"Zm9yZ2Vk")],
                    [(b"X-Twilio-Signature", https_form.encode())]):
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(voxd.stream_url, extra_headers=headers):
                pass
        assert rejected.value.status_code == 403
    async with trio_websocket.open_websocket_url(
            voxd.stream_url, extra_headers=[(b"X-Twilio-Signature", good.encode())]) as ws:
        await ws.send_message('{"event":"connected","protocol":"Call","version":"1.0.0"}')


async def test_health_and_readiness(start_voxd):
    voxd = await start_voxd()
    async with httpx.AsyncClient() as client:
        assert (await client.get(voxd.origin + "/healthz")).status_code == 200
        assert (await client.get(voxd.origin + "/readyz")).status_code == 200
        metrics = await client.get(voxd.origin + "/metrics")
    assert metrics.status_code == 200 and "voxd_calls_active" in metrics.text


async def test_http_connection_closes_after_a_response(start_voxd):
    """design.md pitfall: without the shielded send, Hypercorn (trio) + Quart-Trio never close
    a connection after its response, even with `Connection: close`."""
    voxd = await start_voxd()
    host, port = voxd.origin.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = b""
    with trio.fail_after(2):
        while chunk := await stream.receive_some(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    await stream.aclose()


async def test_one_request_per_connection_even_when_the_client_asks_to_keep_it(start_voxd):
    """By design nothing is kept alive (voxd/routes.py, `_shielded`): a client that asks for
    keep-alive (HTTP/1.1's default) and sends a second request on the same connection gets one
    answer, saying `Connection: close`, and then the close; the second request is not served.
    A keep-alive client (httpx) is served all the same: it opens a connection per request."""
    voxd = await start_voxd()
    host, port = voxd.origin.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    await stream.send_all(request)
    received = b""
    with trio.fail_after(2):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(4096)
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head, head
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(request)  # the second request (it may meet the close already)
    with trio.fail_after(2):  # voxd closes the connection instead of keeping it
        try:
            while chunk := await stream.receive_some(4096):
                received += chunk
        except trio.BrokenResourceError:  # a reset (the second request was unread) is a close
            pass
    await stream.aclose()
    assert received.count(b"HTTP/1.1 ") == 1, received
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(voxd.origin + "/healthz")).status_code == 200


async def test_at_capacity_the_webhook_answers_the_fallback(start_voxd):
    voxd = await start_voxd(call={"max_concurrent_calls": 1})
    voxd.runtime.call_started(object())  # one call in progress
    async with httpx.AsyncClient() as client:
        r = await client.post(voxd.webhook, data=FORM, headers=signed(voxd, voxd.webhook, FORM))
        ready = await client.get(voxd.origin + "/readyz")
    root = ET.fromstring(r.text)
    assert [v.tag for v in root] == ["Say"]
    assert ready.status_code == 503


async def test_metrics_export_every_name_of_the_public_surface(start_voxd):
    voxd = await start_voxd(signed=False)
    await TwilioSimulator(voxd.webhook).call(np.zeros(4000, np.int16))
    async with httpx.AsyncClient() as client:
        text = (await client.get(voxd.origin + "/metrics")).text
    for name in ("voxd_calls_active", "voxd_calls_total", "voxd_calls_rejected_total",
                 "voxd_media_frames_total", "voxd_media_frames_dropped_total",
                 "voxd_upstream_connect_seconds", "voxd_turn_latency_seconds",
                 "voxd_barge_ins_total", "voxd_errors_total"):
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'voxd_media_frames_total{direction="inbound"}' in text
    assert "voxd_upstream_connect_seconds_bucket" in text


async def test_frame_counts_reach_the_metrics_while_the_call_lasts(start_voxd, monkeypatch):
    from voxd.call import session
    from voxd.observability import metrics

    monkeypatch.setattr(session, "METRICS_INTERVAL", 0.2)
    voxd = await start_voxd(signed=False)

    def inbound() -> float:
        return metrics.REGISTRY.get_sample_value("voxd_media_frames_total",
                                                 {"direction": "inbound"}) or 0.0

    before = inbound()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(TwilioSimulator(voxd.webhook).call, np.zeros(8000, np.int16), 2.0)
        await wait_until(lambda: inbound() > before, 1.5,
                         "inbound frames reach the metrics while the call lasts")
        during = inbound() - before
        assert voxd.runtime.calls, "the call ended before its frames were counted"
    assert 0 < during < 100  # counted live: part of the call's 100 frames
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    assert inbound() - before == 100  # and exactly all of them at the end


UPGRADE = ("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def exchange(origin: str, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything voxd answers until it closes."""
    host, port = origin.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    answer = b""
    with trio.fail_after(5):
        await stream.send_all(data)
        while chunk := await stream.receive_some(4096):
            answer += chunk
    await stream.aclose()
    return answer


@pytest.mark.parametrize("path", ["/media%2Dstream", "/media-stream/", "//media-stream",
                                  "/Media-Stream", "/nope", "/healthz"])
async def test_only_the_media_path_takes_a_websocket(start_voxd, caplog, path):
    """One media path: an upgrade of any other spelling or path is answered 404 by voxd
    itself (with a byte more after it: Hypercorn once died of that), and no call starts."""
    voxd = await start_voxd(signed=False)
    answer = await exchange(voxd.origin, UPGRADE.format(path=path).encode() + b"x")
    assert answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 403 "))  # 403: no valid token
    assert not any("call started" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient() as client:
        assert (await client.get(voxd.origin + "/healthz")).status_code == 200


async def test_a_websocket_as_a_later_request_is_refused(start_voxd, caplog):
    """An upgrade pipelined after an HTTP request reaches the HTTP app, which has no media
    path: refused before it is accepted, whatever its path."""
    voxd = await start_voxd(signed=False)
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await exchange(voxd.origin, first + UPGRADE.format(path="/media-stream").encode())
    assert b" 101 " not in answer
    assert not any("call started" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("call_sid", ["", "CA1", "ca" + "a" * 32, "CA" + "A" * 32,
                                      "CA" + "a" * 32 + "\r\nX: y", "CA" + "ä" * 32])
async def test_the_webhook_takes_only_twilio_callsids(start_voxd, caplog, call_sid):
    voxd = await start_voxd(signed=False)
    async with httpx.AsyncClient() as client:
        r = await client.post(voxd.webhook, data={**FORM, "CallSid": call_sid})
    assert r.status_code == 400
    lines = [r.getMessage() for r in caplog.records if "voice webhook" in r.getMessage()]
    assert len(lines) == 1 and "\r" not in lines[0] and "\n" not in lines[0]


async def test_refused_webhooks_log_nothing_the_attacker_sent_and_are_throttled(
        start_voxd, caplog):
    """A rejected webhook's line names the URL voxd expects, never the query string the
    request carried, and a flood of them is one line per 10 s (with a count)."""
    voxd = await start_voxd()
    async with httpx.AsyncClient() as client:
        for _ in range(20):
            r = await client.post(voxd.webhook + "?" + "%1b[2J" * 100, data=FORM)
            assert r.status_code == 403
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1
    assert "\x1b" not in lines[0] and "2J" not in lines[0] and len(lines[0]) < 300


async def test_no_stack_name_in_the_server_header(start_voxd):
    voxd = await start_voxd()
    async with httpx.AsyncClient() as client:
        r = await client.get(voxd.origin + "/healthz")
    assert "server" not in r.headers


async def test_metrics_can_move_off_the_public_port(start_voxd):
    """server.metrics_listen: /metrics answers there and no longer on the call port."""
    from voxd.server import bound_origin, open_listener

    probe = open_listener("127.0.0.1:0")  # a free port for the metrics address
    metrics_origin = bound_origin(probe)
    probe.close()
    voxd = await start_voxd(server={"metrics_listen": metrics_origin.removeprefix("http://")})
    async with httpx.AsyncClient() as client:
        assert (await client.get(voxd.origin + "/metrics")).status_code == 404
        r = await client.get(metrics_origin + "/metrics")
        assert r.status_code == 200 and "voxd_calls_active" in r.text
        assert (await client.get(metrics_origin + "/twilio/voice")).status_code == 404


async def test_a_replayed_webhook_is_worth_nothing_without_twilios_next_signature(start_voxd):
    """A captured signed webhook can be posted again and yields a new stream URL; but the
    upgrade needs Twilio's signature of that exact URL, so the signature captured with the
    first one opens nothing."""
    voxd = await start_voxd()
    headers = signed(voxd, voxd.webhook, FORM)
    async with httpx.AsyncClient() as client:
        first = ET.fromstring((await client.post(voxd.webhook, data=FORM, headers=headers)).text)
        first_url = first.find("Connect/Stream").get("url")
        replay_url = first_url

        async def replay() -> bool:
            nonlocal replay_url
            again = await client.post(voxd.webhook, data=FORM, headers=headers)
            replay_url = ET.fromstring(again.text).find("Connect/Stream").get("url")
            return replay_url != first_url

        # The token's expiry counts whole seconds: within the next one the replay yields a
        # new stream URL.
        with trio.move_on_after(2.5):
            while True:
                if await replay():
                    break
                await trio.sleep(0.05)
    assert replay_url != first_url, "a replayed webhook never yielded a new stream URL"
    captured = RequestValidator(voxd.token).compute_signature(first_url, {})
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(
                replay_url, extra_headers=[(b"X-Twilio-Signature", captured.encode())]):
            pass
    assert rejected.value.status_code == 403

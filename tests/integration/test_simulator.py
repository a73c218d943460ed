"""The simulator plays Twilio's part faithfully: playback in real time, marks, clear."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
from functools import partial

import httpx
import hypercorn.trio
import numpy as np
import pytest
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from tests.fakes.twilio_rest import FakeTwilioRest
from voxd.audio.dtmf import decode_ulaw, tones_ulaw
from voxd.sim.caller import (
    CallReport,
    StreamInstruction,
    TwilioSimulator,
    _Stream,
    find_dial,
    parse_dtmf,
    parse_twiml,
)
from voxd.sim.rest import SimulatedRest


def test_parse_twiml_finds_the_stream_and_what_follows():
    found = parse_twiml('<?xml version="1.0"?><Response><Connect><Stream url="wss://h/m">'
                        '<Parameter name="a" value="1"/></Stream></Connect><Say>bye</Say>'
                        "</Response>")
    assert found == StreamInstruction("wss://h/m", {"a": "1"}, "<Say>bye</Say>")
    assert found.action == ""


def test_parse_twiml_finds_the_connect_action():
    found = parse_twiml('<Response><Connect action="https://v/twilio/stream-ended">'
                        '<Stream url="wss://h/m"/></Connect></Response>')
    assert found == StreamInstruction("wss://h/m", {}, "", "https://v/twilio/stream-ended")


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


# -- in-call control: keypad both ways, <Connect action>, Twilio REST -------------------------


TOKEN = "simulator-test-token"


class Media:
    """A fake voxd's end of one media stream: every message the simulator sent, with its
    arrival time (seconds since `start` arrived) and its raw text."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.start: dict = {}
        self.t0 = 0.0
        self.received: list[tuple[float, str]] = []
        self.closed = trio.Event()
        self.close_code: int | None = None

    @property
    def sid(self) -> str:
        return self.start["streamSid"]

    def events(self, name: str) -> list[tuple[float, dict]]:
        return [(t, json.loads(raw)) for t, raw in self.received
                if json.loads(raw)["event"] == name]

    async def read_all(self) -> None:
        try:
            while True:
                self.received.append((trio.current_time() - self.t0, await self.ws.get_message()))
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            self.closed.set()

    async def play(self, ulaw: bytes) -> None:
        for i in range(0, len(ulaw), 160):
            payload = base64.b64encode(ulaw[i:i + 160]).decode()
            await self.ws.send_message(json.dumps(
                {"event": "media", "streamSid": self.sid, "media": {"payload": payload}}))

    async def send(self, event: str) -> None:
        await self.ws.send_message(json.dumps({"event": event, "streamSid": self.sid}))


class FakeVoxd:
    """A stand-in for voxd: the webhook answers `twiml` ({stream} and {origin} filled in), any
    other POST is recorded with its form and whether its signature is valid, and answered with
    `answers[path]`; the media WebSocket runs `script(media)`."""

    def __init__(self, script, twiml: str = '<Response><Connect><Stream url="{stream}"/>'
                                           "</Connect></Response>",
                 answers: dict[str, str] | None = None) -> None:
        self.script = script
        self.twiml = twiml
        self.answers = answers or {}
        self.requests: list[tuple[str, dict[str, str], bool]] = []
        self.origin = self.stream = ""
        self.media: list[Media] = []

    async def start(self, nursery: trio.Nursery) -> str:
        server = await nursery.start(trio_websocket.serve_websocket, self._media,
                                     "127.0.0.1", 0, None)
        self.stream = f"ws://127.0.0.1:{server.port}/media-stream"
        app = QuartTrio("fake-voxd")
        validator = RequestValidator(TOKEN)

        @app.post("/<path:path>")
        async def anything(path: str):
            form = dict((await request.form).items())
            signed = validator.validate(self.origin + "/" + path, form,
                                        request.headers.get("X-Twilio-Signature", ""))
            if path == "twilio/voice":
                return self.twiml.format(stream=self.stream, origin=self.origin)
            self.requests.append(("/" + path, form, signed))
            return self.answers.get("/" + path, ("not here", 404))

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = config.errorlog = None
        [self.origin] = await nursery.start(hypercorn.trio.serve, app, config)
        return self.origin + "/twilio/voice"

    async def _media(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        media = Media(ws)
        self.media.append(media)
        media.received.append((0.0, await ws.get_message()))  # connected
        start = await ws.get_message()
        media.t0 = trio.current_time()
        media.received.append((0.0, start))
        media.start = json.loads(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(media.read_all)
            await self.script(media)
            await media.closed.wait()


async def close_after(seconds: float, media: Media) -> None:
    await trio.sleep(seconds)
    await media.ws.aclose()


async def idle(media: Media) -> None:
    pass


def times(report: CallReport, prefix: str) -> list[tuple[float, str]]:
    return [(t, what) for t, what in report.events if what.startswith(prefix)]


async def test_key_presses_are_dtmf_events_at_their_times(nursery):
    voxd = FakeVoxd(idle)
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN)
    report = await sim.call(np.zeros(8000, np.int16), seconds=1.2,
                            dtmf=[("#", 0.8), ("1", 0.3), ("b", 0.8)])
    [media] = voxd.media
    sequence = [json.loads(raw).get("sequenceNumber") for _, raw in media.received]
    assert sequence == [None, *map(str, range(1, len(sequence)))]  # start is 1, no gaps
    presses = [(t, raw) for t, raw in media.received if '"dtmf"' in raw]
    assert [json.loads(raw) for _, raw in presses] == [
        {"event": "dtmf", "sequenceNumber": json.loads(raw)["sequenceNumber"],
         "streamSid": sim.stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}}
        for digit, (_, raw) in zip("1#B", presses, strict=True)]
    assert presses[0][1].startswith('{"event":"dtmf","sequenceNumber":"')  # Twilio's order
    assert 0.27 <= presses[0][0] <= 0.36
    assert 0.77 <= presses[1][0] <= presses[2][0] <= 0.86
    assert report.keys_pressed == "1#B"
    assert [what for _, what in times(report, "caller pressed")] == [
        "caller pressed 1", "caller pressed #", "caller pressed B"]
    assert "caller pressed 1" in report.render()
    assert report.closed_by == "caller" and media.events("stop")


async def test_bad_key_presses_are_refused_before_calling():
    sim = TwilioSimulator("http://127.0.0.1:9/unused")
    with pytest.raises(ValueError, match="not a keypad key"):
        await sim.call(np.zeros(800, np.int16), dtmf=[("x", 0.1)])
    with pytest.raises(ValueError, match="after the call's end"):
        await sim.call(np.zeros(800, np.int16), seconds=1.0, dtmf=[("1", 1.5)])


def test_parse_dtmf_and_its_errors():
    assert parse_dtmf("1@2.0s, #@3.5s,a@0") == [("A", 0.0), ("1", 2.0), ("#", 3.5)]
    for text, problem in [("1", "expected KEY@SECONDS"), ("x@1s", "not a keypad key"),
                          ("12@1s", "not a keypad key"), ("1@soon", "not a time"),
                          ("1@-1s", "0 or more"), ("1@nan", "0 or more"),
                          ("1@1s,", "expected KEY@SECONDS")]:
        with pytest.raises(ValueError, match=problem):
            parse_dtmf(text)
    with pytest.raises(ValueError, match=r"'#@9s': after the call's end \(5.0s\)"):
        parse_dtmf("1@1s,#@9s", 5.0)


async def test_tones_heard_are_decoded_and_cleared_tones_are_not(nursery):
    async def play_tones(media: Media) -> None:
        await media.play(tones_ulaw("12#"))          # 0.6 s of tones
        await media.play(b"\xff" * 8000)             # 1 s of silence
        await media.play(tones_ulaw("9"))            # queued behind it ...
        await trio.sleep(1.0)
        await media.send("clear")                    # ... and dropped before it plays

    voxd = FakeVoxd(play_tones)
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN)
    report = await sim.call(np.zeros(8000, np.int16), seconds=2.5)
    assert report.tones_heard == "12#"
    assert decode_ulaw(bytes(report.received_audio)) == "12#9"  # sent, not heard
    heard = [(t, what) for t, what in report.events if what.startswith("tone heard")]
    assert [what for _, what in heard] == ["tone heard: 1", "tone heard: 2", "tone heard: #"]
    assert 0.0 < heard[0][0] < 0.2 and 0.4 < heard[2][0] < 0.7
    assert report.clears == 1
    assert "tones heard 12#" in report.render()


ACTION_TWIML = ('<Response><Connect action="{origin}/twilio/stream-ended"><Stream url="{stream}">'
                '<Parameter name="t" value="1"/></Stream></Connect></Response>')


async def test_connect_action_is_requested_signed_and_its_answer_runs_next(nursery):
    voxd = FakeVoxd(partial(close_after, 0.3), ACTION_TWIML,
                    {"/twilio/stream-ended": "<Response><Say>Bye.</Say><Hangup/></Response>"})
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN)
    report = await sim.call(np.zeros(8000, np.int16), seconds=3)
    assert report.closed_by == "voxd"
    [(path, form, signed)] = voxd.requests
    assert path == "/twilio/stream-ended" and signed
    assert form == {"AccountSid": sim.account_sid, "CallSid": sim.call_sid,
                    "CallStatus": "in-progress", "From": sim.from_number, "To": sim.to_number,
                    "Direction": "inbound", "ApiVersion": "2010-04-01"}
    assert report.next_twiml == "<Say>Bye.</Say><Hangup/>"
    assert report.after_stream == "" and report.transferred_to == ""
    assert any(what == "after the stream: <Say>Bye.</Say><Hangup/>" for _, what in report.events)
    assert "Connect action: POST /twilio/stream-ended (CallStatus=in-progress) -> HTTP 200" in (
        report.render())


async def test_connect_action_after_the_caller_hangs_up_says_completed(nursery):
    twiml = ACTION_TWIML.replace("{origin}/twilio/stream-ended", "/twilio/stream-ended")
    voxd = FakeVoxd(idle, twiml, {"/twilio/stream-ended": "<Response><Hangup/></Response>"})
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN)
    report = await sim.call(np.zeros(8000, np.int16), seconds=0.5)
    [(_, form, signed)] = voxd.requests  # a relative action, resolved against the webhook
    assert signed and form["CallStatus"] == "completed"
    assert report.closed_by == "caller" and report.next_twiml == ""
    assert any("after the stream: nothing" in what for _, what in report.events)


async def test_without_an_action_the_verbs_after_connect_run_next(nursery):
    twiml = ('<Response><Connect><Stream url="{stream}"/></Connect>\n  <Say>Sorry.</Say>\n'
             "</Response>")
    voxd = FakeVoxd(partial(close_after, 0.2), twiml)
    report = await TwilioSimulator(await voxd.start(nursery)).call(np.zeros(800, np.int16), 2)
    assert report.after_stream == report.next_twiml == "<Say>Sorry.</Say>"
    assert voxd.requests == []
    # said where it comes from, so a fallback apology does not read as the simulator's error
    assert ("after the stream: <Say>Sorry.</Say> (the verbs after </Connect>, which Twilio "
            "runs when the stream ends without a hang-up)") in report.render()


async def test_after_the_caller_hangs_up_the_verbs_after_connect_are_not_mentioned(nursery):
    twiml = '<Response><Connect><Stream url="{stream}"/></Connect><Say>Sorry.</Say></Response>'
    voxd = FakeVoxd(idle, twiml)
    report = await TwilioSimulator(await voxd.start(nursery)).call(np.zeros(800, np.int16), 0.4)
    assert report.closed_by == "caller" and report.next_twiml == ""
    assert "Sorry" not in report.render()
    assert "after the stream: nothing, the call ends (the caller hung up)" in report.render()


async def rest_update(media: Media, rest: SimulatedRest, **form: str) -> httpx.Response:
    """voxd's REST request about the call on `media`, as Twilio's client makes it."""
    start = media.start["start"]
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{rest.base_url}/2010-04-01/Accounts/{start['accountSid']}/Calls/"
            f"{start['callSid']}.json", data=form, auth=(rest.account_sid, rest.auth_token))


async def test_rest_hang_up_stops_and_closes_the_stream(nursery):
    rest = SimulatedRest(auth_token=TOKEN)
    await nursery.start(rest.serve)
    answered: list[tuple[dict, bool]] = []

    async def hang_up(media: Media) -> None:
        await trio.sleep(0.4)
        response = await rest_update(media, rest, Status="completed")
        answered.append((response.json(), bool(media.events("stop"))))

    voxd = FakeVoxd(hang_up, ACTION_TWIML, {"/twilio/stream-ended": "<Response/>"})
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN, rest=rest)
    assert sim.account_sid == rest.account_sid  # the account voxd authenticates as
    started = trio.current_time()
    report = await sim.call(np.zeros(8000, np.int16), seconds=5)
    assert trio.current_time() - started < 2  # ended by the REST request, not the audio
    [media] = voxd.media
    [(body, stopped_first)] = answered
    assert body["status"] == "completed" and body["sid"] == sim.call_sid
    assert stopped_first  # Twilio answers once the stream got its stop
    [(_, stop)] = media.events("stop")
    assert stop["stop"] == {"accountSid": rest.account_sid, "callSid": sim.call_sid}
    assert media.closed.is_set() and media.close_code == 1000
    assert report.closed_by == "rest" and report.next_twiml == ""
    assert [what for _, what in report.events if what.startswith(("Twilio", "after"))] == [
        "Twilio REST: call hung up", "Twilio ended the stream (stop sent)",
        "after the stream: nothing, the call ends (hung up over REST)"]
    [(_, form, _)] = voxd.requests
    assert form["CallStatus"] == "completed"
    assert rest.updates == [{"account": rest.account_sid, "call_sid": sim.call_sid,
                             "Status": "completed"}]
    # the call is over: Twilio refuses to update it again
    response = await rest_update(media, rest, Status="completed")
    assert response.status_code == 400 and response.json()["code"] == 21220


DIAL = ('<Response><Say>Transferring you.</Say><Dial callerId="+15005550001" timeout="20" '
        'action="{origin}/twilio/dial-ended"><Number>+14155550100</Number></Dial></Response>')


async def test_rest_dial_redirect_transfers_the_call(nursery):
    rest = SimulatedRest(auth_token=TOKEN)
    await nursery.start(rest.serve)

    async def transfer(media: Media) -> None:
        await trio.sleep(0.3)
        response = await rest_update(media, rest, Twiml=DIAL.format(origin=voxd.origin))
        assert response.status_code == 200 and response.json()["status"] == "in-progress"

    voxd = FakeVoxd(transfer, '<Response><Connect><Stream url="{stream}"/></Connect>'
                              "<Say>Sorry.</Say></Response>",
                    {"/twilio/dial-ended": "<Response><Hangup/></Response>"})
    sim = TwilioSimulator(await voxd.start(nursery), auth_token=TOKEN, rest=rest,
                          dial_status="no-answer")
    report = await sim.call(np.zeros(8000, np.int16), seconds=5)
    [media] = voxd.media
    assert media.events("stop") and media.close_code == 1000
    assert report.closed_by == "rest"
    dial = ('<Dial callerId="+15005550001" timeout="20" action="'
            f'{voxd.origin}/twilio/dial-ended"><Number>+14155550100</Number></Dial>')
    assert report.next_twiml == "<Say>Transferring you.</Say>" + dial  # not the <Say>Sorry.
    assert report.transferred_to == "+14155550100"
    events = [what for _, what in report.events]
    assert "Twilio REST: call redirected" in events
    assert f"transferred: {dial}" in events
    [(path, form, signed)] = voxd.requests
    assert path == "/twilio/dial-ended" and signed
    assert form["DialCallStatus"] == "no-answer" and form["CallSid"] == sim.call_sid
    assert report.after_dial == "<Hangup/>"


def test_find_dial_names_whom_it_calls():
    assert find_dial('<Say>x</Say><Dial><Sip>sip:desk@pbx.example.com</Sip></Dial>') == (
        "<Dial><Sip>sip:desk@pbx.example.com</Sip></Dial>", "sip:desk@pbx.example.com")
    assert find_dial("<Dial> +14155550100 </Dial>")[1] == "+14155550100"
    assert find_dial("<Hangup/>") is None


async def test_rest_refuses_bad_credentials_and_unknown_calls(nursery):
    rest = SimulatedRest(auth_token=TOKEN)
    await nursery.start(rest.serve)
    url = f"{rest.base_url}/2010-04-01/Accounts/{rest.account_sid}/Calls/CA{'0' * 32}.json"
    async with httpx.AsyncClient() as client:
        wrong = await client.post(url, data={"Status": "completed"},
                                  auth=(rest.account_sid, "not-the-token"))
        missing = await client.post(url, data={"Status": "completed"})
        unknown = await client.post(url, data={"Status": "completed"},
                                    auth=(rest.account_sid, TOKEN))
        other = await client.post(url.replace(rest.account_sid, "AC" + "1" * 32),
                                  data={"Status": "completed"}, auth=(rest.account_sid, TOKEN))
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json() == {"code": 20003, "message": "Authenticate", "status": 401,
                            "more_info": "https://www.twilio.com/docs/errors/20003",
                            "detail": "Your AccountSid or AuthToken was incorrect."}
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    assert rest.refused == 2
    assert unknown.status_code == other.status_code == 404
    assert unknown.json()["code"] == 20404 and unknown.json()["status"] == 404
    assert [u["call_sid"] for u in rest.updates] == [f"CA{'0' * 32}"]  # authenticated only


async def test_the_test_fake_records_updates_to_calls_it_does_not_know(nursery):
    fake = FakeTwilioRest(account_sid="AC" + "7" * 32, auth_token=TOKEN)
    await nursery.start(fake.serve)

    def update() -> str:  # the way voxd makes it: Twilio's own client
        client = Client(fake.account_sid, TOKEN)
        client.api.base_url = fake.base_url
        return client.api.v2010.accounts(fake.account_sid).calls("CA" + "1" * 32).update(
            twiml="<Response><Hangup/></Response>").status

    assert await trio.to_thread.run_sync(update) == "in-progress"
    assert fake.updated.is_set()
    assert fake.updates == [{"account": fake.account_sid, "call_sid": "CA" + "1" * 32,
                             "Twiml": "<Response><Hangup/></Response>"}]


def test_call_dtmf_usage_errors_are_one_line_and_exit_2():
    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "voxd", "call",
                               "http://127.0.0.1:9/twilio/voice", *args],
                              capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items()
                                   if k != "VOXD_TWILIO_AUTH_TOKEN"})

    for dtmf, message in [
        ("1@1s,x@2s", "voxd: --dtmf: 'x@2s': not a keypad key (0-9, *, #, A-D)\n"),
        ("1@later", "voxd: --dtmf: '1@later': not a time in seconds\n"),
        ("5", "voxd: --dtmf: '5': expected KEY@SECONDS, e.g. 1@2.0s\n"),
        ("#@3.5s", "voxd: --dtmf: '#@3.5s': after the call's end (2.0s)\n"),
    ]:
        result = call("--seconds", "2", "--dtmf", dtmf)
        assert (result.returncode, result.stderr) == (2, message), dtmf
    no_token = call("--rest-listen", "127.0.0.1:0")
    assert no_token.returncode == 2 and no_token.stderr.startswith("voxd: --rest-listen: needs")

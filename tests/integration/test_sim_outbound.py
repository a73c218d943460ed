"""The simulated Twilio REST API places outbound calls as Twilio does: created with the real
`twilio` client, the callee rings and answers (or not), the voice webhook and the media stream
run against a real voxd, status and AMD callbacks reach the application signed, and voxd's REST
updates drive the call."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import hypercorn.trio
import numpy as np
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.audio import best_alignment
from voxd.audio.g711 import ulaw_decode
from voxd.sim.callee import HELLO_SECONDS, Callee, OutboundCall
from voxd.sim.caller import RATE
from voxd.sim.rest import SimulatedRest

TOKEN = "0123456789abcdef0123456789abcdef"
TO, FROM = "+14155550100", "+14155550199"
ALL_EVENTS = ["initiated", "ringing", "answered", "completed"]


# -- the application's side: a recording web server -------------------------------------------


@dataclass
class Received:
    """One request Twilio made to the application."""

    method: str
    path: str
    url: str
    form: dict[str, str]
    """The POST form, or a GET's query parameters."""
    signed: bool
    """Its X-Twilio-Signature matches the full URL and form under the current auth token."""


class Application:
    """The application's URLs (webhook, status and AMD callbacks): records every request.
    `/voice` answers TwiML without a stream (enough to see the webhook request), anything
    else an empty 200."""

    def __init__(self, rest: SimulatedRest) -> None:
        self.rest = rest
        self.origin = ""
        self.received: list[Received] = []
        self._changed = trio.Event()

    def url(self, path: str) -> str:
        return self.origin + path

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, ready: Callable[[], bool], seconds: float = 10) -> None:
        with trio.fail_after(seconds):
            while not ready():
                await self._changed.wait()

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        app = QuartTrio("application")

        @app.route("/<path:path>", methods=["GET", "POST"])
        async def anything(path: str) -> tuple[str, int]:
            url = self.origin + request.path  # as requested: the query string unchanged
            if request.query_string:
                url += "?" + request.query_string.decode("latin-1")
            if request.method == "POST":
                form = dict((await request.form).items())
                params = form
            else:
                form, params = dict(request.args.items()), {}
            signature = request.headers.get("X-Twilio-Signature", "")
            signed = RequestValidator(self.rest.auth_token).validate(url, params, signature)
            self.received.append(Received(request.method, "/" + path, url, form, signed))
            self._changed.set()
            self._changed = trio.Event()
            if path == "voice":
                return "<Response><Say>Hello.</Say></Response>", 200
            return "", 200

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = config.errorlog = None
        async with trio.open_nursery() as nursery:
            [self.origin] = await nursery.start(hypercorn.trio.serve, app, config)
            task_status.started(self.origin)


@pytest.fixture
def phone(nursery):
    """`await phone(callee=..., **rest_options)` -> (SimulatedRest, Application), serving."""

    async def start(callee: Callee | None = None, **options: Any) -> tuple[SimulatedRest,
                                                                            Application]:
        rest = SimulatedRest(auth_token=TOKEN, default_callee=callee, **options)
        await nursery.start(rest.serve)
        application = Application(rest)
        await nursery.start(application.serve)
        return rest, application

    return start


def client(rest: SimulatedRest, token: str | None = None) -> Client:
    """The real Twilio client, pointed at the simulated API as voxd points it."""
    twilio = Client(rest.account_sid, token or rest.auth_token)
    twilio.api.base_url = rest.base_url
    return twilio


async def create(rest: SimulatedRest, token: str | None = None, **fields: Any) -> Any:
    """`calls.create(**fields)` with the Twilio client, in a thread as voxd does."""
    calls = client(rest, token).api.v2010.accounts(rest.account_sid).calls
    return await trio.to_thread.run_sync(lambda: calls.create(**{"to": TO, "from_": FROM,
                                                                 **fields}))


async def fetch(rest: SimulatedRest, sid: str) -> Any:
    call = client(rest).api.v2010.accounts(rest.account_sid).calls(sid)
    return await trio.to_thread.run_sync(call.fetch)


async def over(rest: SimulatedRest, sid: str, seconds: float = 15) -> OutboundCall:
    with trio.fail_after(seconds):
        return await rest.wait_over(sid)


def statuses(application: Application, path: str = "/status") -> list[tuple[str, str]]:
    return [(r.form["CallStatus"], r.form["SequenceNumber"]) for r in application.on(path)]


# -- creating, refusing, fetching ---------------------------------------------------------------


@pytest.mark.parametrize(("callee", "expected"), [
    (Callee("busy"), ["initiated", "ringing", "busy"]),
    (Callee("no-answer"), ["initiated", "ringing", "no-answer"]),
    (Callee("human", ring_seconds=5), ["initiated", "ringing", "no-answer"]),  # rings too long
    (Callee("failed"), ["initiated", "failed"]),
], ids=["busy", "no-answer", "slow-human", "failed"])
async def test_an_unanswered_call_reports_its_progress_and_never_requests_the_webhook(
        phone, callee, expected):
    rest, application = await phone(callee, ring_timeout_scale=0.01)
    created = await create(rest, url=application.url("/voice?campaign=7"),
                           status_callback="status",  # relative: against the Url
                           status_callback_event=ALL_EVENTS, timeout=30)
    assert re.fullmatch(r"CA[0-9a-f]{32}", created.sid)
    assert (created.status, created.direction) == ("queued", "outbound-api")
    assert (created.to, created._from, created.account_sid) == (TO, FROM, rest.account_sid)
    assert created.uri == f"/2010-04-01/Accounts/{rest.account_sid}/Calls/{created.sid}.json"
    [record] = rest.created
    assert record["sid"] == created.sid and record["To"] == TO and record["Timeout"] == "30"
    assert record["StatusCallbackEvent"] == ALL_EVENTS  # every repeated field, in order

    call = await over(rest, created.sid)
    assert call.status == expected[-1] and call.errors == []
    if expected[-1] == "no-answer":  # rang until the (scaled) Timeout: 30 s x 0.01
        assert call.ended_at is not None and call.ended_at >= 0.3
    fetched = await fetch(rest, created.sid)
    assert (fetched.status, fetched.duration, fetched.answered_by) == (expected[-1], "0", None)
    assert fetched.start_time is None and fetched.date_created is not None
    assert application.on("/voice") == []  # nobody answered: no TwiML was asked for
    assert statuses(application) == [(s, str(n)) for n, s in enumerate(expected)]
    for sent in application.on("/status"):
        assert sent.signed and sent.method == "POST"
        assert {k: sent.form[k] for k in ("CallSid", "AccountSid", "From", "To", "Direction",
                                          "ApiVersion", "CallbackSource")} == {
            "CallSid": created.sid, "AccountSid": rest.account_sid, "From": FROM, "To": TO,
            "Direction": "outbound-api", "ApiVersion": "2010-04-01",
            "CallbackSource": "call-progress-events"}
        assert parsedate_to_datetime(sent.form["Timestamp"]).tzinfo is not None
    assert application.on("/status")[-1].form["CallDuration"] == "0"


async def test_without_events_only_completed_is_sent_and_by_get_when_asked(phone):
    rest, application = await phone(Callee("busy"))
    created = await create(rest, url=application.url("/voice"),
                           status_callback=application.url("/status?leg=1"),
                           status_callback_method="GET")
    await over(rest, created.sid)
    [sent] = application.on("/status")
    assert sent.method == "GET" and sent.signed
    assert sent.form["CallStatus"] == "busy" and sent.form["leg"] == "1"


async def test_bad_requests_are_refused_as_twilio_refuses_them(phone):
    rest, application = await phone()
    with pytest.raises(TwilioRestException) as refused:
        await create(rest, token="not-the-token", url=application.url("/voice"))
    assert (refused.value.status, refused.value.code) == (401, 20003)
    assert rest.refused == 1

    url = f"{rest.base_url}/2010-04-01/Accounts/{rest.account_sid}/Calls.json"
    good = {"To": TO, "From": FROM, "Url": application.url("/voice")}
    cases = [({k: v for k, v in good.items() if k != "To"}, 21201),
             ({k: v for k, v in good.items() if k != "From"}, 21603),
             ({k: v for k, v in good.items() if k != "Url"}, 21205),
             ({**good, "Url": "/voice"}, 21205),
             ({**good, "MachineDetection": "Sometimes"}, 20001),
             ({**good, "StatusCallbackEvent": "hung-up"}, 20001),
             ({**good, "Url": "", "Twiml": "<Say>no Response</Say>"}, 12100)]
    async with httpx.AsyncClient(auth=(rest.account_sid, TOKEN)) as http:
        for form, code in cases:
            response = await http.post(url, data=form)
            assert (response.status_code, response.json()["code"]) == (400, code), form
        other = await http.post(url.replace(rest.account_sid, "AC" + "1" * 32), data=good)
        assert other.status_code == 404
        unknown = await http.get(url.replace(".json", f"/CA{'0' * 32}.json"))
        assert unknown.status_code == 404 and unknown.json()["code"] == 20404
    assert rest.created == [] and rest.outbound == {} and application.received == []


async def test_a_call_canceled_while_ringing_is_never_answered(phone):
    rest, application = await phone(Callee("human", ring_seconds=5))
    created = await create(rest, url=application.url("/voice"),
                           status_callback=application.url("/status"),
                           status_callback_event=ALL_EVENTS)
    await application.wait_for(lambda: len(application.on("/status")) == 2)  # ringing
    assert (await fetch(rest, created.sid)).status == "ringing"
    context = client(rest).api.v2010.accounts(rest.account_sid).calls(created.sid)
    updated = await trio.to_thread.run_sync(lambda: context.update(status="canceled"))
    assert updated.status == "canceled"
    call = await over(rest, created.sid, seconds=3)  # not the 5 s of ringing
    assert call.status == "canceled" and application.on("/voice") == []
    assert statuses(application) == [("initiated", "0"), ("ringing", "1"), ("canceled", "2")]


async def test_a_failing_callback_is_recorded_and_a_broken_callee_only_ends_its_call(phone):
    # the callee presses a key after it has hung up: the simulator refuses (ValueError)
    rest, application = await phone(Callee("human", seconds=0.5, dtmf=(("1", 3.0),)))
    created = await create(rest, url=application.url("/voice"),
                           status_callback="http://127.0.0.1:9/status")
    call = await over(rest, created.sid)
    assert call.status == "completed"  # it was answered
    assert any("ValueError" in error for error in call.errors), call.errors
    [callback] = call.callbacks
    assert callback.kind == "status" and callback.http_status is None
    assert any("status callback POST http://127.0.0.1:9/status failed" in error
               for error in call.errors)
    assert (await fetch(rest, created.sid)).status == "completed"  # the fake still serves


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_the_webhook_gets_twilios_outbound_form_signed_over_its_query_string(
        phone, method):
    rest, application = await phone(Callee("human", amd_seconds=0.3))
    created = await create(rest, url=application.url("/voice?campaign=spring&list=7"),
                           method=method, machine_detection="Enable",  # synchronous AMD
                           status_callback=application.url("/status"),
                           status_callback_event=["answered"])
    call = await over(rest, created.sid)
    [webhook] = application.on("/voice")
    assert webhook.method == method and webhook.signed
    assert "campaign=spring&list=7" in webhook.url
    form = webhook.form
    assert {k: form[k] for k in ("CallSid", "AccountSid", "From", "To", "Caller", "Called",
                                 "Direction", "CallStatus", "ApiVersion")} == {
        "CallSid": created.sid, "AccountSid": rest.account_sid, "From": FROM, "To": TO,
        "Caller": FROM, "Called": TO, "Direction": "outbound-api", "CallStatus": "in-progress",
        "ApiVersion": "2010-04-01"}
    # synchronous detection: Twilio waited for it and said what it found
    assert (form["AnsweredBy"], form["MachineDetectionDuration"]) == ("human", "300")
    if method == "GET":
        assert (form["campaign"], form["list"]) == ("spring", "7")
    assert call.answered_by == "human" and call.report is None  # the TwiML had no stream
    assert any("no <Connect><Stream>" in error for error in call.errors), call.errors
    assert call.status == "completed"


def test_a_callee_is_checked_when_made():
    with pytest.raises(ValueError, match="not a kind of callee"):
        Callee("robot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ring_seconds"):
        Callee(ring_seconds=-1)


# -- against voxd ---------------------------------------------------------------------------------


async def voxd_line(start_voxd, rest: SimulatedRest, **sections: Any):
    """voxd controlling calls through the simulated API, with its auth token."""
    voxd = await start_voxd(twilio={"rest_call_control": True, "api_base_url": rest.base_url},
                            **sections)
    rest.auth_token = voxd.token
    return voxd


async def test_a_human_answers_and_hears_its_hello_echoed_by_voxd(phone, start_voxd):
    rest, application = await phone(Callee("human", seconds=3.0))
    voxd = await voxd_line(start_voxd, rest, assistant={"provider": "echo", "audio": "mulaw"})
    created = await create(rest, url=voxd.webhook + "?campaign=spring&list=7",
                           status_callback=application.url("/status"),
                           status_callback_event=ALL_EVENTS)
    # voxd's webhook checks the signature over the URL with its query string: the stream
    # only starts if the simulated Twilio signed exactly what it requested
    await application.wait_for(lambda: len(application.on("/status")) == 3)  # answered
    assert (await fetch(rest, created.sid)).status == "in-progress"
    call = await over(rest, created.sid)
    report = call.report
    assert report is not None and call.errors == [] and report.errors == [], report
    assert report.call_sid == created.sid and report.closed_by == "caller"
    assert [status for _, status in call.statuses] == ["queued", "ringing", "in-progress",
                                                       "completed"]
    said = ulaw_decode(np.frombuffer(b"".join(report.caller_frames), np.uint8))
    hello = said[:round(HELLO_SECONDS * RATE)]
    heard = ulaw_decode(np.frombuffer(bytes(report.received_audio), np.uint8))
    assert np.abs(hello.astype(np.int32)).max() > 1000  # it did say something
    _, correlation = best_alignment(hello, heard)
    assert correlation > 0.95  # the echo: mu-law end to end, unchanged
    fetched = await fetch(rest, created.sid)
    assert (fetched.status, fetched.duration, fetched.answered_by) == ("completed", "3", None)
    assert fetched.start_time is not None and fetched.end_time > fetched.start_time
    assert statuses(application) == [("initiated", "0"), ("ringing", "1"),
                                     ("in-progress", "2"), ("completed", "3")]
    assert application.on("/status")[-1].form["CallDuration"] == "3"
    assert all(r.signed for r in application.received)


@pytest.mark.parametrize(("mode", "answered_by", "after"), [
    ("DetectMessageEnd", "machine_end_beep", 1.4),  # greeting 1.0 s + beep 0.4 s
    ("Enable", "machine_start", 0.6),  # amd_seconds
])
async def test_voicemail_detection_is_posted_mid_stream(phone, start_voxd, mode,
                                                       answered_by, after):
    machine = Callee("voicemail", greeting_seconds=1.0, beep_seconds=0.4, amd_seconds=0.6,
                     seconds=2.5)
    rest, application = await phone(callees={TO: machine})
    voxd = await voxd_line(start_voxd, rest, assistant={"provider": "echo", "audio": "mulaw"})
    created = await create(rest, url=voxd.webhook, machine_detection=mode, async_amd="true",
                           async_amd_status_callback=application.url("/amd"),
                           status_callback=application.url("/status"))
    call = await over(rest, created.sid)
    assert call.errors == [] and call.report is not None and call.report.errors == []
    [amd] = application.on("/amd")
    assert amd.signed and amd.method == "POST"
    assert amd.form == {"CallSid": created.sid, "AccountSid": rest.account_sid,
                        "AnsweredBy": answered_by,
                        "MachineDetectionDuration": str(round(after * 1000))}
    [sent] = [c for c in call.callbacks if c.kind == "amd"]
    assert call.stream_started_at is not None
    assert sent.at - call.stream_started_at >= after  # heard by an assistant already talking
    [(at, _)] = [e for e in call.report.events if e[1].startswith("AMD callback: AnsweredBy="
                                                                   + answered_by)]
    assert after <= at < 2.5  # in the stream's timeline, before the machine hung up
    assert (await fetch(rest, created.sid)).answered_by == answered_by
    [completed] = application.on("/status")
    assert completed.form["AnsweredBy"] == answered_by
    assert completed.form["CallStatus"] == "completed"


async def test_voxd_hanging_up_over_rest_ends_the_callees_call(phone, start_voxd, nursery):
    rest, application = await phone(Callee("human", seconds=5.0))
    assistant = FakeAssistant(end_after=0.5)  # the assistant ends the call: voxd hangs up
    await nursery.start(assistant.serve)
    voxd = await voxd_line(start_voxd, rest, assistant={"provider": "websocket"},
                           websocket={"url": assistant.url})
    created = await create(rest, url=voxd.webhook, status_callback=application.url("/status"))
    call = await over(rest, created.sid)
    assert call.report is not None and call.report.closed_by == "rest", call.report.render()
    assert [u.get("Status") for u in rest.updates if u["call_sid"] == created.sid] == [
        "completed"]
    assert call.status == "completed" and call.duration is not None and call.duration < 3
    [completed] = application.on("/status")
    assert completed.form["CallStatus"] == "completed"
    # the call is over: Twilio refuses to update it again
    async with httpx.AsyncClient(auth=(rest.account_sid, rest.auth_token)) as http:
        again = await http.post(f"{rest.base_url}/2010-04-01/Accounts/{rest.account_sid}/"
                                f"Calls/{created.sid}.json", data={"Status": "completed"})
    assert again.status_code == 400 and again.json()["code"] == 21220

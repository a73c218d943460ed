"""Outbound calls through voxd's public face: `POST /calls` refuses what it must (off without
the API token, a missing or wrong token, a bad body, a destination not allowed, beyond the
rate) with a JSON error naming the problem; Twilio's status and machine-detection callbacks
are signature-checked, logged and counted."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.test_recording_calls import wait_for
from voxd.observability import metrics
from voxd.sim.callee import Callee
from voxd.sim.rest import SimulatedRest

API_TOKEN = "voxd-api-token-0123456789abcdef"
OUTBOUND = {"from_number": "+14155550199", "allowed_to": ["+1415555*"]}
CALL_SID = "CA" + "1" * 32
PLACES_CALLS = {"account_sid": "AC" + "0" * 32}
"""[twilio] of a voxd that can place calls (so it takes their callbacks)."""


def counted(status: str) -> float:
    return metrics.OUTBOUND_CALLS.labels(status=status)._value.get()


async def post_calls(voxd: Any, body: Any = None, token: str | None = API_TOKEN,
                     raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient() as client:
        if raw is not None:
            return await client.post(voxd.origin + "/calls", content=raw, headers=headers)
        return await client.post(voxd.origin + "/calls", json=body, headers=headers)


async def post_signed(voxd: Any, path: str, form: dict[str, str],
                      signature: str | None = None) -> httpx.Response:
    url = voxd.origin + path
    if signature is None:
        signature = RequestValidator(voxd.token).compute_signature(url, form)
    async with httpx.AsyncClient() as client:
        return await client.post(url, data=form, headers={"X-Twilio-Signature": signature})


async def test_the_api_is_off_without_its_token(start_voxd) -> None:
    voxd = await start_voxd(outbound=OUTBOUND)
    response = await post_calls(voxd, {"to": "+14155550100"})
    assert response.status_code == 404
    assert "VOXD_API_TOKEN" in response.json()["error"]


@pytest.mark.parametrize(("header", "status", "words"), [
    (None, 401, "Bearer"),
    ("Basic dXNlcjpwYXNz", 401, "Bearer"),
    ("Bearer", 401, "Bearer"),
    ("Bearer wrong-token", 403, "wrong API token"),
    (f"Bearer {API_TOKEN}x", 403, "wrong API token"),
    (f"bearer {API_TOKEN[:-1]}", 403, "wrong API token"),
])
async def test_a_bad_token_is_refused(start_voxd, caplog, header: str | None, status: int,
                                      words: str) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    before = counted("unauthorized")
    async with httpx.AsyncClient() as client:
        response = await client.post(voxd.origin + "/calls", json={"to": "+14155550100"},
                                     headers={"Authorization": header} if header else {})
    assert response.status_code == status
    assert words in response.json()["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert counted("unauthorized") == before + 1
    assert API_TOKEN not in caplog.text


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"to": "+14165550100"}, "to", "matches no outbound.allowed_to pattern"),
    ({"to": "+1415555*"}, "to", "E.164"),
    ({}, "to", "E.164"),
    ({"to": "+14155550100", "from": "sales"}, "from", "E.164"),
    ({"to": "+14155550100", "parameters": {"to": "x"}}, "parameters", "set by voxd"),
    ({"to": "+14155550100", "parameters": ["x"]}, "parameters", "object"),
])
async def test_a_bad_request_is_refused_naming_the_field(start_voxd, body: Any, field: str,
                                                         words: str) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    response = await post_calls(voxd, body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'{"to": "+14155550100", "x": 1}',
                                 b"\xff\xfe"])
async def test_a_body_that_is_not_the_json_asked_for_is_refused(start_voxd, raw: bytes) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    response = await post_calls(voxd, raw=raw)
    assert response.status_code == 422
    assert "the body must be JSON" in response.json()["error"]


async def test_without_the_twilio_account_no_call_is_created(start_voxd) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    response = await post_calls(voxd, {"to": "+14155550100"})
    assert response.status_code == 503
    assert response.json()["field"] == "twilio.account_sid"


@pytest.mark.parametrize("status", ["initiated", "ringing", "in-progress", "completed", "busy",
                                    "no-answer", "failed"])
async def test_status_callbacks_are_logged_and_counted(start_voxd, caplog, status: str) -> None:
    voxd = await start_voxd(twilio=PLACES_CALLS)
    before = counted(status)
    caplog.set_level(logging.INFO)
    form = {"CallSid": CALL_SID, "CallStatus": status, "To": "+14155550100",
            "CallDuration": "12", "AnsweredBy": "human"}
    response = await post_signed(voxd, "/twilio/status", form)
    assert response.status_code == 204
    assert counted(status) == before + 1
    line = next(r for r in caplog.records if "outbound call" in r.getMessage())
    assert f"call_sid={CALL_SID} outbound call {status}" in line.getMessage()
    assert line.levelno == (logging.WARNING if status == "failed" else logging.INFO)
    if status == "completed":
        assert "after 12 s, answered by human" in line.getMessage()


@pytest.mark.parametrize("path", ["/twilio/status", "/twilio/amd"])
async def test_callbacks_must_be_signed_and_well_formed(start_voxd, path: str) -> None:
    voxd = await start_voxd(twilio=PLACES_CALLS)
    form = {"CallSid": CALL_SID, "CallStatus": "ringing", "AnsweredBy": "human"}
    assert (await post_signed(voxd, path, form, signature="forged")).status_code == 403
    bad_sid = {**form, "CallSid": "../../etc"}
    assert (await post_signed(voxd, path, bad_sid)).status_code == 400
    odd = {**form, "CallStatus": "exploded\n", "AnsweredBy": "robot\n"}
    assert (await post_signed(voxd, path, odd)).status_code == 400


async def test_a_machine_result_waits_for_its_call(start_voxd, caplog) -> None:
    """A verdict for a call not (yet) in this process is kept for the call to take."""
    voxd = await start_voxd(twilio=PLACES_CALLS)
    before = metrics.MACHINE_DETECTION.labels(answered_by="machine_end_beep")._value.get()
    caplog.set_level(logging.INFO)
    form = {"CallSid": CALL_SID, "AnsweredBy": "machine_end_beep",
            "MachineDetectionDuration": "4200"}
    assert (await post_signed(voxd, "/twilio/amd", form)).status_code == 204
    assert metrics.MACHINE_DETECTION.labels(
        answered_by="machine_end_beep")._value.get() == before + 1
    assert f"call_sid={CALL_SID} answered by machine_end_beep (detection took 4200 ms)" \
        in caplog.text
    assert await voxd.runtime.live.answered.take(CALL_SID) == "machine_end_beep"
    assert await voxd.runtime.live.answered.take(CALL_SID) is None


# -- placing calls, end to end: voxd, the simulated Twilio and its callees --------------------

HUMAN, VOICEMAIL, BUSY = "+14155550100", "+14155550101", "+14155550102"


@pytest.fixture
async def dialling(start_voxd, nursery, tmp_path):
    """`await dialling(**sections)` -> (voxd, rest): a voxd with the echo assistant, recording,
    the outbound API, and a simulated Twilio whose callees are a person, a voicemail and a
    busy line."""

    async def start(**sections: Any) -> tuple[Any, SimulatedRest]:
        rest = SimulatedRest(callees={
            HUMAN: Callee("human", seconds=3.0),
            VOICEMAIL: Callee("voicemail", seconds=6.0, greeting_seconds=1.5, amd_seconds=0.6),
            BUSY: Callee("busy"),
        }, ring_timeout_scale=0.01)
        await nursery.start(rest.serve)
        sections.setdefault("outbound", OUTBOUND)
        sections.setdefault("recording", {"enabled": True, "directory": str(tmp_path)})
        voxd = await start_voxd(
            secrets={"api_token": API_TOKEN},
            twilio={"rest_call_control": True, "api_base_url": rest.base_url,
                    "account_sid": rest.account_sid}, **sections)
        rest.auth_token = voxd.token
        return voxd, rest

    return start


async def test_post_calls_places_a_call_that_reaches_the_assistant_and_is_recorded(
        dialling, tmp_path) -> None:
    voxd, rest = await dialling()
    created = counted("created")
    response = await post_calls(voxd, {"to": HUMAN, "parameters": {"lead": "42"}})
    assert response.status_code == 201, response.text
    sid = response.json()["call_sid"]
    assert response.json() == {"call_sid": sid, "to": HUMAN, "from": "+14155550199",
                               "status": "queued"}
    assert counted("created") == created + 1
    with trio.fail_after(15):
        call = await rest.wait_over(sid)
    assert call.status == "completed" and call.answered_by == "human"
    report = call.report
    assert report is not None and report.closed_by == "caller"
    # the echo said the callee's hello back: the call reached the assistant
    assert report.assistant_speech
    session_parameters = rest.created[0]
    assert session_parameters["Url"].endswith("/twilio/voice?lead=42")
    # every status Twilio reported reached voxd and was counted
    statuses = [c.form["CallStatus"] for c in call.callbacks if c.kind == "status"]
    assert statuses == ["initiated", "ringing", "in-progress", "completed"]
    assert all(c.http_status == 204 for c in call.callbacks), call.callbacks
    recording = tmp_path / f"{sid}.wav"
    with trio.fail_after(10):
        await wait_for(recording.with_suffix(".jsonl"))  # the writer thread's last file
    assert recording.stat().st_size > 3 * 8000 * 4 * 0.8  # ~3 s of stereo PCM16


async def test_the_parameters_reach_the_assistant(start_voxd, nursery) -> None:
    assistant = FakeAssistant(loopback=True)
    await nursery.start(assistant.serve)
    rest = SimulatedRest(default_callee=Callee("human", seconds=1.5))
    await nursery.start(rest.serve)
    voxd = await start_voxd(
        secrets={"api_token": API_TOKEN}, outbound={**OUTBOUND, "machine_detection": False},
        assistant={"provider": "websocket"}, websocket={"url": assistant.url},
        twilio={"rest_call_control": True, "api_base_url": rest.base_url,
                "account_sid": rest.account_sid})
    rest.auth_token = voxd.token
    response = await post_calls(voxd, {"to": HUMAN, "from": "+14155550111",
                                       "parameters": {"lead": "42", "note": "a&b=c"}})
    assert response.status_code == 201, response.text
    with trio.fail_after(10):
        await rest.wait_over(response.json()["call_sid"])
    assert assistant.start["parameters"] == {"lead": "42", "note": "a&b=c", "from": "+14155550111",
                                   "to": HUMAN, "direction": "outbound"}
    assert "MachineDetection" not in rest.created[0]


async def test_a_busy_line_is_reported(dialling, caplog) -> None:
    voxd, rest = await dialling()
    caplog.set_level(logging.INFO)
    busy = counted("busy")
    response = await post_calls(voxd, {"to": BUSY})
    sid = response.json()["call_sid"]
    with trio.fail_after(10):
        call = await rest.wait_over(sid)
    assert call.status == "busy" and call.report is None
    assert counted("busy") == busy + 1
    assert f"call_sid={sid} outbound call busy" in caplog.text


async def test_beyond_the_rate_requests_wait_then_are_refused(dialling) -> None:
    voxd, rest = await dialling(outbound={**OUTBOUND, "calls_per_second": 2,
                                          "queue_seconds": 0.6})
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await post_calls(voxd, {"to": BUSY}))

    started = trio.current_time()
    async with trio.open_nursery() as requests:
        for _ in range(4):
            requests.start_soon(one)
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 201, 429, 429], codes  # turns at 0 and 0.5 s; 1.0 s is beyond 0.6
    refused = next(a for a in answers if a.status_code == 429)
    assert "outbound.calls_per_second" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert trio.current_time() - started >= 0.45  # the second waited for its turn
    assert len(rest.created) == 2


async def test_twilio_refusing_the_call_is_a_502_naming_why(dialling) -> None:
    voxd, rest = await dialling()
    rest.auth_token = "not-voxds-token"
    response = await post_calls(voxd, {"to": HUMAN})
    assert response.status_code == 502
    assert "Twilio refused to create the call" in response.json()["error"]
    assert "20003" in response.json()["error"]


async def test_voxd_dial_places_a_call_and_waits_for_its_end(dialling, tmp_path) -> None:
    """As an operator runs it: the CLI with the same voxd.toml and auth token."""
    voxd, rest = await dialling()
    config = tmp_path / "voxd.toml"
    config.write_text(
        f'[server]\npublic_url = "{voxd.origin}"\n'
        f'[twilio]\naccount_sid = "{rest.account_sid}"\napi_base_url = "{rest.base_url}"\n'
        '[outbound]\nfrom_number = "+14155550199"\nallowed_to = ["+1415555*"]\n')
    env = {**os.environ, "VOXD_TWILIO_AUTH_TOKEN": voxd.token}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "voxd", "dial", HUMAN, "--param", "lead=7", "--wait",
             "--config", str(config)], env=env, capture_stdout=True, capture_stderr=True,
            check=False)
    out = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr.decode()
    sid = out[0]
    assert re.fullmatch(r"CA[0-9a-f]{32}", sid)
    assert re.fullmatch(rf"{sid} completed, answered by human, \d+ s", out[-1]), out
    assert "ringing" in done.stderr.decode()
    assert rest.created[0]["Url"].endswith("?lead=7")
    assert (await rest.wait_over(sid)).report is not None

    refused = await trio.run_process(
        [sys.executable, "-m", "voxd", "dial", "+14165550100", "--config", str(config)],
        env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert refused.returncode == 2
    assert refused.stderr.decode().strip() == \
        "voxd: dial refused: to: +14165550100 matches no outbound.allowed_to pattern"
    assert len(rest.created) == 1


# -- answering machines --------------------------------------------------------------------


async def machine_line(start_voxd, nursery, on_machine: str, **callee: Any
                       ) -> tuple[Any, SimulatedRest, FakeAssistant]:
    """A voxd whose (generic, echoing) assistant calls a voicemail or a person."""
    assistant = FakeAssistant(loopback=True)
    await nursery.start(assistant.serve)
    rest = SimulatedRest(default_callee=Callee(**{"kind": "voicemail", "seconds": 6.0,
                                                  "greeting_seconds": 1.5,
                                                  "amd_seconds": 0.6, **callee}))
    await nursery.start(rest.serve)
    voxd = await start_voxd(
        secrets={"api_token": API_TOKEN},
        outbound={**OUTBOUND, "on_machine": on_machine,
                  "machine_message": "<Say>Please call us back.</Say>"},
        assistant={"provider": "websocket"}, websocket={"url": assistant.url},
        twilio={"rest_call_control": True, "api_base_url": rest.base_url,
                "account_sid": rest.account_sid})
    rest.auth_token = voxd.token
    return voxd, rest, assistant


async def place_and_wait(voxd: Any, rest: SimulatedRest) -> Any:
    response = await post_calls(voxd, {"to": HUMAN})
    assert response.status_code == 201, response.text
    with trio.fail_after(15):
        call = await rest.wait_over(response.json()["call_sid"])
        await voxd.runtime.wait_idle()
    return call


def summary_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(lines) == 1, lines
    return lines[0]


async def test_on_machine_continue_tells_the_assistant_and_goes_on(start_voxd, nursery,
                                                                  caplog) -> None:
    caplog.set_level(logging.INFO)
    voxd, rest, assistant = await machine_line(start_voxd, nursery, "continue")
    call = await place_and_wait(voxd, rest)
    assert rest.created[0]["MachineDetection"] == "DetectMessageEnd"
    assert call.answered_by == "machine_end_beep"
    assert {"type": "answered-by", "value": "machine_end_beep"} in assistant.control_in
    assert call.report.closed_by == "caller"  # the machine hung up after its 6 s
    assert "reason=caller-hangup" in summary_line(caplog)


async def test_on_machine_hangup_hangs_up_at_the_first_verdict(start_voxd, nursery,
                                                               caplog) -> None:
    caplog.set_level(logging.INFO)
    outcome = metrics.CALLS_TOTAL.labels(outcome="machine")._value.get()
    voxd, rest, assistant = await machine_line(start_voxd, nursery, "hangup")
    call = await place_and_wait(voxd, rest)
    assert rest.created[0]["MachineDetection"] == "Enable"
    assert call.answered_by == "machine_start"
    assert call.report.closed_by == "rest" and call.status == "completed"
    assert call.duration is not None and call.duration < 3  # not the machine's 6 s
    assert "reason=machine-hangup:machine_start" in summary_line(caplog)
    assert metrics.CALLS_TOTAL.labels(outcome="machine")._value.get() == outcome + 1
    with trio.fail_after(3):
        await assistant.closed.wait()  # it has read everything voxd sent
    assert {"type": "end"} in [{"type": m["type"]} for m in assistant.control_in]


async def test_on_machine_message_leaves_the_message_after_the_beep(start_voxd, nursery,
                                                                   caplog) -> None:
    caplog.set_level(logging.INFO)
    voxd, rest, _ = await machine_line(start_voxd, nursery, "message")
    call = await place_and_wait(voxd, rest)
    assert call.answered_by == "machine_end_beep"
    report = call.report
    assert report.closed_by == "rest"
    assert report.next_twiml.replace(" />", "/>") == \
        "<Say>Please call us back.</Say><Hangup/>", report.next_twiml
    # the message waits for the greeting and its beep (1.5 s + 0.4 s into the stream)
    redirected = next(t for t, what in report.events if "redirected" in what)
    assert redirected >= 1.9
    assert "reason=machine-message:machine_end_beep" in summary_line(caplog)


async def test_a_person_is_not_hung_up_on(start_voxd, nursery, caplog) -> None:
    caplog.set_level(logging.INFO)
    voxd, rest, assistant = await machine_line(start_voxd, nursery, "hangup", kind="human",
                                               seconds=2.5)
    call = await place_and_wait(voxd, rest)
    assert call.answered_by == "human"
    assert {"type": "answered-by", "value": "human"} in assistant.control_in
    assert call.report.closed_by == "caller"
    assert "reason=caller-hangup" in summary_line(caplog)


async def test_a_verdict_left_in_the_shared_state_reaches_the_call(start_voxd, nursery,
                                                                   caplog, monkeypatch) -> None:
    """The callback landed where the call is not (another worker or host, or before its
    stream): the call takes the verdict from the shared state."""
    caplog.set_level(logging.INFO)
    voxd, rest, _ = await machine_line(start_voxd, nursery, "hangup")
    monkeypatch.setattr(voxd.runtime.live, "session", lambda call_sid: None)
    call = await place_and_wait(voxd, rest)
    assert call.report.closed_by == "rest"
    assert "reason=machine-hangup:machine_start" in summary_line(caplog)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"to": 14155550100}, "to", "Expected `str | null`"),
    ({"to": "+14155550100", "parameters": {"k": 5}}, "parameters", "Expected `str`"),
    ({"to": "+14155550100", "parameters": {"k": "a\ufffeb"}}, "parameters", "printable"),
    ({"to": "+14155550100", "parameters": {"k": [[[[1]]]]}}, "parameters", "Expected"),
])
async def test_wrong_types_and_characters_are_refused(start_voxd, body: Any, field: str,
                                                      words: str) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    response = await post_calls(voxd, body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and words in response.json()["error"]


async def test_deeply_nested_json_is_a_422_not_a_crash(start_voxd, caplog) -> None:
    voxd = await start_voxd(outbound=OUTBOUND, secrets={"api_token": API_TOKEN})
    for depth in (1000, 3900):
        raw = b'{"to": "+14155550100", "parameters": {"k": ' + b"[" * depth + b"]" * depth \
            + b"}}"
        response = await post_calls(voxd, raw=raw)
        assert response.status_code == 422, response.text
    assert "Traceback" not in caplog.text


async def test_callbacks_are_not_served_where_no_call_can_be_placed(start_voxd) -> None:
    """Without the Twilio account (or token), nothing of voxd's asked for a callback: nothing
    is stored for a forged one."""
    voxd = await start_voxd(signed=False)
    async with httpx.AsyncClient() as client:
        for path in ("/twilio/status", "/twilio/amd"):
            response = await client.post(voxd.origin + path, data={
                "CallSid": CALL_SID, "CallStatus": "ringing", "AnsweredBy": "human"})
            assert response.status_code == 404
    assert await voxd.runtime.live.answered.take(CALL_SID) is None


def test_a_query_parameter_xml_cannot_carry_is_dropped() -> None:
    from voxd.twilio import twiml

    assert twiml.fitted({"note": "a\x01b\ufffec"}) == {"note": "abc"}

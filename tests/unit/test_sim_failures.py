"""The simulators' failure rules, without sockets: when a simulated call counts as failed
(voxd's exit code 1), a load report's failures grouped by reason, a TwiML stream URL that
cannot be opened."""

from __future__ import annotations

import pytest

from voxd.sim.explain import SimulatorError, url_problem
from voxd.sim.load_report import CallResult, LoadReport
from voxd.sim.report import CallReport
from voxd.sim.twiml import parse_twiml

FALLBACK = "<Say>Sorry, the assistant is unavailable right now.</Say>"


def report(closed_by: str, next_twiml: str = "", code: int | None = 1000) -> CallReport:
    r = CallReport("CA1", "MZ1", closed_by=closed_by, next_twiml=next_twiml)
    r.close_code = code if closed_by == "voxd" else None
    return r


@pytest.mark.parametrize("closed_by,next_twiml,code", [
    ("caller", "", None),                                   # the caller hung up
    ("caller", FALLBACK, None),                             # (even if the TwiML says more)
    ("voxd", "<Hangup/>", 1000),                            # the assistant ended the call
    ("voxd", "<Say>Goodbye</Say><Hangup/>", 1000),          # a machine message
    ("voxd", '<Say>Connecting</Say><Dial>+14155550100</Dial>', 1000),  # a transfer
    ("rest", "", None),                                     # hung up over REST
    ("rest", "<Dial>+14155550100</Dial>", None),            # moved to a transfer over REST
])
def test_calls_that_ended_normally(closed_by, next_twiml, code):
    assert report(closed_by, next_twiml, code).failure() is None


def test_voxd_ending_the_call_with_the_fallback_is_a_failure():
    line = report("voxd", FALLBACK).failure()
    assert line is not None and line.startswith(
        f"voxd ended the call before the caller hung up, and the caller hears {FALLBACK}")
    assert report("rest", FALLBACK, None).failure() is not None  # redirected to it over REST


def test_an_abnormal_close_is_a_failure():
    assert report("voxd", "", 1006).failure() == (
        "the media stream was closed abnormally (code 1006) before the caller hung up "
        "(voxd's log says why)")


def test_load_report_counts_failures_by_reason_most_frequent_first():
    results = [CallResult(error=e) for e in ["b"] * 3 + ["a"] + [""] * 2
               + [f"x{i}" for i in range(6)]]
    lines = LoadReport(len(results), 5, results).failures()
    assert lines[:2] == ["  failed: 3 calls: b", "  failed: 1 call: a"]
    assert len(lines) == 6 and lines[-1] == "  failed: 3 calls more, for 3 other reasons"


def test_a_report_with_nothing_measured_says_so():
    text = LoadReport(2, 5, [CallResult(error="e"), CallResult(error="e")]).render()
    assert "nan" not in text
    assert "frame round trip       none measured (no frame came back)" in text
    assert "voxd CPU per call      not measured" in text


@pytest.mark.parametrize("url,problem", [
    ("ws://127.0.0.1:99999/x", "Port out of range 0-65535"),
    ("ws://[::1/x", "Invalid IPv6 URL"),
    ("ws:///x", "no host in ws:///x"),
])
def test_a_stream_url_that_cannot_be_opened_is_named(url, problem):
    twiml = f'<Response><Connect><Stream url="{url}"/></Connect></Response>'
    with pytest.raises(SimulatorError, match="<Stream url>: ") as caught:
        parse_twiml(twiml)
    assert problem in str(caught.value)


def test_url_problem():
    assert url_problem("http://127.0.0.1:3000/twilio/voice") is None
    assert url_problem("https://voice.example.com/twilio/voice") is None
    assert url_problem("http://h:0/x") == "port 0 in http://h:0/x"
    assert url_problem("wss://h/x") == "not an http:// or https:// URL: wss://h/x"


@pytest.mark.parametrize("url,problem", [
    ("http://[::1/x", "Invalid IPv6 URL"),
    ("ftp://host/x", "unsupported protocol"),
])
async def test_an_unusable_action_url_is_an_error_of_the_call_not_a_crash(url, problem):
    from voxd.sim.caller import TwilioSimulator, _CallState

    sim = TwilioSimulator("http://127.0.0.1:9/twilio/voice")
    state = _CallState(CallReport("CA1", "MZ1"))
    assert await sim._twiml_request(url, "POST", {}, "Connect action", state) is None
    [error] = state.report.errors
    assert error.startswith(f"Connect action: not a usable URL {url}: ") and problem in error

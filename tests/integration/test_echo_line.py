"""The built-in echo on a line that echoes: its own voice coming back never interrupts it, and
a caller talking over it is a barge-in from the same source every run.

What `voxd call --line-echo 20` does against the shipped config (echo assistant, pcm16, local
VAD "auto"), with the bundled sample: the caller's third stretch of speech (5.04 s) talks over
the echo's first answer, at full level; everything else the caller's line sends while the echo
plays is the echo's own voice, 20 dB down and 120 ms late. CI places 3 such calls (and 2 with
voxd's local VAD off); the manual check is 10 in a row:

    voxd serve --config voxd.toml &
    for i in $(seq 10); do voxd call http://127.0.0.1:3000/twilio/voice --line-echo 20; done

(each prints `clears 1`, at 5.14 s, and voxd logs `barge-in (vad)` once per call).
"""

from __future__ import annotations

import logging

import trio

from voxd.sim.caller import TwilioSimulator
from voxd.sim.demo import TAIL_SECONDS, bundled_sample

TALKS_OVER_AT = 5.04
"""When the bundled sample's caller starts talking over the echo's first answer."""


async def place_calls(voxd, count: int) -> list:
    sample = bundled_sample()
    reports: list = []

    async def one() -> None:
        sim = TwilioSimulator(voxd.webhook, auth_token=voxd.token, line_echo=(20.0, 120.0))
        reports.append(await sim.call(sample, len(sample) / 8000 + TAIL_SECONDS))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    with trio.fail_after(2):
        await voxd.runtime.wait_idle()
    return reports


def barge_ins(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records
            if r.getMessage().startswith("barge-in")]


def check_one_real_barge_in(report) -> None:
    clears = [t for t, what in report.events if what.startswith("clear")]
    # One clear: the caller talking over the first answer. None before it (the echo of that
    # answer, 4.2-4.4 s, used to interrupt it) and none after (nor of the second answer).
    assert len(clears) == 1, report.events
    assert TALKS_OVER_AT < clears[0] < TALKS_OVER_AT + 0.35, report.events
    assert report.closed_by == "caller"
    # The second answer (the caller's 5.04-8.14 s, echoed from ~8.6 s) was heard to its end.
    heard = report.assistant_speech()
    assert heard[-1][1] > 11.0, heard


async def test_its_own_echo_never_interrupts_the_echo_and_voxd_hears_the_caller_first(
        start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd()  # the shipped defaults: echo, pcm16, local VAD on
    reports = await place_calls(voxd, 3)
    for report in reports:
        check_one_real_barge_in(report)
    # voxd's local VAD (80 ms) is faster than the echo's own (200 ms): always voxd's
    assert barge_ins(caplog) == ["barge-in (vad)"] * 3


async def test_with_the_local_vad_off_the_echo_itself_hears_the_caller(start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(barge_in={"local_vad": False})
    reports = await place_calls(voxd, 2)
    for report in reports:
        check_one_real_barge_in(report)
    assert barge_ins(caplog) == ["barge-in (assistant)"] * 2

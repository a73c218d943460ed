"""Deeply nested JSON and a repeated `connected` from the Twilio side: a protocol error ending
that call with one log line (no traceback, no internal error); other calls go on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import trio
import trio_websocket

from tests.integration.audio import burst, silence
from tests.integration.test_malformed import CONNECTED, SID, open_stream, start_message
from voxd.sim.caller import TwilioSimulator


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES = {
    "1,000 deep before start": [CONNECTED, '{"event":' + deep(1_000) + "}"],
    "30,000 deep while streaming": [CONNECTED, start_message(),
                                    f'{{"event":"media","streamSid":"{SID}","x":'
                                    + deep(30_000) + "}"],
    "a second connected": [CONNECTED, CONNECTED],
}
PROBLEMS = {"a second connected": "'connected' received twice"}


@pytest.mark.parametrize("case", list(CASES))
async def test_deep_json_is_a_protocol_error_with_one_line(start_voxd, caplog, case):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(assistant={"audio": "mulaw"}, call={"stream_token": False})
    good: dict[str, object] = {}

    async def good_call() -> None:
        caller = np.concatenate([burst(0.4), silence(1.2)])
        good["report"] = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_call)
        await trio.sleep(0.3)  # the good call is streaming
        async with await open_stream(voxd) as ws:
            for message in CASES[case]:
                await ws.send_message(message)
            with trio.fail_after(1.0), pytest.raises(trio_websocket.ConnectionClosed):
                while True:
                    await ws.get_message()

    report = good["report"]
    assert report.errors == [] and report.closed_by == "caller"  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if r.name == "voxd.call"]
    errors = [line for line in lines if "protocol error" in line]
    assert len(errors) == 1, lines
    assert PROBLEMS.get(case, "JSON nested too deeply") in errors[0]
    assert "\n" not in errors[0] and len(errors[0]) < 400
    summaries = [line for line in lines if line.startswith("call ended")]
    assert sum("reason=protocol-error" in s for s in summaries) == 1

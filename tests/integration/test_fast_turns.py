"""An assistant that answers before voxd's speech detector has declared the caller's turn over
(200 ms after the caller stops, inside the 300 ms hangover) still has its turns counted and
timed: end of the caller's speech -> first answer frame, about 200 ms plus the sockets' share.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from voxd.observability import metrics
from voxd.sim.caller import TwilioSimulator
from voxd.sim.demo import TAIL_SECONDS, bundled_sample
from voxd.sim.echo_upstream import serve_echo

REPLY_AFTER = 0.2


def turns_counted() -> float:
    return metrics.REGISTRY.get_sample_value("voxd_turn_latency_seconds_count") or 0.0


async def test_a_reply_inside_the_hangover_is_a_turn_with_its_latency(start_voxd, nursery,
                                                                       caplog):
    caplog.set_level(logging.DEBUG, logger="voxd.call")
    port = await nursery.start(partial(serve_echo, "127.0.0.1:0", reply_after=REPLY_AFTER))
    voxd = await start_voxd(assistant={"provider": "websocket", "audio": "mulaw"},
                            websocket={"url": f"ws://127.0.0.1:{port}/"},
                            barge_in={"local_vad": False})
    assert voxd.runtime.settings.config.barge_in.min_speech_ms < 300  # the hangover is longer
    before = turns_counted()
    sample = bundled_sample()
    sim = TwilioSimulator(voxd.webhook, auth_token=voxd.token)
    report = await sim.call(sample, len(sample) / 8000 + TAIL_SECONDS)
    with trio.fail_after(2):
        await voxd.runtime.wait_idle()

    heard = [t.latency for t in report.turns() if t.latency is not None]
    assert len(heard) >= 2, report.render()
    assert all(REPLY_AFTER < latency < REPLY_AFTER + 0.12 for latency in heard), heard
    timed = [float(r.getMessage().split()[-2]) / 1000 for r in caplog.records
             if "response latency" in r.getMessage()]
    assert len(timed) == len(heard), (timed, heard)
    assert turns_counted() - before == len(heard)
    # voxd's figure: the reply delay plus what the sockets and pacing add (a few ms on
    # loopback), never less than the delay and not a hangover later.
    assert all(REPLY_AFTER - 0.005 < latency < REPLY_AFTER + 0.1 for latency in timed), timed
    summary = [r.getMessage() for r in caplog.records if "turns=" in r.getMessage()]
    assert summary and f"turns={len(heard)} " in summary[-1], summary

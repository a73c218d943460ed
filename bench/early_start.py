"""What starting the Vapi call from the webhook saves: stream start -> first assistant audio.

Run: .venv/bin/python bench/early_start.py
A fake Vapi (tests/fakes/vapi.py) answers POST /call after a scripted delay and its assistant
speaks a first message as soon as the call socket opens. The simulator waits `gap` between the
webhook's answer and opening the media stream (Twilio's own time to fetch the TwiML and open
the WSS connection). Each row is the median of several calls.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.vapi import FakeVapi, VapiScript
from tests.integration.conftest import make_settings
from voxd.server import bound_origin, open_listener, serve
from voxd.sim.caller import TwilioSimulator

CALLS = 5
TONE = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype("<i2")


class TwilioWithGap(TwilioSimulator):
    gap = 0.0

    async def request_stream(self):
        instruction = await super().request_stream()
        await trio.sleep(self.gap)
        return instruction


async def first_audio(early: bool, create_delay: float, gap: float) -> float:
    from voxd.audio.g711 import pcm16_to_ulaw

    fake = FakeVapi(VapiScript(create_delay=create_delay,
                               first_message=pcm16_to_ulaw(TONE.tobytes())))
    sock = open_listener("127.0.0.1:0")
    results = []
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        settings = make_settings(bound_origin(sock), None, {"vapi_api_key": "vapi-test-key"},
                                 assistant={"provider": "vapi", "audio": "mulaw"},
                                 vapi={"base_url": fake.base_url, "assistant_id": "a",
                                       "early_start": early})
        await nursery.start(serve, settings, sock)
        for _ in range(CALLS):
            sim = TwilioWithGap(bound_origin(sock) + "/twilio/voice")
            sim.gap = gap
            report = await sim.call(np.zeros(8000, np.int16), seconds=1.5)
            first = next(t for t, what in report.events if what.startswith("first assistant"))
            results.append(first)
        nursery.cancel_scope.cancel()
    sock.close()
    return statistics.median(results)


async def main() -> None:
    print(f"stream start -> first assistant audio received (ms), median of {CALLS} calls")
    print(f"{'create-call latency':>20}{'Twilio gap':>12}{'at stream start':>17}"
          f"{'from webhook':>14}{'saved':>8}")
    for create_delay in (0.1, 0.3, 0.6):
        for gap in (0.05, 0.25):
            late = await first_audio(False, create_delay, gap)
            early = await first_audio(True, create_delay, gap)
            print(f"{create_delay * 1000:18.0f}ms{gap * 1000:10.0f}ms{late * 1000:15.0f}ms"
                  f"{early * 1000:12.0f}ms{(late - early) * 1000:6.0f}ms")


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    trio.run(main)

"""`voxd demo`: the daemon with the echo assistant and one simulated call, in one process."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import trio

from voxd.config import (
    AssistantConfig,
    Config,
    Secret,
    Secrets,
    ServerConfig,
    Settings,
    TransferConfig,
    TwilioConfig,
)
from voxd.providers.base import AudioFormat
from voxd.server import bound_origin, open_listener, serve
from voxd.sim.caller import RATE, CallReport, TwilioSimulator, read_wav
from voxd.sim.rest import SimulatedRest

DEMO_TRANSFER = TransferConfig(default="front-desk", to={"front-desk": "+14155550100"},
                               announce="Connecting you to the front desk.")
"""Where the demo's echo sends a caller who presses 0 (a fictional 555-01xx number)."""
TAIL_SECONDS = 4.0
"""Silence streamed after the sample, so the last reply is heard."""


def bundled_sample() -> np.ndarray:
    """The speech sample shipped with voxd (two short utterances), int16 8 kHz."""
    with resources.as_file(resources.files("voxd") / "data" / "hello.wav") as path:
        return read_wav(path)


def demo_seconds(sample: np.ndarray | None = None) -> float:
    """How long the demo call lasts: the sample, then TAIL_SECONDS to hear the reply."""
    return len(bundled_sample() if sample is None else sample) / RATE + TAIL_SECONDS


async def run_demo(audio: AudioFormat = "pcm16", sample: np.ndarray | None = None,
                   seconds: float | None = None, *, dtmf: Sequence[tuple[str, float]] = (),
                   rest: bool = True) -> CallReport:
    """Start voxd (echo assistant, signatures on, free loopback port), place one call,
    pressing the keys `dtmf` [(key, seconds)] (the echo presses them back; `0` transfers to
    DEMO_TRANSFER). With `rest`, a simulated Twilio REST API runs too and voxd controls the
    call through it (twilio.rest_call_control on, api_base_url pointed at it), as it does
    in production; without, voxd ends calls by `<Connect action>`."""
    caller = bundled_sample() if sample is None else sample
    token = secrets.token_hex(16)
    api = SimulatedRest(auth_token=token) if rest else None
    sock = open_listener("127.0.0.1:0")
    origin = bound_origin(sock)
    try:
        async with trio.open_nursery() as nursery:
            twilio = TwilioConfig(validate_signatures=True, rest_call_control=False)
            if api is not None:
                await nursery.start(api.serve)
                twilio = TwilioConfig(validate_signatures=True, rest_call_control=True,
                                      api_base_url=api.base_url)
            settings = Settings(
                config=Config(
                    server=ServerConfig(listen="127.0.0.1:0", public_url=origin),
                    twilio=twilio,
                    assistant=AssistantConfig(provider="echo", audio=audio),
                    transfer=DEMO_TRANSFER,
                ),
                secrets=Secrets(twilio_auth_token=Secret(token)),
                source=Path("(demo: built-in settings)"),
            )
            await nursery.start(serve, settings, sock)
            simulator = TwilioSimulator(origin + "/twilio/voice", auth_token=token, rest=api)
            length = seconds if seconds is not None else demo_seconds(caller)
            report = await simulator.call(caller, seconds=length, dtmf=dtmf)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    return report

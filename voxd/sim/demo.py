"""`voxd demo`: the daemon with the echo assistant and one simulated call, in one process."""

from __future__ import annotations

import secrets
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
    TwilioConfig,
)
from voxd.providers.base import AudioFormat
from voxd.server import bound_origin, open_listener, serve
from voxd.sim.caller import RATE, CallReport, TwilioSimulator, read_wav

TAIL_SECONDS = 4.0
"""Silence streamed after the sample, so the last reply is heard."""


def bundled_sample() -> np.ndarray:
    """The speech sample shipped with voxd (two short utterances), int16 8 kHz."""
    with resources.as_file(resources.files("voxd") / "data" / "hello.wav") as path:
        return read_wav(path)


async def run_demo(audio: AudioFormat = "pcm16", sample: np.ndarray | None = None,
                   seconds: float | None = None) -> CallReport:
    """Start voxd (echo assistant, signatures on, free loopback port), place one call."""
    caller = bundled_sample() if sample is None else sample
    token = secrets.token_hex(16)
    sock = open_listener("127.0.0.1:0")
    origin = bound_origin(sock)
    settings = Settings(
        config=Config(
            server=ServerConfig(listen="127.0.0.1:0", public_url=origin),
            twilio=TwilioConfig(validate_signatures=True),
            assistant=AssistantConfig(provider="echo", audio=audio),
        ),
        secrets=Secrets(twilio_auth_token=Secret(token)),
        source=Path("(demo: built-in settings)"),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, settings, sock)
            simulator = TwilioSimulator(origin + "/twilio/voice", auth_token=token)
            length = seconds if seconds is not None else len(caller) / RATE + TAIL_SECONDS
            report = await simulator.call(caller, seconds=length)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    return report

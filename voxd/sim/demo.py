"""`voxd demo`: the daemon and one simulated call, in one process. The assistant is the
built-in echo, or (`provider`) a simulator of that vendor's documented protocol
(voxd/sim/vendors) on 127.0.0.1 with a throwaway key, which says each of the caller's sentences
back in that protocol: no account needed."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import trio

from voxd.config import Secret, Secrets, Settings, TransferConfig, parse_config
from voxd.providers.base import AudioFormat
from voxd.server import bound_origin, open_listener, serve
from voxd.sim.caller import RATE, CallReport, TwilioSimulator, read_wav
from voxd.sim.rest import SimulatedRest
from voxd.sim.vendors import NAMES, SIMULATORS, simulator
from voxd.sim.vendors.script import Script

DEMO_TRANSFER = TransferConfig(default="front-desk", to={"front-desk": "+14155550100"},
                               announce="Connecting you to the front desk.")
"""Where the demo's echo sends a caller who presses 0 (a fictional 555-01xx number)."""
TAIL_SECONDS = 4.0
"""Silence streamed after the sample, so the last reply is heard."""
PROVIDERS = ("echo", *NAMES)
"""What `voxd demo --provider` takes: the built-in echo, or a vendor's simulator."""
ECHO_AFTER = 0.5
"""A simulated vendor says a sentence back once the caller has been quiet this long (as the
built-in echo does)."""


def describe(provider: str) -> str:
    """The demo's assistant, for a person ("the echo assistant", "a simulated OpenAI
    Realtime")."""
    return ("the echo assistant" if provider == "echo" else
            f"a simulated {SIMULATORS[provider][2]} assistant")


def bundled_sample() -> np.ndarray:
    """The speech sample shipped with voxd (two short utterances), int16 8 kHz."""
    with resources.as_file(resources.files("voxd") / "data" / "hello.wav") as path:
        return read_wav(path)


def demo_seconds(sample: np.ndarray | None = None) -> float:
    """How long the demo call lasts: the sample, then TAIL_SECONDS to hear the reply."""
    return len(bundled_sample() if sample is None else sample) / RATE + TAIL_SECONDS


async def run_demo(audio: AudioFormat = "pcm16", sample: np.ndarray | None = None,
                   seconds: float | None = None, *, dtmf: Sequence[tuple[str, float]] = (),
                   rest: bool = True, provider: str = "echo",
                   on_call: Callable[[TwilioSimulator], None] | None = None) -> CallReport:
    """Start voxd (signatures on, free loopback port) with `provider`'s assistant and place
    one call, pressing the keys `dtmf` [(key, seconds)]. The built-in echo presses them back
    (`0` transfers to DEMO_TRANSFER); any other provider is its vendor's simulator, serving on
    127.0.0.1 with a throwaway key and saying each of the caller's sentences back through its
    protocol, with voxd configured for it as the conformance suite configures it. With
    `rest`, a simulated Twilio REST API runs too and voxd controls the call through it
    (twilio.rest_call_control on, api_base_url pointed at it), as it does in production;
    without, voxd ends calls by `<Connect action>`. `on_call` is given the simulator before it
    places the call (to follow it, or read what it recorded if the demo is interrupted)."""
    if provider not in PROVIDERS:
        raise ValueError(f"no demo provider {provider!r} (one of {', '.join(PROVIDERS)})")
    caller = bundled_sample() if sample is None else sample
    token = secrets.token_hex(16)
    api = SimulatedRest(auth_token=token) if rest else None
    sock = open_listener("127.0.0.1:0")
    origin = bound_origin(sock)
    try:
        async with trio.open_nursery() as nursery:
            raw: dict[str, dict[str, Any]] = {
                "server": {"listen": "127.0.0.1:0", "public_url": origin},
                "twilio": {"validate_signatures": True, "rest_call_control": False},
                "assistant": {"provider": provider, "audio": audio},
                "transfer": DEMO_TRANSFER.model_dump(),
            }
            named: dict[str, str] = {}
            if provider != "echo":
                vendor = simulator(provider, audio, Script(echo=True, echo_after=ECHO_AFTER))
                await nursery.start(vendor.serve)
                raw.update(vendor.sections())
                named = vendor.secrets
            if api is not None:
                await nursery.start(api.serve)
                raw["twilio"] = {"validate_signatures": True, "rest_call_control": True,
                                 "api_base_url": api.base_url}
            settings = Settings(
                config=parse_config(raw),
                secrets=Secrets(**cast(dict[str, Any], {
                    "twilio_auth_token": Secret(token),
                    **{name: Secret(value) for name, value in named.items()}})),
                source=Path("(demo: built-in settings)"),
            )
            await nursery.start(serve, settings, sock)
            twilio = TwilioSimulator(origin + "/twilio/voice", auth_token=token, rest=api)
            if on_call is not None:
                on_call(twilio)
            length = seconds if seconds is not None else demo_seconds(caller)
            report = await twilio.call(caller, seconds=length, dtmf=dtmf)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    return report

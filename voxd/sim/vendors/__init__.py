"""Simulators of the voice-AI vendors' documented protocols (OpenAI Realtime, ElevenLabs
Agents, Deepgram Voice Agent, Vapi's WebSocket transport, voxd's generic WebSocket protocol),
each playing a `Script` (script.py) in its vendor's own words.

They stand in for the vendors where no account is at hand: `voxd demo --provider NAME`, `voxd
echo-upstream --protocol NAME` (the benchmarks) and the conformance suite. The daemon never
uses them. Each is a `ConformantFake`: `await nursery.start(sim.serve)`, then `sim.sections()`
is the voxd config that points at it and `sim.secrets` the secrets it accepts (throwaway
keys)."""

from __future__ import annotations

import importlib
from typing import Any

import trio

from voxd.sim.vendors.script import ConformantFake, Script

__all__ = ["NAMES", "SIMULATORS", "echo_simulator", "serve_echo_simulator", "simulator"]

SIMULATORS = {
    "websocket": ("voxd.sim.vendors.generic", "GenericFake", "voxd's generic WebSocket protocol"),
    "vapi": ("voxd.sim.vendors.vapi", "ConformantVapi", "Vapi (WebSocket transport)"),
    "openai": ("voxd.sim.vendors.openai", "FakeOpenAI", "OpenAI Realtime"),
    "elevenlabs": ("voxd.sim.vendors.elevenlabs", "FakeElevenLabs", "ElevenLabs Agents"),
    "deepgram": ("voxd.sim.vendors.deepgram", "FakeDeepgram", "Deepgram Voice Agent"),
}
"""assistant.provider -> (module, class, what it simulates)."""
NAMES = tuple(SIMULATORS)


def simulator(provider: str, audio: str = "mulaw", script: Script | None = None,
              **options: Any) -> ConformantFake:
    """A (not yet serving) simulator of `provider`'s assistant, set to `audio` (voxd's
    assistant.audio: the format an ElevenLabs agent is set to; the others take what voxd asks
    for), playing `script` (default: echo the caller at once). `options` go to its class."""
    if provider not in SIMULATORS:
        raise ValueError(f"no simulator for {provider!r} (one of {', '.join(NAMES)})")
    module, name, _ = SIMULATORS[provider]
    sim: ConformantFake = getattr(importlib.import_module(module), name)(**options)
    sim.audio_format = audio
    sim.script = script or Script()
    return sim


def echo_simulator(provider: str, audio: str = "mulaw") -> ConformantFake:
    """`provider`'s simulator as a load test's upstream: every piece of caller audio said
    straight back at once, no proxy in front (the simulator's process stays lean)."""
    options: dict[str, Any] = {"direct": True} if provider in ("openai", "elevenlabs",
                                                                  "deepgram") else {}
    sim = simulator(provider, audio, Script(echo=True), **options)
    if provider == "vapi":
        sim.fake.script.echo_frames = True  # type: ignore[attr-defined]
    return sim


async def serve_echo_simulator(provider: str, audio: str = "mulaw",
                               task_status: trio.TaskStatus[ConformantFake] =
                               trio.TASK_STATUS_IGNORED) -> None:
    """Serve `echo_simulator(provider, audio)` until cancelled; `task_status` gets it once it
    listens (its `sections()` and `secrets` then configure voxd)."""
    sim = echo_simulator(provider, audio)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        task_status.started(sim)

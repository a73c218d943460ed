"""One script for every vendor simulator, so one conformance suite can drive them all.

A simulator ("fake", voxd/sim/vendors/<vendor>.py) follows its vendor's documented protocol, as
a stand-in for the vendor in `voxd demo --provider`, the benchmarks and the tests (the daemon
never uses one); what it does on a call comes from a `Script`, said in the vendor's own words
(OpenAI's `input_audio_buffer.speech_started`, ElevenLabs' `interruption`, Deepgram's
`UserStartedSpeaking`, ...). Times are seconds since the fake accepted the call's session (its
first message from voxd: a session update, an initiation message, Settings, or the socket's
opening where the protocol starts with the server).

What every conformant fake offers (see `ConformantFake`):
- `await nursery.start(fake.serve)`; then `fake.sections()` is the voxd config that points at
  it (e.g. `{"openai": {"base_url": ...}}`) and `fake.secrets` the secrets it accepts
  (`{"openai_api_key": ...}`); the suite adds `[assistant] provider/audio`.
- `fake.script` (a Script), read when a call's session starts: set it before the call.
- `fake.audio_format` ("pcm16" or "mulaw"): the suite sets it to the call's
  `assistant.audio` before the call; `reply` is in it and `audio_in` is decoded to it.
- What it saw, for the last call: `audio_in` (the caller's audio it received, decoded to the
  format it asked voxd for, bytes: pcm16 s16le 16 kHz or mu-law 8 kHz as `audio_format`),
  `control_in` (every JSON message from voxd, decoded, in order), `tool_results` (what voxd
  answered to its tool calls: {call id: result text}), `heard` (how much of its interrupted
  speech voxd said the caller heard, in ms, where its protocol can say so: e.g. OpenAI's
  `conversation.item.truncate.audio_end_ms`), and `closed` (a trio.Event set when voxd closed
  the session).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from voxd.audio.vad import frame_energy_dbfs_pcm16, frame_energy_dbfs_ulaw

__all__ = ["ConformantFake", "Echo", "Script"]

SPEECH_DBFS = -45.0
"""Caller audio louder than this is speech (`Script.echo_after`'s turns)."""


@dataclass
class Script:
    """What the assistant does on one call (None / empty: it does not do that)."""

    echo: bool = True
    """Say the caller's audio back as it arrives (in the vendor's audio messages)."""
    echo_after: float = 0.0
    """With `echo`, > 0: take turns instead, like an assistant: keep each stretch of caller
    speech and say it back (at once, in the pieces it came in) when the caller has been quiet
    this many seconds (`voxd demo --provider`: the built-in echo's behaviour)."""
    reply: bytes = b""
    """Speak this (in `audio_format`) starting at `reply_at`, whatever the caller says (paced
    in real time, 20 ms at a time, like a vendor's TTS stream)."""
    reply_at: float = 0.3
    interrupt_at: float | None = None
    """Send the vendor's 'the caller started speaking' signal at this time, and stop speaking
    (the rest of `reply` is never sent), as the vendors do."""
    tool_calls: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    """(at, tool name, arguments): the vendor's client-side tool call (function call)."""
    end_at: float | None = None
    """End the call the vendor's way (a tool, a close, an end message) at this time."""
    refuse_with: int | None = None
    """Refuse the WebSocket upgrade (or the HTTP request before it) with this status."""
    fail_first: int = 0
    """Answer the first N HTTP requests before the socket (signed URL, call creation) with
    503 (where the vendor has such a request): voxd retries them."""
    drop_after: float | None = None
    """Drop the TCP connection without a close frame at this time."""
    silent_after: float | None = None
    """From this time on, read nothing and send nothing (no pongs either)."""
    garbage_at: float | None = None
    """Send one malformed message (not JSON) and one unknown message type at this time."""


class ConformantFake(Protocol):
    """A vendor fake the conformance suite can drive (see the module docstring)."""

    script: Script
    secrets: dict[str, str]
    audio_format: str
    audio_in: bytearray
    control_in: list[dict[str, Any]]
    tool_results: dict[str, str]
    heard: list[float]
    closed: trio.Event

    async def serve(self, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        ...

    def sections(self) -> dict[str, dict[str, Any]]:
        ...


class Echo:
    """What a simulator says back of the caller's audio, per `Script.echo`/`echo_after`:
    `echo(chunk)` is the list of chunks to send now (in the caller's format, as received)."""

    def __init__(self, script: Script, ulaw: bool) -> None:
        self.on = script.echo
        self.hold = script.echo_after
        self.energy = frame_energy_dbfs_ulaw if ulaw else frame_energy_dbfs_pcm16
        self.turn: list[bytes] = []
        self.spoken = 0
        """Chunks of `turn` up to its last speech (the quiet after it is not said back)."""
        self.last_speech = 0.0

    def __call__(self, chunk: bytes) -> list[bytes]:
        if not self.on or not chunk:
            return []
        if self.hold <= 0:
            return [chunk]
        now = trio.current_time()
        if self.energy(chunk) > SPEECH_DBFS:
            self.turn.append(chunk)  # with the pauses inside the turn before it
            self.spoken = len(self.turn)
            self.last_speech = now
        elif self.turn:
            self.turn.append(chunk)
            if now - self.last_speech >= self.hold:
                turn, self.turn = self.turn[:self.spoken], []
                return turn
        return []

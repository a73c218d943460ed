"""Twilio Media Streams messages as Twilio sends them to voxd (`connected`, `start`, `media`,
`dtmf`, `mark`, `stop`), built in one place for the call simulator and the load generator.

voxd/twilio/protocol.py parses these and builds voxd's own (`media`, `mark`, `clear` towards
Twilio); it has no public builder for Twilio's side, so the simulators' is here. Pure."""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping

from voxd.audio.line import SAMPLE_RATE

Message = dict[str, object]


def connected() -> Message:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start(stream_sid: str, call_sid: str, account_sid: str,
          parameters: Mapping[str, str]) -> Message:
    return {"event": "start", "streamSid": stream_sid, "start": {
        "accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid,
        "tracks": ["inbound"], "customParameters": dict(parameters),
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
    }}


def media(stream_sid: str, index: int, frame: bytes) -> Message:
    """The caller's `index`th 20 ms frame (from 0; Twilio's chunks count from 1)."""
    return {"event": "media", "streamSid": stream_sid, "media": {
        "track": "inbound", "chunk": str(index + 1), "timestamp": str(index * 20),
        "payload": binascii.b2a_base64(frame, newline=False).decode()}}


def dtmf(stream_sid: str, key: str) -> Message:
    return {"event": "dtmf", "streamSid": stream_sid,
            "dtmf": {"track": "inbound_track", "digit": key}}


def mark(stream_sid: str, name: str) -> Message:
    """A mark echoed back once the audio before it has played."""
    return {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}


def stop(stream_sid: str, call_sid: str, account_sid: str) -> Message:
    return {"event": "stop", "streamSid": stream_sid,
            "stop": {"accountSid": account_sid, "callSid": call_sid}}


def encode(message: Message, sequence: int | None = None) -> str:
    """The message as Twilio's compact JSON; with `sequence`, its `sequenceNumber` (Twilio
    numbers every message after `connected`) right after the event name."""
    if sequence is not None:
        message = {"event": message["event"], "sequenceNumber": str(sequence),
                   **{k: v for k, v in message.items() if k != "event"}}
    return json.dumps(message, separators=(",", ":"))


class MediaFrames:
    """The load generator's hot path: `media` messages from a pre-rendered prefix (50 a second
    per call), the same JSON `encode(media(...))` gives, without a sequence number."""

    def __init__(self, stream_sid: str) -> None:
        self.prefix = (f'{{"event":"media","streamSid":{json.dumps(stream_sid)},'
                       '"media":{"track":"inbound",')

    def frame(self, index: int, payload_b64: str) -> str:
        return (f'{self.prefix}"chunk":"{index + 1}","timestamp":"{index * 20}",'
                f'"payload":"{payload_b64}"}}}}')

"""Twilio Media Streams, sans-I/O: text frames in, typed events out; events in, text frames out.

Theory of operation
-------------------
One `MediaStream` object per WebSocket connection. Feed it every text frame Twilio sends
(`receive`); it returns one typed event or raises `ProtocolError` naming the problem. It never
touches a socket, so the call layer decides what an error means (for voxd: end that call).

States: AWAITING_START -> STREAMING -> STOPPED.
- `connected` may come first (Twilio always sends it), once; it is accepted only before `start`
  (a second one is an error: nothing legitimate repeats it, and a peer could otherwise keep a
  socket busy before `start` with messages that all pass).
- `start` moves to STREAMING and fixes the stream's streamSid; the media format must be
  mu-law 8 kHz mono.
- `media`, `dtmf`, `mark` are valid only while STREAMING and must carry that streamSid.
- `stop` moves to STOPPED; anything after it is an error.
Strict on what matters (JSON, event names, required fields, streamSid, base64, size), lenient on
what Twilio may add (unknown extra fields are ignored: Twilio adds fields without notice).

Outbound frames (`media`, `mark`, `clear`) are built from pre-rendered strings: this sits on the
per-frame path, 50 times a second each way per call.
"""

from __future__ import annotations

import binascii
import enum
from typing import Final

import msgspec

from voxd.audio.dtmf import KEYS
from voxd.errors import ProtocolError

MULAW_FORMAT: Final = ("audio/x-mulaw", 8000, 1)
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES: Final = 8000
DEEP_JSON: Final = "JSON nested too deeply"
"""The problem named for a message nested deeper than the interpreter's recursion limit lets
msgspec go (~1,000 levels; Twilio's messages nest three)."""


# -- wire shapes (what Twilio puts in the JSON) -------------------------------------------------


class _MediaFormat(msgspec.Struct):
    encoding: str
    sampleRate: int
    channels: int


class _StartBody(msgspec.Struct):
    streamSid: str
    callSid: str
    accountSid: str = ""
    tracks: list[str] = []
    customParameters: dict[str, str] = {}
    mediaFormat: _MediaFormat | None = None


class _MediaBody(msgspec.Struct):
    payload: str
    timestamp: str
    chunk: str = "0"
    track: str = "inbound"


class _DtmfBody(msgspec.Struct):
    digit: str
    track: str = "inbound_track"


class _MarkBody(msgspec.Struct):
    name: str


class _Connected(msgspec.Struct, tag="connected", tag_field="event"):
    protocol: str = ""
    version: str = ""


class _Start(msgspec.Struct, tag="start", tag_field="event"):
    streamSid: str
    start: _StartBody
    sequenceNumber: str = ""


class _Media(msgspec.Struct, tag="media", tag_field="event"):
    streamSid: str
    media: _MediaBody
    sequenceNumber: str = ""


class _Dtmf(msgspec.Struct, tag="dtmf", tag_field="event"):
    streamSid: str
    dtmf: _DtmfBody
    sequenceNumber: str = ""


class _Mark(msgspec.Struct, tag="mark", tag_field="event"):
    streamSid: str
    mark: _MarkBody
    sequenceNumber: str = ""


class _Stop(msgspec.Struct, tag="stop", tag_field="event"):
    streamSid: str
    sequenceNumber: str = ""


_Wire = _Connected | _Start | _Media | _Dtmf | _Mark | _Stop
_decoder = msgspec.json.Decoder(_Wire)


# -- typed events (what the call layer sees) -------------------------------------------------


class Connected(msgspec.Struct, frozen=True):
    """Twilio's first message: the socket is up, no call data yet."""

    protocol: str
    version: str


class StreamStart(msgspec.Struct, frozen=True):
    """The stream started: the call's identity and the `<Parameter>`s from the TwiML."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]


class MediaFrame(msgspec.Struct, frozen=True):
    """Caller audio: mu-law 8 kHz bytes; `timestamp_ms` is the caller's clock since stream start."""

    payload: bytes
    timestamp_ms: int
    chunk: int


class Dtmf(msgspec.Struct, frozen=True):
    """The caller pressed a key."""

    digit: str


class MarkPlayed(msgspec.Struct, frozen=True):
    """Twilio echoed a mark: the audio sent before it has played, or was cleared."""

    name: str


class StreamStop(msgspec.Struct, frozen=True):
    """The stream ended on Twilio's side (the caller hung up, or the call moved on)."""


TwilioEvent = Connected | StreamStart | MediaFrame | Dtmf | MarkPlayed | StreamStop


class StreamState(enum.Enum):
    """Where a media stream is in its life."""

    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    STOPPED = "stopped"


class MediaStream:
    """The protocol state of one Twilio media-stream connection (see the module docstring)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_payload_bytes = max_payload_bytes
        self._max_payload_chars = 4 * ((max_payload_bytes + 2) // 3)
        self.state = StreamState.AWAITING_START
        self._connected = False
        self.stream_sid: str | None = None
        self._media_prefix = ""
        self._mark_prefix = ""
        self._clear = ""

    # -- inbound --

    def receive(self, text: str) -> TwilioEvent:
        """Parse one text frame from Twilio into an event, or raise ProtocolError."""
        if len(text) > self.max_message_bytes:
            raise ProtocolError(
                f"message of {len(text)} bytes exceeds the limit of {self.max_message_bytes}"
            )
        try:
            wire = _decoder.decode(text)
        except msgspec.ValidationError as exc:
            raise ProtocolError(_explain_validation(str(exc), text)) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"invalid JSON: {exc}") from None
        except RecursionError:  # msgspec's depth guard (the stack stays safe): not an event
            raise ProtocolError(DEEP_JSON) from None

        # Media first: it is nearly every message.
        if type(wire) is _Media:
            self._require_streaming("media", wire.streamSid)
            body = wire.media
            if len(body.payload) > self._max_payload_chars:
                raise ProtocolError(
                    f"media payload of about {len(body.payload) * 3 // 4} bytes exceeds the "
                    f"limit of {self.max_payload_bytes} (call.max_payload_bytes)"
                )
            try:
                payload = binascii.a2b_base64(body.payload, strict_mode=True)
            except (binascii.Error, ValueError) as exc:
                raise ProtocolError(f"media payload is not valid base64: {exc}") from None
            try:
                return MediaFrame(payload, int(body.timestamp), int(body.chunk))
            except ValueError:
                raise ProtocolError(
                    f"media timestamp/chunk must be integers in strings, got "
                    f"{body.timestamp!r}/{body.chunk!r}"
                ) from None
        if isinstance(wire, _Mark):
            self._require_streaming("mark", wire.streamSid)
            return MarkPlayed(wire.mark.name)
        if isinstance(wire, _Dtmf):
            self._require_streaming("dtmf", wire.streamSid)
            digit = wire.dtmf.digit
            if len(digit) != 1 or digit not in KEYS:
                raise ProtocolError("dtmf digit is not one keypad key (0-9, *, #, A-D)")
            return Dtmf(digit)
        if isinstance(wire, _Stop):
            self._require_streaming("stop", wire.streamSid)
            self.state = StreamState.STOPPED
            return StreamStop()
        if isinstance(wire, _Start):
            return self._start(wire)
        if self.state is not StreamState.AWAITING_START:
            raise ProtocolError(f"'connected' received while {self.state.value}")
        if self._connected:
            raise ProtocolError("'connected' received twice")
        self._connected = True
        assert isinstance(wire, _Connected)
        return Connected(wire.protocol, wire.version)

    def _start(self, wire: _Start) -> StreamStart:
        if self.state is not StreamState.AWAITING_START:
            raise ProtocolError(f"duplicate 'start' while {self.state.value}")
        body = wire.start
        if not wire.streamSid or body.streamSid != wire.streamSid:
            raise ProtocolError(
                f"start names streamSid {wire.streamSid!r} outside and {body.streamSid!r} inside"
            )
        if not body.callSid:
            raise ProtocolError("start has an empty callSid")
        fmt = body.mediaFormat
        if fmt is not None and (fmt.encoding, fmt.sampleRate, fmt.channels) != MULAW_FORMAT:
            raise ProtocolError(
                f"unsupported media format {fmt.encoding}/{fmt.sampleRate}/{fmt.channels} "
                "(expected audio/x-mulaw/8000/1)"
            )
        self.state = StreamState.STREAMING
        self._set_stream_sid(wire.streamSid)
        return StreamStart(
            stream_sid=wire.streamSid,
            call_sid=body.callSid,
            account_sid=body.accountSid,
            tracks=tuple(body.tracks),
            custom_parameters=dict(body.customParameters),
        )

    def _require_streaming(self, event: str, stream_sid: str) -> None:
        if self.state is not StreamState.STREAMING:
            raise ProtocolError(f"'{event}' received while {self.state.value}")
        if stream_sid != self.stream_sid:
            raise ProtocolError(
                f"'{event}' for streamSid {stream_sid!r}, but this stream is {self.stream_sid!r}"
            )

    def _set_stream_sid(self, sid: str) -> None:
        self.stream_sid = sid
        quoted = msgspec.json.encode(sid).decode()
        self._media_prefix = '{"event":"media","streamSid":' + quoted + ',"media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":' + quoted + ',"mark":{"name":'
        self._clear = '{"event":"clear","streamSid":' + quoted + "}"

    # -- outbound --

    def media(self, ulaw: bytes) -> str:
        """A `media` frame carrying mu-law 8 kHz audio for Twilio to play."""
        if self.stream_sid is None:
            raise ProtocolError("cannot send media before the stream started")
        return self._media_prefix + binascii.b2a_base64(ulaw, newline=False).decode() + '"}}'

    def mark(self, name: str) -> str:
        """A `mark` frame: Twilio echoes it once the audio sent before it has played."""
        if self.stream_sid is None:
            raise ProtocolError("cannot send a mark before the stream started")
        return self._mark_prefix + msgspec.json.encode(name).decode() + "}}"

    def clear(self) -> str:
        """A `clear` frame: Twilio drops its queued audio and echoes every pending mark."""
        if self.stream_sid is None:
            raise ProtocolError("cannot send clear before the stream started")
        return self._clear


def _explain_validation(message: str, text: str) -> str:
    """Turn msgspec's validation message into one readable reason."""
    if "`$.event`" in message or "missing required field `event`" in message:
        try:
            event = msgspec.json.decode(text).get("event")
        except (msgspec.DecodeError, AttributeError):
            event = None
        except RecursionError:  # an unknown event (or none) with deep JSON in it
            return DEEP_JSON
        if event is None:
            return "message has no 'event' field"
        return f"unknown event {event!r}"
    return f"malformed message: {message}"

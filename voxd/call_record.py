"""A call's record: the timeline of what happened on a recorded call, and `voxd show`.

Theory of operation
-------------------
A `CallRecord` belongs to one call, like its `CallRecorder`, and exists only when the call is
recorded. The call appends an event for each thing that happens to it (start, a turn answered,
a barge-in, a key pressed, a transfer, a transcript, who answered, the end): a rare event, one
small object each, never anything per audio frame. At the end the call serialises the record
(`to_jsonl`) and the recording's writer thread puts it next to the audio as
`<CallSid>.jsonl`, mode 0600, renamed into place like the audio.

Time. Every event's `t` is seconds since the media stream started, on the recording's own
timeline: slot n of the audio (the caller's n-th 20 ms frame) starts at n * 0.02 s. So a mark
drawn at `t` sits on the waveform where the thing happened.

Bounds. A record holds at most `max_events` events (the end always fits: it says how many were
dropped) and each text at most `max_text` characters (the end counts the texts cut). A call
cannot grow its record past ~10 MB, whatever its assistant sends.

Keys pressed are `pressed` events without the keys unless keypad.log_digits (they may be a PIN).
Transcripts are untrusted text: the renderer escapes them like a log line (`show`).

The file format, one JSON object per line, `event` naming its kind (see the event classes):
    {"event":"start","t":0.0,"call_sid":"CA...","stream_sid":"MZ...","from":"+1...",...}
    {"event":"turn","t":2.46,"turn":1,"latency_ms":412}
    ...
    {"event":"end","t":12.3,"reason":"caller-hangup",...}

Reading (`read_record`) validates every line against the event classes; a bad line is a
`RecordError` naming the file and the line. `render` turns a record into the readable
timeline, `plot` into a picture of both channels (matplotlib, imported only then).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, cast

import msgspec

from voxd.errors import VoxdError
from voxd.observability.untrusted import show
from voxd.twilio.stream_token import CALL_SID

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "MAX_EVENTS",
    "MAX_TEXT",
    "AnsweredByEvent",
    "BargeIn",
    "CallRecord",
    "Ended",
    "Event",
    "Pressed",
    "RecordError",
    "Stage",
    "Started",
    "Transcribed",
    "Transfer",
    "Turn",
    "plot",
    "read_record",
    "render",
    "show_command",
]

MAX_EVENTS: Final = 5000
"""Events a record keeps (start and end included); later ones are counted, not kept."""
MAX_TEXT: Final = 2000
"""Characters a text of the record keeps (a transcript, a reason); longer ones are cut."""
MAX_FILE_BYTES: Final = 32 * 1024 * 1024
"""A record file larger than this is not one voxd wrote: refused unread."""
VERSION: Final = 1
"""The record format's version (in the start event)."""
PLOT_EXTRA: Final = "the plot needs matplotlib: pip install 'voxd[plot]'"

_WHO: Final = {"user": "caller", "assistant": "assistant"}
"""A transcript's role -> who that is on the phone."""
Role = Literal["user", "assistant"]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Millis = Annotated[int, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class RecordError(VoxdError):
    """A call's record cannot be read: missing, unreadable, or not what voxd writes."""


# -- the events --------------------------------------------------------------------------------

class _Event(msgspec.Struct, frozen=True, tag_field="event", omit_defaults=True):
    t: Seconds
    """Seconds since the media stream started (the recording's timeline)."""


class Started(_Event, tag="start", frozen=True):
    """The media stream started: who called whom, when (wall clock, UTC, ISO 8601)."""

    call_sid: str
    stream_sid: str
    from_number: str = msgspec.field(default="", name="from")
    to_number: str = msgspec.field(default="", name="to")
    direction: str = ""
    """The call's `direction` parameter, when the webhook gave it one (e.g. outbound-api)."""
    at: str = ""
    assistant: str = ""
    """The provider (echo, vapi, websocket)."""
    version: int = VERSION


class Turn(_Event, tag="turn", frozen=True):
    """The assistant's answer to the caller's `turn`-th turn started going out at `t`,
    `latency_ms` after the caller stopped speaking."""

    turn: Annotated[int, msgspec.Meta(ge=1)]
    latency_ms: Millis


class BargeIn(_Event, tag="barge-in", frozen=True):
    """The caller talked over the assistant: its audio was cut after the caller had heard
    `heard_ms` of its turn; `dropped_ms` never played. `source`: "vad" (voxd heard it) or
    "assistant" (the assistant said so)."""

    source: str
    heard_ms: Millis
    dropped_ms: Millis = 0


class Pressed(_Event, tag="pressed", frozen=True):
    """The caller pressed a key; which one only with keypad.log_digits."""

    digits: str | None = None


class Transfer(_Event, tag="transfer", frozen=True):
    """The assistant asked to hand the caller to `to`: `result` placed (Twilio took it),
    failed (it did not: the caller heard the fallback), refused (not an allowed destination:
    `reason`), or decided (the call ended before it could be moved)."""

    to: str
    result: str
    reason: str = ""


class Transcribed(_Event, tag="transcript", frozen=True):
    """What was said, as the assistant transcribed it (`role` user is the caller)."""

    role: Role
    text: str


class Stage(_Event, tag="stage", frozen=True):
    """How long a stage of the assistant's turn took, as its platform reported it (stage:
    transcript, first_token, first_audio, total)."""

    stage: str
    ms: int


class AnsweredByEvent(_Event, tag="answered-by", frozen=True):
    """Who answered an outbound call (Twilio's AnsweredBy: human, machine_end_beep, ...)."""

    value: str


class Ended(_Event, tag="end", frozen=True):
    """The call ended: why, and the figures of its summary line."""

    reason: str
    duration_s: Seconds = 0.0
    frames_in: Count = 0
    frames_out: Count = 0
    dropped_in: Count = 0
    dropped_out: Count = 0
    turns: Count = 0
    latency_p50_ms: Millis | None = None
    latency_p95_ms: Millis | None = None
    barge_ins: Count = 0
    events_dropped: Count = 0
    """Events past the record's bound (MAX_EVENTS), not kept."""
    texts_cut: Count = 0
    """Texts cut to MAX_TEXT characters."""


Event = (Started | Turn | BargeIn | Pressed | Transfer | Transcribed | Stage | AnsweredByEvent
         | Ended)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _t(seconds: float) -> float:
    """A time for the record: ms resolution, never negative."""
    return max(0.0, round(seconds, 3)) if math.isfinite(seconds) else 0.0


class CallRecord:
    """One call's timeline as it happens (pure: no I/O, no clock: the call passes the times).

    Every method appends one event and returns at once; past the bound they only count."""

    def __init__(self, *, max_events: int = MAX_EVENTS, max_text: int = MAX_TEXT) -> None:
        if max_events < 2:
            raise ValueError("a record keeps at least its start and its end")
        self.events: list[Event] = []
        self.max_events = max_events
        self.max_text = max_text
        self.dropped = 0
        """Events not kept (past `max_events`)."""
        self.cut = 0
        """Texts cut to `max_text`."""
        self._transfer: int | None = None  # the decided transfer's index, for its result

    def _text(self, text: str) -> str:
        if len(text) > self.max_text:
            self.cut += 1
            return text[:self.max_text]
        return text

    def _room(self) -> bool:
        """There is room for one more event (the last place is the end's); else it is
        counted as dropped."""
        if len(self.events) >= self.max_events - 1:
            self.dropped += 1
            return False
        return True

    def started(self, t: float, call_sid: str, stream_sid: str, *, from_number: str = "",
                to_number: str = "", direction: str = "", at: str = "",
                assistant: str = "") -> None:
        """The media stream started (`at`: wall-clock time, ISO 8601)."""
        if not self._room():
            return
        cut = self._text
        self.events.append(Started(_t(t), cut(call_sid), cut(stream_sid), cut(from_number),
                          cut(to_number), cut(direction), cut(at), cut(assistant)))

    def turn(self, t: float, turn: int, latency: float) -> None:
        """The answer to the caller's `turn`-th turn started going out, `latency` s after the
        caller stopped."""
        if self._room():
            self.events.append(Turn(_t(t), max(1, turn), _ms(latency)))

    def barge_in(self, t: float, source: str, heard: float, dropped: float = 0.0) -> None:
        """The assistant was cut short after `heard` s of its turn; `dropped` s never played."""
        if self._room():
            self.events.append(BargeIn(_t(t), self._text(source), _ms(heard), _ms(dropped)))

    def pressed(self, t: float, digits: str | None = None) -> None:
        """The caller pressed a key (`digits`: which, only when they may be kept)."""
        if self._room():
            self.events.append(Pressed(_t(t), None if digits is None else self._text(digits)))

    def transfer(self, t: float, to: str, result: str, reason: str = "") -> None:
        """A transfer to `to` was asked for; `result` "decided" until `transfer_result`."""
        if self._room():
            self.events.append(Transfer(_t(t), self._text(to), result, self._text(reason)))
            self._transfer = len(self.events) - 1 if result == "decided" else None

    def transfer_result(self, result: str) -> None:
        """How the decided transfer went (placed, failed)."""
        if self._transfer is not None:
            decided = self.events[self._transfer]
            assert isinstance(decided, Transfer)
            self.events[self._transfer] = msgspec.structs.replace(decided, result=result)
            self._transfer = None

    def transcript(self, t: float, role: str, text: str) -> None:
        """The assistant's transcript of what `role` ("user": the caller, or "assistant")
        said; another role is not kept."""
        if role in _WHO and self._room():
            self.events.append(Transcribed(_t(t), cast(Role, role), self._text(text)))

    def stage(self, t: float, stage: str, seconds: float) -> None:
        """A stage of the assistant's turn took `seconds` (its platform's own figure)."""
        if self._room():
            self.events.append(Stage(_t(t), self._text(stage), _ms(seconds)))

    def answered_by(self, t: float, value: str) -> None:
        """Who answered the call (Twilio's AnsweredBy)."""
        if self._room():
            self.events.append(AnsweredByEvent(_t(t), self._text(value)))

    def ended(self, t: float, reason: str, *, duration: float = 0.0, frames_in: int = 0,
              frames_out: int = 0, dropped_in: int = 0, dropped_out: int = 0, turns: int = 0,
              latency_p50: float | None = None, latency_p95: float | None = None,
              barge_ins: int = 0) -> None:
        """The call ended (always kept: the last place is kept for it)."""
        self.events.append(Ended(
            _t(t), self._text(reason), _t(duration), frames_in, frames_out, dropped_in,
            dropped_out, turns, None if latency_p50 is None else _ms(latency_p50),
            None if latency_p95 is None else _ms(latency_p95), barge_ins, self.dropped,
            self.cut))

    def to_jsonl(self) -> bytes:
        """The record as JSON Lines (one event a line, each line ending with a newline)."""
        return _ENCODER.encode_lines(self.events)


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(Event)


# -- reading -----------------------------------------------------------------------------------

def parse_record(data: bytes, name: str = "record") -> list[Event]:
    """The events of a record's bytes; RecordError naming `name` and the line for anything
    voxd would not have written."""
    events: list[Event] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = _DECODER.decode(line)
        except msgspec.ValidationError as exc:
            raise RecordError(f"{name}, line {number}: not a call record event: {exc}") \
                from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise RecordError(f"{name}, line {number}: not JSON: {exc}") from None
        if not events and not isinstance(event, Started):
            raise RecordError(f"{name}, line {number}: a record begins with its start event, "
                              f"not {event.__struct_config__.tag!r}")
        if events and isinstance(event, Started):
            raise RecordError(f"{name}, line {number}: a second start event")
        if events and isinstance(events[-1], Ended):
            raise RecordError(f"{name}, line {number}: an event after the end")
        events.append(event)
    if not events:
        raise RecordError(f"{name}: empty: no start event")
    return events


def read_record(path: Path) -> list[Event]:
    """The events of the record at `path` (validated); RecordError if it is missing,
    unreadable, too large, or malformed."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RecordError(_cannot_read(path, exc)) from None
    if len(data) > MAX_FILE_BYTES:
        raise RecordError(f"{path}: over {MAX_FILE_BYTES // (1024 * 1024)} MB: not a call "
                          "record voxd wrote")
    return parse_record(data, str(path))


def _cannot_read(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"cannot read {path}: permission denied (records are mode 0600, owned by the "
                "user voxd runs as: run this as that user, e.g. sudo -u voxd)")
    return f"cannot read {path}: {exc.strerror or exc}"


# -- the readable timeline ---------------------------------------------------------------------

def _latency(ms: int | None) -> str:
    return "-" if ms is None else f"{ms} ms"


def describe(event: Event) -> str:
    """One event in words (untrusted text escaped)."""
    if isinstance(event, Started):
        return "call started"
    if isinstance(event, Turn):
        return (f"turn {event.turn}: the assistant answers, {event.latency_ms} ms after the "
                f"caller stopped at {max(0.0, event.t - event.latency_ms / 1000):.2f}s")
    if isinstance(event, BargeIn):
        return (f"barge-in ({show(event.source, 20)}): the caller heard {event.heard_ms} ms of "
                f"the assistant's turn; {event.dropped_ms} ms dropped")
    if isinstance(event, Pressed):
        return "keypad: pressed" + (f" {show(event.digits, 40)}" if event.digits else "")
    if isinstance(event, Transfer):
        reason = f" ({show(event.reason, 200)})" if event.reason else ""
        return f"transfer to {show(event.to or '(default)', 64)}: {show(event.result, 20)}{reason}"
    if isinstance(event, Transcribed):
        return f"{_WHO[event.role]}: \"{show(event.text, MAX_TEXT)}\""
    if isinstance(event, AnsweredByEvent):
        return f"answered by: {show(event.value, 40)}"
    if isinstance(event, Stage):
        return f"assistant {show(event.stage, 20)}: {event.ms} ms"
    return f"call ended: {show(event.reason, 160)}"


def render(events: Sequence[Event]) -> str:
    """The record as a timeline for a person to read."""
    start = events[0]
    assert isinstance(start, Started)
    parties = ""
    if start.from_number or start.to_number:
        parties = (f"  from {show(start.from_number or '-', 40)} to "
                   f"{show(start.to_number or '-', 40)}")
    lines = [f"call {show(start.call_sid, 40)}  stream {show(start.stream_sid, 40)}{parties}"]
    facts = [f"started {show(start.at, 40)}" if start.at else "",
             f"direction {show(start.direction, 40)}" if start.direction else "",
             f"assistant {show(start.assistant, 40)}" if start.assistant else ""]
    if any(facts):
        lines.append("  " + ", ".join(f for f in facts if f))
    lines.append("")
    for event in events:
        lines.append(f"  {event.t:8.2f}s  {describe(event)}")
    end = events[-1]
    lines.append("")
    if isinstance(end, Ended):
        lines.append(
            f"  duration {end.duration_s:.1f}s, turns {end.turns} (latency p50 "
            f"{_latency(end.latency_p50_ms)}, p95 {_latency(end.latency_p95_ms)}), barge-ins "
            f"{end.barge_ins}, frames in {end.frames_in} / out {end.frames_out}, dropped in "
            f"{end.dropped_in} / out {end.dropped_out}")
        if end.events_dropped or end.texts_cut:
            lines.append(f"  the record was bounded: {end.events_dropped} event(s) not kept, "
                         f"{end.texts_cut} text(s) cut to {MAX_TEXT} characters")
    else:
        lines.append("  (no end recorded: the process stopped during the call?)")
    return "\n".join(lines)


# -- the picture -------------------------------------------------------------------------------

AUDIO_SUFFIXES: Final = ("wav", "flac", "opus")


def find_audio(directory: Path, call_sid: str) -> Path | None:
    """The call's recording next to its record, if there is one."""
    for suffix in AUDIO_SUFFIXES:
        path = directory / f"{call_sid}.{suffix}"
        if path.is_file():
            return path
    return None


def envelope(samples: np.ndarray, rate: int, columns: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, minima, maxima) of `samples` in at most `columns` buckets: a waveform drawn at
    the picture's resolution, however long the call."""
    import numpy as np

    n = len(samples)
    if n == 0:
        empty = np.zeros(1)
        return empty, empty, empty
    size = max(1, math.ceil(n / columns))
    padded = np.zeros(math.ceil(n / size) * size, np.float64)
    padded[:n] = samples / 32768.0
    buckets = padded.reshape(-1, size)
    times = (np.arange(len(buckets)) * size + size / 2) / rate
    return times, buckets.min(axis=1), buckets.max(axis=1)


def plot(events: Sequence[Event], audio: Path | None, out: Path) -> None:
    """Draw both channels of the recording (caller above, what the caller heard below) with
    the record's turns, latencies, barge-ins and other events marked; write it to `out` (PNG).
    ImportError when matplotlib is missing."""
    import soundfile as sf
    from matplotlib.figure import Figure  # the optional extra: only here

    start = events[0]
    assert isinstance(start, Started)
    channels: list[np.ndarray] = []
    rate = 8000
    if audio is not None:
        try:
            data, rate = sf.read(audio, dtype="int16", always_2d=True)
        except (OSError, RuntimeError) as exc:  # soundfile's errors are RuntimeErrors
            raise RecordError(f"cannot read {audio}: {exc}") from None
        channels = [data[:, i] for i in range(min(2, data.shape[1]))]
    length = max([len(c) / rate for c in channels] + [e.t for e in events] + [1.0])
    figure = Figure(figsize=(max(12.0, min(40.0, length / 3)), 6.5), dpi=100,
                    layout="constrained")
    caller, heard = figure.subplots(2, 1, sharex=True)
    titles = ("caller", "heard by the caller (the assistant)")
    colours = ("tab:blue", "tab:green")
    for axes, title, colour, i in zip((caller, heard), titles, colours, range(2), strict=True):
        if i < len(channels):
            times, low, high = envelope(channels[i], rate, 4000)
            axes.fill_between(times, low, high, color=colour, linewidth=0.4)
        else:
            axes.text(0.5, 0.5, "no recording", transform=axes.transAxes, ha="center",
                      va="center", color="grey")
        axes.set_ylim(-1.05, 1.05)
        axes.set_ylabel(title, fontsize=9)
        axes.set_yticks([])
        axes.grid(axis="x", alpha=0.3)
    heard.set_xlabel("seconds since the media stream started")
    heard.set_xlim(0, length)
    end = events[-1]
    summary = ""
    if isinstance(end, Ended):
        summary = (f" — {end.turns} turn(s), latency p50 {_latency(end.latency_p50_ms)}, "
                   f"{end.barge_ins} barge-in(s), ended: {show(end.reason, 60)}")
    caller.set_title(f"call {start.call_sid}{summary}", fontsize=10, loc="left")
    _mark(caller, heard, events, length)
    figure.savefig(out, format="png")


def _mark(caller: object, heard: object, events: Iterable[Event], length: float) -> None:
    """Turns (the caller's silence before the answer shaded, its latency written), barge-ins,
    keys, transfers and the end, on both channels; a legend says which is which."""
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    assert isinstance(caller, Axes) and isinstance(heard, Axes)
    both = (caller, heard)
    level = 0
    for event in events:
        near_end = event.t > 0.92 * length  # labels there go to the left of their line
        side: dict[str, Any] = ({"xytext": (-3, 0), "ha": "right"} if near_end else
                                {"xytext": (3, 0), "ha": "left"})
        if isinstance(event, Turn):
            stopped = max(0.0, event.t - event.latency_ms / 1000)
            for axes in both:
                axes.axvspan(stopped, event.t, color="orange", alpha=0.25, linewidth=0)
                axes.axvline(event.t, color="darkorange", linewidth=1.2)
            heard.annotate(f"turn {event.turn}\n{event.latency_ms} ms", (event.t, 0.97),
                           textcoords="offset points", va="top", fontsize=8,
                           color="saddlebrown", **side)
        elif isinstance(event, BargeIn):
            for axes in both:
                axes.axvline(event.t, color="red", linewidth=1.5, linestyle="--")
            heard.annotate(f"barge-in\nheard {event.heard_ms} ms", (event.t, -0.97),
                           textcoords="offset points", va="bottom", fontsize=8, color="red",
                           **side)
        elif (label := _label(event)) is not None:
            for axes in both:
                axes.axvline(event.t, color="purple", linewidth=1, linestyle=":")
            caller.annotate(show(label, 40), (event.t, 0.97 - 0.22 * (level % 3)),
                            textcoords="offset points", va="top", fontsize=8, color="purple",
                            **side)
            level += 1
    caller.legend(handles=[
        Patch(color="orange", alpha=0.25, label="caller stopped -> answer (response latency)"),
        Line2D([], [], color="red", linestyle="--", label="barge-in"),
        Line2D([], [], color="purple", linestyle=":", label="key, transfer, answered by, end"),
    ], loc="lower right", fontsize=7, framealpha=0.8)


def _label(event: Event) -> str | None:
    """The short label of an event marked with a dotted line (None: not marked so)."""
    if isinstance(event, Pressed):
        return "key" + (f" {event.digits}" if event.digits else "")
    if isinstance(event, Transfer):
        return f"transfer: {event.result}"
    if isinstance(event, AnsweredByEvent):
        return f"answered by {event.value}"
    if isinstance(event, Ended):
        return "end"
    return None


# -- voxd show ---------------------------------------------------------------------------------

def _problem(text: str) -> None:
    from voxd.observability.logging import stderr_problem

    print(stderr_problem(f"voxd: {text}"), file=sys.stderr, flush=True)


def recordings_directory(config_path: str | None) -> Path:
    """recording.directory of the config voxd would use. Only the file is read and checked:
    not the secrets, which a read-only command has no use for (and which the operator running
    it may not hold)."""
    from voxd.config import parse_config, resolve_config_path
    from voxd.errors import ConfigError

    path = resolve_config_path(config_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return Path(parse_config(raw).recording.directory)


def show_command(args: argparse.Namespace) -> int:
    """`voxd show CALLSID [--plot OUT.png] [--directory DIR] [--config PATH]`: print a
    recorded call's timeline and, with --plot, draw it. Exit 0, 1 (no record, unreadable), or 2
    (not a CallSid, no matplotlib, bad config: raised as ConfigError for the CLI)."""
    call_sid = args.call_sid
    if not CALL_SID.fullmatch(call_sid):
        _problem(f"not a CallSid: {show(call_sid, 64)} (CA and 32 hex digits)")
        return 2
    directory = args.directory if args.directory is not None else \
        recordings_directory(args.config)
    path = directory / f"{call_sid}.jsonl"
    if not os.path.lexists(path):
        hint = "" if args.directory is not None else " (recording.enabled is false?)"
        _problem(f"no record of {call_sid} in {directory}{hint}")
        return 1
    try:
        events = read_record(path)
    except RecordError as exc:
        _problem(str(exc))
        return 1
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (present: the plot can be drawn)
        except ImportError:
            _problem(PLOT_EXTRA)
            return 2
    print(render(events), flush=True)
    if args.plot is not None:
        audio = find_audio(directory, call_sid)
        try:
            plot(events, audio, args.plot)
        except RecordError as exc:
            _problem(str(exc))
            return 1
        except OSError as exc:
            _problem(f"cannot write {args.plot}: {exc.strerror or exc}")
            return 1
        note = "" if audio is not None else " (no recording next to the record: marks only)"
        print(f"\nwrote {args.plot}{note}")
    return 0

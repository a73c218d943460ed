"""A simulated call's report: what the caller said and heard, frame by frame, the timeline,
the turns and their latency (as the caller measures it, and voxd's own figures from its marks),
rendered for a person or written as a stereo WAV. Pure: no I/O but `write_wav`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxd.audio.g711 import ulaw_decode
from voxd.audio.line import FRAME_SECONDS
from voxd.audio.vad import SpeechDetector, SpeechEdge, frame_energy_dbfs_ulaw
from voxd.observability.untrusted import show
from voxd.sim.audio_files import write_stereo_wav


def speech_segments(frames: list[bytes], min_speech_ms: int = 60,
                    hangover_ms: int = 300) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in a list of 20 ms mu-law frames."""
    detector = SpeechDetector(min_speech_ms=min_speech_ms, hangover_ms=hangover_ms)
    segments: list[tuple[float, float]] = []
    for frame in frames:
        edge = detector.update(frame_energy_dbfs_ulaw(frame))
        if edge is SpeechEdge.STOPPED:
            segments.append(_segment(detector.speech_started_at_frame,
                                     detector.speech_ended_at_frame))
    if detector.in_speech:
        segments.append(_segment(detector.speech_started_at_frame, detector.last_voiced_frame))
    return segments


def _segment(first: int | None, last: int | None) -> tuple[float, float]:
    return (first or 0) * FRAME_SECONDS, ((last or 0) + 1) * FRAME_SECONDS


@dataclass(frozen=True)
class Turn:
    """One caller utterance and the assistant's answer as the caller heard it."""

    caller_start: float
    caller_end: float
    reply_start: float | None

    @property
    def latency(self) -> float | None:
        """End of the caller's speech -> first assistant audio heard."""
        return None if self.reply_start is None else self.reply_start - self.caller_end


@dataclass
class CallReport:
    """Everything the simulated call saw; times are seconds since the stream started."""

    call_sid: str
    stream_sid: str
    events: list[tuple[float, str]] = field(default_factory=list)
    caller_frames: list[bytes] = field(default_factory=list)
    heard_frames: list[bytes] = field(default_factory=list)
    """What the caller heard, frame by frame in real time (silence where none had arrived)."""
    received_audio: bytearray = field(default_factory=bytearray)
    """All assistant audio voxd sent, in order, whenever it arrived (cleared audio too)."""
    media_received: int = 0
    clears: int = 0
    marks_echoed: int = 0
    closed_by: str = "caller"
    """Who ended the stream: "caller" (stop sent), "voxd" (it closed the socket) or "rest"
    (Twilio, on a REST update)."""
    close_code: int | None = None
    """The close code of a stream voxd closed (it closes with 1000; anything else, such as
    1006 for a connection lost without a close, is abnormal)."""
    after_stream: str = ""
    """The verbs after `</Connect>` in the webhook's TwiML."""
    next_twiml: str = ""
    """The verbs (inside `<Response>`) Twilio runs once the stream is over: the REST update's
    TwiML, the `<Connect action>`'s answer, or else `after_stream`; "" when the call is over
    (the caller or a REST update hung up, or nothing is left to run)."""
    transferred_to: str = ""
    """The number, SIP URI or client a `<Dial>` in `next_twiml` calls ("" when none)."""
    after_dial: str = ""
    """The verbs the `<Dial action>` answered once the dialled leg ended."""
    tones_heard: str = ""
    """DTMF keys decoded from what the caller heard, in order."""
    keys_pressed: str = ""
    """The caller's key presses sent as `dtmf` events, in order."""
    clear_times: list[tuple[float, float]] = field(default_factory=list)
    """Each `clear` voxd sent (a barge-in): (when, seconds of queued audio it dropped)."""
    mark_times: list[tuple[float, str]] = field(default_factory=list)
    """Each mark echoed back to voxd: (when, its name)."""
    errors: list[str] = field(default_factory=list)
    voxd_latencies: dict[int, float] = field(default_factory=dict)
    """Turn number -> voxd's own measured response latency (from its marks)."""
    stages: dict[int, dict[str, float]] = field(default_factory=dict)
    """Turn number (voxd's) -> the assistant's stage figures, seconds (from voxd's marks)."""

    def failure(self) -> str | None:
        """Why the call did not end normally, in one line (None when it did): voxd ended the
        stream before the caller hung up and the caller is left with something other than a
        hang-up or a transfer (voxd's fallback, which it gives after a failure such as an
        unreachable assistant)."""
        if self.closed_by == "caller":
            return None
        if self.closed_by == "voxd" and self.close_code not in (1000, None):
            return (f"the media stream was closed abnormally (code {self.close_code}) before "
                    "the caller hung up (voxd's log says why)")
        after = self.next_twiml.strip()
        if not after or "<Dial" in after or after.endswith("<Hangup/>"):
            return None  # hung up (by the assistant, a REST update, max-duration), transferred
        return (f"voxd ended the call before the caller hung up, and the caller hears "
                f"{show(after, 160)} (the fallback: voxd's log says why, as the call's "
                "reason=, e.g. upstream-error when the assistant cannot be reached)")

    def caller_speech(self) -> list[tuple[float, float]]:
        """When the caller spoke."""
        return speech_segments(self.caller_frames)

    def assistant_speech(self) -> list[tuple[float, float]]:
        """When the caller heard the assistant."""
        return speech_segments(self.heard_frames)

    def turns(self) -> list[Turn]:
        """The caller's turns, each with the first assistant audio heard after it. Caller speech
        with no assistant audio between (a pause mid-sentence) is one turn."""
        replies = [start for start, _ in self.assistant_speech()]
        spans: list[tuple[float, float]] = []
        for start, end in self.caller_speech():
            if spans and not any(spans[-1][1] <= r < start for r in replies):
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        turns = []
        for i, (start, end) in enumerate(spans):
            next_start = spans[i + 1][0] if i + 1 < len(spans) else float("inf")
            reply = next((r for r in replies if end <= r < next_start), None)
            turns.append(Turn(start, end, reply))
        return turns

    def write_wav(self, path: Path) -> None:
        """The call as stereo: caller on the left, what the caller heard on the right."""
        left = ulaw_decode(np.frombuffer(b"".join(self.caller_frames), np.uint8))
        right = ulaw_decode(np.frombuffer(b"".join(self.heard_frames), np.uint8))
        write_stereo_wav(path, left, right)

    def render(self) -> str:
        """The timeline and per-turn latency table, for a person to read."""
        lines = [f"call {self.call_sid}  stream {self.stream_sid}"]
        rows = list(self.events)
        rows += [(s, f"caller speaks until {e:.2f}s") for s, e in self.caller_speech()]
        rows += [(s, f"assistant heard until {e:.2f}s") for s, e in self.assistant_speech()]
        for t, what in sorted(rows, key=lambda r: r[0]):
            lines.append(f"  {t:7.2f}s  {what}")
        lines.append("")
        lines.append("  turn  caller stopped  assistant heard  latency (caller)  latency (voxd)"
                     + ("  assistant stages" if self.stages else ""))
        turns = self.turns()
        for n, turn in enumerate(turns, 1):
            heard = "-" if turn.reply_start is None else f"{turn.reply_start:.2f}s"
            latency = "no reply" if turn.latency is None else f"{turn.latency * 1000:.0f} ms"
            # voxd numbers the turns it answered (N in its mark): the caller's N-th answered
            # turn. A turn voxd timed without a mark (answered inside its speech hangover)
            # leaves a gap rather than shifting the later figures onto the wrong rows.
            answered = sum(1 for t in turns[:n] if t.latency is not None)
            figure = self.voxd_latencies.get(answered) if turn.latency is not None else None
            mine = "-" if figure is None else f"{figure * 1000:.0f} ms"
            stages = ""
            if self.stages and figure is not None:
                stages = "  " + (", ".join(f"{stage} {seconds * 1000:.0f} ms"
                                           for stage, seconds in
                                           self.stages.get(answered, {}).items()) or "-")
            lines.append(f"  {n:4d}  {turn.caller_end:13.2f}s  {heard:>15}  {latency:>16}"
                         f"  {mine:>14}{stages}")
        if not turns:
            lines.append("  (the caller did not speak)")
        lines.append("")
        lines.append(
            f"  frames sent {len(self.caller_frames)}, assistant frames received "
            f"{self.media_received}, clears {self.clears}, marks echoed {self.marks_echoed}, "
            f"ended by {self.closed_by}"
        )
        if self.keys_pressed or self.tones_heard:
            lines.append(f"  keys pressed {self.keys_pressed or '-'}, tones heard "
                         f"{self.tones_heard or '-'}")
        if self.transferred_to:
            lines.append(f"  transferred to {self.transferred_to}")
        lines.extend(f"  error: {e}" for e in self.errors)
        return "\n".join(lines)


def read_voxd_mark(name: str, report: CallReport) -> None:
    """voxd names the mark ahead of each answer `voxd:turn=N;latency_ms=X`: its own figure,
    then the assistant's stage figures for that turn where its provider gives them
    (`;total_ms=Y;first_token_ms=Z...`)."""
    if not name.startswith("voxd:turn="):
        return
    try:
        fields = dict(part.split("=", 1) for part in name[5:].split(";"))
        turn = int(fields.pop("turn"))
        report.voxd_latencies[turn] = int(fields.pop("latency_ms")) / 1000
        stages = {key[:-3]: int(value) / 1000 for key, value in fields.items()
                  if key.endswith("_ms")}
        if stages:
            report.stages[turn] = stages
    except (ValueError, KeyError):
        report.errors.append(f"unreadable voxd mark {name!r}")


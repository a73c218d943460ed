"""`voxd call --plot` / `voxd demo --plot`: a picture of a simulated call.

Both channels on one time axis (the caller above, what the caller heard below), each turn's
silence-to-answer shaded with its latency written (as the caller measured it, and voxd's own
figure), each `clear` (a barge-in) and the audio it dropped, the marks echoed back to voxd, key
presses and tones, and how the call ended. matplotlib is the optional `plot` extra: imported
only here, only when drawing."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from voxd.audio.g711 import ulaw_decode
from voxd.audio.line import FRAME_SECONDS, SAMPLE_RATE
from voxd.call_record import envelope
from voxd.observability.untrusted import show
from voxd.sim.caller import CallReport

END_EVENTS = ("caller hung up", "voxd closed the stream", "Twilio ended the stream",
              "interrupted")
"""The timeline entries that say how the stream ended."""


def plotting_available() -> bool:
    """Can matplotlib (the `plot` extra) be imported?"""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def _pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


def end_of(report: CallReport, ended: str | None = None) -> tuple[float, str]:
    """When and how the stream ended, for a person: ("interrupted" when `ended` says so)."""
    length = len(report.caller_frames) * FRAME_SECONDS
    if ended is not None:
        return length, ended
    for t, what in reversed(report.events):
        if what.startswith(END_EVENTS):
            return t, what
    return length, f"ended by {report.closed_by}"


def _latency_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def plot_call(report: CallReport, out: Path, *, ended: str | None = None) -> None:
    """Draw the call and write it to `out` as PNG. ImportError without matplotlib."""
    from matplotlib.figure import Figure

    caller_pcm, heard_pcm = _pcm(report.caller_frames), _pcm(report.heard_frames)
    end_t, end_what = end_of(report, ended)
    length = max(len(caller_pcm) / SAMPLE_RATE, len(heard_pcm) / SAMPLE_RATE, end_t, 1.0)
    figure = Figure(figsize=(max(12.0, min(40.0, length / 1.2)), 7.0), dpi=100,
                    layout="constrained")
    caller, heard = figure.subplots(2, 1, sharex=True)
    for axes, pcm, title, colour in ((caller, caller_pcm, "caller (sent)", "tab:blue"),
                                     (heard, heard_pcm, "heard by the caller\n(the assistant)",
                                      "tab:green")):
        times, low, high = envelope(pcm, SAMPLE_RATE, 4000)
        axes.fill_between(times, low, high, color=colour, linewidth=0.4)
        axes.set_ylim(-1.15, 1.15)
        axes.set_ylabel(title, fontsize=9)
        axes.set_yticks([])
        axes.grid(axis="x", alpha=0.3)
    heard.set_xlabel("seconds since the media stream started")
    heard.set_xlim(0, length * 1.01)

    turns = report.turns()
    answered = [t.latency for t in turns if t.latency is not None]
    voxd = [seconds for _, seconds in sorted(report.voxd_latencies.items())]
    p50 = f", latency p50 {float(np.median(answered)) * 1000:.0f} ms" if answered else ""
    caller.set_title(
        f"call {report.call_sid} — {len(turns)} turn(s){p50}, {report.clears} clear(s) "
        f"(barge-in), {report.marks_echoed} mark(s) echoed — {show(end_what, 60)}",
        fontsize=10, loc="left")
    _mark(report, caller, heard, turns, voxd, length, (end_t, end_what))
    figure.savefig(out, format="png")


def _side(t: float, length: float) -> dict[str, Any]:
    """Labels near the right edge go to the left of their line."""
    return ({"xytext": (-3, 0), "ha": "right"} if t > 0.88 * length else
            {"xytext": (3, 0), "ha": "left"})


def _mark(report: CallReport, caller: Any, heard: Any, turns: list[Any], voxd: list[float],
          length: float, end: tuple[float, str]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    both = (caller, heard)
    answered = 0
    for n, turn in enumerate(turns, 1):
        if turn.reply_start is None:
            caller.annotate(f"turn {n}: no reply", (turn.caller_end, -1.1),
                            textcoords="offset points", va="bottom", fontsize=8, color="grey",
                            **_side(turn.caller_end, length))
            continue
        answered += 1
        for axes in both:
            axes.axvspan(turn.caller_end, turn.reply_start, color="orange", alpha=0.3,
                         linewidth=0)
        mine = f"\n(voxd: {_latency_ms(voxd[answered - 1])})" if answered <= len(voxd) else ""
        heard.annotate(f"turn {n}: {_latency_ms(turn.latency)}{mine}",
                       (turn.reply_start, 1.1), textcoords="offset points", va="top",
                       fontsize=8, color="saddlebrown", **_side(turn.reply_start, length))
    for t, dropped in report.clear_times:
        for axes in both:
            axes.axvline(t, color="red", linewidth=1.5, linestyle="--")
        heard.annotate(f"clear (barge-in)\n{dropped * 1000:.0f} ms dropped", (t, -1.1),
                       textcoords="offset points", va="bottom", fontsize=8, color="red",
                       **_side(t, length))
    if report.mark_times:
        heard.plot([t for t, _ in report.mark_times], [-1.0] * len(report.mark_times),
                   linestyle="none", marker="^", markersize=6, color="black")
    level = 0
    for t, what in report.events:
        if what.startswith(("caller pressed", "tone heard", "transferred", "Twilio REST")):
            for axes in both:
                axes.axvline(t, color="purple", linewidth=1, linestyle=":")
            caller.annotate(show(what, 40), (t, 1.1 - 0.25 * (level % 3)),
                            textcoords="offset points", va="top", fontsize=8, color="purple",
                            **_side(t, length))
            level += 1
    end_t, end_what = end
    for axes in both:
        axes.axvline(end_t, color="black", linewidth=1.5)
    caller.annotate(f"end: {show(end_what, 50)}", (end_t, -1.1), textcoords="offset points",
                    va="bottom", fontsize=8, color="black", xytext=(-3, 0), ha="right")
    caller.figure.legend(handles=[
        Patch(color="orange", alpha=0.3, label="caller stopped -> assistant heard (latency)"),
        Line2D([], [], color="red", linestyle="--", label="clear: voxd cut its audio (barge-in)"),
        Line2D([], [], color="black", marker="^", linestyle="none",
               label="mark echoed to voxd (its audio played)"),
        Line2D([], [], color="purple", linestyle=":", label="key, tone, transfer, REST"),
        Line2D([], [], color="black", label="end of the stream"),
    ], loc="outside lower center", ncols=5, fontsize=8, frameon=False)

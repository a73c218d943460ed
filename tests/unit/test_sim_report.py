"""The simulator's turn table: voxd's own figures land on the turn they are numbered for."""

from __future__ import annotations

import numpy as np

from voxd.audio.g711 import ULAW_SILENCE, ulaw_encode
from voxd.sim.report import CallReport

LOUD = ulaw_encode((8000 * np.sin(np.arange(160) * 0.3)).astype(np.int16))
QUIET = bytes([ULAW_SILENCE]) * 160


def frames(*spans: tuple[float, float], total: float = 6.0) -> list[bytes]:
    """20 ms frames, loud within each (start, end) second span."""
    return [LOUD if any(a <= i * 0.02 < b for a, b in spans) else QUIET
            for i in range(round(total / 0.02))]


def turn_rows(report: CallReport) -> list[list[str]]:
    text = report.render().splitlines()
    start = next(i for i, line in enumerate(text) if "latency (voxd)" in line) + 1
    return [line.split() for line in text[start:] if line.strip()[:1].isdigit()]


def test_a_turn_voxd_timed_without_a_mark_leaves_a_gap_not_a_shift():
    report = CallReport(call_sid="CA1", stream_sid="MZ1")
    report.caller_frames = frames((0.2, 1.0), (2.2, 3.0), (4.2, 5.0))
    report.heard_frames = frames((1.5, 2.0), (3.5, 4.0), (5.5, 5.9))
    report.voxd_latencies = {1: 0.480, 3: 0.520}  # turn 2 was answered inside the hangover
    rows = turn_rows(report)
    assert [row[0] for row in rows] == ["1", "2", "3"], report.render()
    voxd_column = [row[-1] if row[-1] == "-" else " ".join(row[-2:]) for row in rows]
    assert voxd_column == ["480 ms", "-", "520 ms"], report.render()

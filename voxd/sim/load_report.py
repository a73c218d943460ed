"""The load test's figures: each call's frames sent and received (round trips, losses),
voxd's turn latencies and teardown times, and voxd's CPU and memory per call; rendered for a
person. Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from voxd.config import plural

TURN_HOLD_MS = 400
"""With --turns, the echo answers this long after the caller stops (part of the turn latency,
not voxd's)."""
FAILURES_SHOWN = 5
"""Distinct reasons for failed calls the report lists (the rest are counted)."""


@dataclass
class CallResult:
    """One call's figures."""

    sent_at: list[float] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    voxd_latencies: list[float] = field(default_factory=list)
    teardown: float | None = None
    """Seconds from `stop` sent to voxd closing the socket."""
    error: str = ""

    @property
    def lost(self) -> int:
        return max(0, len(self.sent_at) - len(self.received_at))

    def round_trips(self) -> list[float]:
        return [r - s for s, r in zip(self.sent_at, self.received_at, strict=False)]


@dataclass
class LoadReport:
    calls: int
    seconds: float
    results: list[CallResult]
    cpu_cores: float | None = None
    """voxd's CPU over the steady window, in cores (1.0 = one core)."""
    rss_per_call: float | None = None
    idle_rss: float | None = None
    turns: bool = False
    """The upstream answered turns (only speech comes back, later: no round trips or losses)."""

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.results)

    @property
    def sent(self) -> int:
        return sum(len(r.sent_at) for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error]

    def percentile(self, values: list[float], p: float) -> float:
        return float(np.percentile(values, p)) * 1000 if values else float("nan")

    def figures(self) -> dict[str, float]:
        trips = [t for r in self.results for t in r.round_trips()]
        latencies = [t for r in self.results for t in r.voxd_latencies]
        teardowns = [r.teardown for r in self.results if r.teardown is not None]
        return {
            "cpu_per_call_pct": (self.cpu_cores / self.calls * 100
                                 if self.cpu_cores is not None else float("nan")),
            "rss_per_call_kb": (self.rss_per_call / 1024
                                if self.rss_per_call is not None else float("nan")),
            "rtt_p50_ms": self.percentile(trips, 50),
            "rtt_p99_ms": self.percentile(trips, 99),
            "turn_p50_ms": self.percentile(latencies, 50),
            "turn_p95_ms": self.percentile(latencies, 95),
            "teardown_max_ms": max(teardowns) * 1000 if teardowns else float("nan"),
        }

    def render(self) -> str:
        f = self.figures()
        frames = (f"frames sent {self.sent}, lost {self.lost}" if not self.turns else
                  f"frames sent {self.sent} (the echo answers turns: losses not counted)")
        lines = [
            f"calls {self.calls} x {self.seconds:.0f}s; {frames}; calls failed "
            f"{len(self.errors)}",
            (f"voxd CPU per call      {f['cpu_per_call_pct']:.2f}% of one core "
             f"(voxd total {self.cpu_cores:.2f} cores)" if self.cpu_cores is not None else
             "voxd CPU per call      not measured (no /metrics samples of voxd's in the "
             "steady window)"),
            (f"voxd RSS per call      {f['rss_per_call_kb']:.0f} kB "
             f"(idle {(self.idle_rss or float('nan')) / 2**20:.1f} MB)"
             if self.rss_per_call is not None else
             "voxd RSS per call      not measured (no /metrics samples of voxd's in the "
             "steady window)"),
            ("frame round trip       not measured with --turns (the echo holds each turn)"
             if self.turns else
             f"frame round trip       p50 {f['rtt_p50_ms']:.1f} ms, p99 {f['rtt_p99_ms']:.1f} ms "
             "(Twilio -> voxd -> echo -> voxd -> Twilio; one way through voxd is at most half)"
             if f["rtt_p50_ms"] == f["rtt_p50_ms"] else
             "frame round trip       none measured (no frame came back)"),
            (f"turn latency (voxd's)  p50 {f['turn_p50_ms']:.0f} ms, p95 {f['turn_p95_ms']:.0f} ms"
             f"{f' (the echo waits {TURN_HOLD_MS} ms of it)' if self.turns else ''}"
             if f["turn_p50_ms"] == f["turn_p50_ms"] else  # not NaN
             "turn latency (voxd's)  no turns: a passthrough echo talks continuously "
             "(run with --turns)"),
            (f"teardown after stop    max {f['teardown_max_ms']:.0f} ms"
             if f["teardown_max_ms"] == f["teardown_max_ms"] else
             "teardown after stop    none measured (no call reached its stop)"),
        ]
        return "\n".join(lines + self.failures())

    def failures(self, shown: int = FAILURES_SHOWN) -> list[str]:
        """The failed calls' reasons, most frequent first, each with how many calls it ended."""
        counts = Counter(self.errors).most_common()
        lines = [f"  failed: {plural(n, 'call')}: {why}" for why, n in counts[:shown]]
        if len(counts) > shown:
            rest = sum(n for _, n in counts[shown:])
            lines.append(f"  failed: {plural(rest, 'call')} more, for "
                         f"{plural(len(counts) - shown, 'other reason')}")
        return lines

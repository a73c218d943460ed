"""Calls per core: voxd's CPU, memory, losses and delay per call at 1..200 concurrent calls, in
both audio modes, next to the reference bridge (bench/peer_bridge.py: asyncio, the tutorial
way) and the trio floor (bench/floor_bridge.py: the same bare pass-through on voxd's own
transport) measured the same way.

Run: .venv/bin/pip install -q -e '.[bench]' && .venv/bin/python bench/calls_per_core.py
     [--calls 1,25,50,100,200] [--seconds 20] [--repeat 1] [--skip-peer] [--workers-check 200]
     [--record wav|flac|opus] [--provider websocket,vapi,openai,elevenlabs,deepgram]

Every bridge runs in its own process against the same echo upstream process (`voxd
echo-upstream`), loaded by `voxd loadtest`'s calls (real-time 20 ms frames, signed webhooks,
marks echoed). CPU and RSS are read from /proc for the bridge's process tree over the steady
window (all calls up), so every bridge is measured identically. This box's CPU figures vary
by about +-10% from run to run: --repeat interleaves the bridges and reports medians.

--provider NAME[,NAME...] measures voxd in mulaw mode against each provider's simulator
instead (voxd/sim/vendors, run by `voxd echo-upstream --protocol NAME` in its own process,
saying every piece of audio straight back in its vendor's protocol: base64 inside JSON for
openai and elevenlabs, binary frames for vapi, deepgram and the generic websocket). Only voxd's
process tree is sampled, so the simulator's CPU is not counted as voxd's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voxd.sim.load import (  # noqa: E402
    LoadReport,
    LoadTestError,
    Processes,
    free_port,
    proc_sampler,
    run_load,
    start_echo,
    stop_processes,
)


async def measure_voxd(audio: str, calls: int, seconds: float, workers: int = 1,
                       record: str = "", protocol: str = "websocket") -> LoadReport:
    """voxd's cost; with `record` (a recording.format), every call recorded to a temporary
    directory; with `protocol`, against that provider's simulator."""
    with tempfile.TemporaryDirectory(prefix="voxd-bench-rec-") as directory:
        extra: dict[str, dict[str, object]] = {}
        if record:
            extra["recording"] = {"enabled": True, "directory": directory, "format": record}
        return await _measure_voxd(Processes(audio, workers, calls, extra, protocol=protocol),
                                   calls, seconds)


async def _measure_voxd(processes: Processes, calls: int, seconds: float) -> LoadReport:
    try:
        await processes.ready()
        return await run_load(processes.webhook_url, calls, seconds, auth_token=processes.token,
                              sampler=proc_sampler(processes.voxd.pid))
    finally:
        processes.stop()


def start_bridge(script: str) -> tuple[int, list[subprocess.Popen[bytes]]]:
    echo_port, echo = start_echo()
    port = free_port()
    bridge = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), "--port",
                               str(port), "--upstream", f"ws://127.0.0.1:{echo_port}/"])
    return port, [bridge, echo]


async def measure_bridge(script: str, calls: int, seconds: float) -> LoadReport:
    """bench/peer_bridge.py or bench/floor_bridge.py, loaded like voxd."""
    port, (peer, echo) = start_bridge(script)
    try:
        await trio.sleep(1.5)
        if peer.poll() is not None:
            raise LoadTestError(f"bench/{script} did not start (pip install -e '.[bench]')")
        return await run_load(f"http://127.0.0.1:{port}/twilio/voice", calls, seconds,
                              sampler=proc_sampler(peer.pid))
    finally:
        stop_processes([peer, echo])


def row(name: str, calls: int, report: LoadReport) -> str:
    f = report.figures()
    return (f"{name:22}{calls:6d}{f['cpu_per_call_pct']:10.2f}{(report.cpu_cores or 0):8.2f}"
            f"{f['rss_per_call_kb']:9.0f}{report.lost:7d}{len(report.errors):7d}"
            f"{f['rtt_p50_ms']:9.1f}{f['rtt_p99_ms']:9.1f}")


async def main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.calls.split(",")]
    bridges: list[tuple[str, Callable[[int, float], Awaitable[LoadReport]]]] = [
        ("voxd mulaw", partial(measure_voxd, "mulaw")),
        ("voxd pcm16", partial(measure_voxd, "pcm16")),
    ]
    if args.provider:
        bridges = [("voxd mulaw" if name == "websocket" else f"voxd mulaw {name}",
                    partial(measure_voxd, "mulaw", protocol=name))
                   for name in args.provider.split(",")]
    if args.record:
        bridges += [(f"voxd mulaw rec {args.record}",
                     partial(measure_voxd, "mulaw", record=args.record)),
                    (f"voxd pcm16 rec {args.record}",
                     partial(measure_voxd, "pcm16", record=args.record))]
    if not args.skip_peer:
        bridges += [("peer (asyncio) mulaw", partial(measure_bridge, "peer_bridge.py")),
                    ("floor (trio) mulaw", partial(measure_bridge, "floor_bridge.py"))]
    print(f"{'bridge':22}{'calls':>6}{'%core/call':>10}{'cores':>8}{'kB/call':>9}{'lost':>7}"
          f"{'failed':>7}{'rtt p50':>9}{'rtt p99':>9}", flush=True)
    cost: dict[tuple[str, int], list[float]] = defaultdict(list)
    for calls in counts:
        for _ in range(args.repeat):  # interleaved: a slow minute of the box hits all alike
            for name, measure in bridges:
                report = await measure(calls, args.seconds)
                cost[name, calls].append(report.figures()["cpu_per_call_pct"])
                print(row(name, calls, report), flush=True)
    if args.workers_check:
        report = await measure_voxd("pcm16", args.workers_check, args.seconds, workers=2)
        print(row("voxd pcm16 workers=2", args.workers_check, report), flush=True)
    print(f"\nmedians of {args.repeat} run(s), % of a core per call"
          + ("" if args.skip_peer else "; peer/voxd > 1 means voxd is cheaper"))
    for calls in counts:
        med = {name: statistics.median(cost[name, calls]) for name, _ in bridges}
        line = f"{calls:4d} calls: " + ", ".join(
            f"{name} {value:.2f} ({min(cost[name, calls]):.2f}-{max(cost[name, calls]):.2f})"
            for name, value in med.items())
        if not args.skip_peer and med.get("voxd mulaw", 0) > 0:
            voxd = med["voxd mulaw"]
            line += (f"; peer/voxd {med['peer (asyncio) mulaw'] / voxd:.2f}x, floor/voxd "
                     f"{med['floor (trio) mulaw'] / voxd:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="1,25,50,100,200")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-peer", action="store_true",
                        help="measure voxd only (not the asyncio peer and the trio floor)")
    parser.add_argument("--repeat", type=int, default=1, metavar="R",
                        help="measure every bridge R times at each call count, interleaved")
    parser.add_argument("--record", default="", metavar="FORMAT",
                        help="also measure voxd with every call recorded (wav, flac, opus)")
    parser.add_argument("--workers-check", type=int, default=200, metavar="N",
                        help="also run N pcm16 calls with server.workers = 2 (0: skip)")
    parser.add_argument("--provider", default="", metavar="NAME[,NAME...]",
                        help="measure voxd (mulaw) against these providers' simulators "
                             "(websocket, vapi, openai, elevenlabs, deepgram) instead of the "
                             "generic echo upstream in both audio modes")
    args = parser.parse_args()
    unknown = set(filter(None, args.provider.split(","))) - {
        "websocket", "vapi", "openai", "elevenlabs", "deepgram"}
    if unknown:
        parser.error(f"--provider: no simulator for {', '.join(sorted(unknown))}")
    trio.run(main, args)

"""Calls per core: voxd's CPU, memory, losses and delay per call at 1..200 concurrent calls, in
both audio modes, next to the reference bridge (bench/peer_bridge.py) measured the same way.

Run: .venv/bin/pip install -q -e '.[bench]' && .venv/bin/python bench/calls_per_core.py
     [--calls 1,25,50,100,200] [--seconds 20] [--skip-peer] [--workers-check 200]

Every bridge runs in its own process against the same echo upstream process (`voxd
echo-upstream`), loaded by `voxd loadtest`'s calls (real-time 20 ms frames, signed webhooks,
marks echoed). CPU and RSS are read from /proc for the bridge's process tree over the steady
window (all calls up), so voxd and the peer are measured identically.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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
    stop_processes,
)


async def measure_voxd(audio: str, calls: int, seconds: float, workers: int = 1) -> LoadReport:
    processes = Processes(audio, workers, calls)
    try:
        await processes.ready()
        return await run_load(processes.webhook_url, calls, seconds, auth_token=processes.token,
                              sampler=proc_sampler(processes.voxd.pid))
    finally:
        processes.stop()


def start_peer() -> tuple[int, list[subprocess.Popen[bytes]]]:
    echo_port, port = free_port(), free_port()
    echo = subprocess.Popen([sys.executable, "-m", "voxd", "echo-upstream", "--listen",
                             f"127.0.0.1:{echo_port}"], stdout=subprocess.DEVNULL)
    peer = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peer_bridge.py"), "--port",
                             str(port), "--upstream", f"ws://127.0.0.1:{echo_port}/"])
    return port, [peer, echo]


async def measure_peer(calls: int, seconds: float) -> LoadReport:
    port, (peer, echo) = start_peer()
    try:
        await trio.sleep(1.5)
        if peer.poll() is not None:
            raise LoadTestError("the peer bridge did not start (pip install -e '.[bench]')")
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
    print(f"{'bridge':22}{'calls':>6}{'%core/call':>10}{'cores':>8}{'kB/call':>9}{'lost':>7}"
          f"{'failed':>7}{'rtt p50':>9}{'rtt p99':>9}", flush=True)
    peer: dict[int, LoadReport] = {}
    voxd_mulaw: dict[int, LoadReport] = {}
    for calls in counts:
        for audio in ("mulaw", "pcm16"):
            report = await measure_voxd(audio, calls, args.seconds)
            if audio == "mulaw":
                voxd_mulaw[calls] = report
            print(row(f"voxd {audio}", calls, report), flush=True)
        if not args.skip_peer:
            peer[calls] = await measure_peer(calls, args.seconds)
            print(row("peer (asyncio) mulaw", calls, peer[calls]), flush=True)
    if args.workers_check:
        report = await measure_voxd("pcm16", args.workers_check, args.seconds, workers=2)
        print(row("voxd pcm16 workers=2", args.workers_check, report), flush=True)
    if peer:
        ratios = [f"{n} calls {peer[n].figures()['cpu_per_call_pct'] / cost:.2f}x"
                  for n, v in voxd_mulaw.items() if n in peer
                  for cost in [v.figures()["cpu_per_call_pct"]]]
        print("\npeer CPU per call / voxd's (mulaw): " + ", ".join(ratios))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="1,25,50,100,200")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--workers-check", type=int, default=200, metavar="N",
                        help="also run N pcm16 calls with server.workers = 2 (0: skip)")
    trio.run(main, parser.parse_args())

"""Soak: thousands of short calls plus a few long ones through one voxd, then check that its
memory, file descriptors and trio tasks are back at their baseline.

Run: .venv/bin/python bench/soak.py [--short 3000] [--concurrency 60] [--long 5]
                                    [--long-seconds 120] [--audio pcm16]

voxd and an echo upstream run as their own processes (as `voxd loadtest` starts them). The
figures come from voxd's /metrics: voxd_process_resident_memory_bytes, process_open_fds,
voxd_trio_tasks. The baseline is taken after a warm-up of 20 calls (first-use allocations).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.sim.load import LoadCall, Processes, place_calls, speech_frames

METRICS = ("voxd_process_resident_memory_bytes", "process_open_fds", "voxd_trio_tasks",
           "voxd_calls_active")


async def scrape(client: httpx.AsyncClient, origin: str) -> dict[str, float]:
    text = (await client.get(origin + "/metrics")).text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore
            for name in METRICS}


async def main(args: argparse.Namespace) -> None:
    processes = Processes(args.audio, 1, args.concurrency + args.long)
    try:
        await processes.ready()
        hook, token, origin = processes.webhook_url, processes.token, processes.origin
        short_frames, long_frames = speech_frames(1.0), speech_frames(args.long_seconds)
        async with httpx.AsyncClient(timeout=10) as client:
            await place_calls([LoadCall(hook, short_frames, token) for _ in range(20)], 10)
            await trio.sleep(1.0)
            before = await scrape(client, origin)
            short = [LoadCall(hook, short_frames, token) for _ in range(args.short)]
            long = [LoadCall(hook, long_frames, token) for _ in range(args.long)]
            started = time.monotonic()
            peak_rss = before["voxd_process_resident_memory_bytes"]
            async with trio.open_nursery() as nursery:

                async def progress() -> None:
                    nonlocal peak_rss
                    while True:
                        await trio.sleep(5)
                        now = await scrape(client, origin)
                        peak_rss = max(peak_rss, now["voxd_process_resident_memory_bytes"])
                        done = sum(c.result.teardown is not None or bool(c.result.error)
                                   for c in short)
                        print(f"[{time.monotonic() - started:5.0f}s] short calls done {done}/"
                              f"{args.short}, active {now['voxd_calls_active']:.0f}, RSS "
                              f"{now['voxd_process_resident_memory_bytes'] / 2**20:.1f} MB",
                              file=sys.stderr, flush=True)

                nursery.start_soon(progress)
                async with trio.open_nursery() as calls:
                    calls.start_soon(place_calls, long, args.long)
                    calls.start_soon(place_calls, short, args.concurrency)
                nursery.cancel_scope.cancel()
            elapsed = time.monotonic() - started
            await trio.sleep(2.0)
            after = await scrape(client, origin)
    finally:
        processes.stop()
    results = [c.result for c in short + long]
    teardowns = [r.teardown for r in results if r.teardown is not None]
    print(f"soak: {args.short} short calls (1 s, {args.concurrency} at a time) + {args.long} "
          f"long calls ({args.long_seconds:.0f} s), {args.audio}, in {elapsed:.0f} s")
    print(f"calls failed {sum(bool(r.error) for r in results)}, frames lost "
          f"{sum(r.lost for r in results)} of {sum(len(r.sent_at) for r in results)}, "
          f"teardown after stop: max {max(teardowns) * 1000:.0f} ms, over 1 s: "
          f"{sum(t > 1.0 for t in teardowns)}")
    print(f"{'':22}{'baseline':>12}{'after':>12}")
    print(f"{'RSS (MB)':22}{before['voxd_process_resident_memory_bytes'] / 2**20:12.1f}"
          f"{after['voxd_process_resident_memory_bytes'] / 2**20:12.1f}"
          f"   (peak {peak_rss / 2**20:.1f})")
    print(f"{'open fds':22}{before['process_open_fds']:12.0f}{after['process_open_fds']:12.0f}")
    print(f"{'trio tasks':22}{before['voxd_trio_tasks']:12.0f}{after['voxd_trio_tasks']:12.0f}")
    print(f"{'calls active':22}{before['voxd_calls_active']:12.0f}"
          f"{after['voxd_calls_active']:12.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=60)
    parser.add_argument("--long", type=int, default=5)
    parser.add_argument("--long-seconds", type=float, default=120.0)
    parser.add_argument("--audio", choices=("pcm16", "mulaw"), default="pcm16")
    trio.run(main, parser.parse_args())

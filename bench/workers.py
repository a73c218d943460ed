"""How `server.workers` spreads calls: each voxd process's CPU during a load test.

Run: .venv/bin/python bench/workers.py [--calls 100] [--workers 2] [--audio pcm16]

Starts `voxd echo-upstream` and `voxd serve` with the given number of workers (each in its own
process, as `voxd loadtest` does), places the calls, and prints the cores used by the supervisor
and by each worker over 8 s of the steady window (from /proc/<pid>/stat), then the load test's
own report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.sim.load import Processes, process_cpu_seconds, process_tree, run_load

SECONDS = 20.0


async def main(args: argparse.Namespace) -> None:
    processes = Processes(args.audio, args.workers, args.calls)
    try:
        await processes.ready()
        supervisor = processes.voxd.pid
        pids = process_tree(supervisor)

        async def sample() -> None:
            await trio.sleep(8)
            before, start = {p: process_cpu_seconds(p) for p in pids}, trio.current_time()
            await trio.sleep(8)
            after, elapsed = {p: process_cpu_seconds(p) for p in pids}, trio.current_time() - start
            for pid in pids:
                role = "supervisor" if pid == supervisor and args.workers > 1 else "worker"
                print(f"{role:10} pid {pid:7d}  {(after[pid] - before[pid]) / elapsed:.3f} cores")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            report = await run_load(processes.webhook_url, args.calls, SECONDS,
                                    auth_token=processes.token)
        print(report.render())
    finally:
        processes.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--audio", choices=("pcm16", "mulaw"), default="pcm16")
    trio.run(main, parser.parse_args())

"""bench/fuzz.py in short: half a minute of seeded fuzzing over real connections against a real
`voxd serve` (signatures and stream tokens on) while good calls flow: mutated HTTP/1.x
requests, WebSocket upgrades, HTTP/2 prefaces and h2c upgrades, WebSocket frames after a signed
upgrade, and mutated Twilio messages with tokens from the webhook. Then every check of the long
run: the same process alive and answering /healthz, no traceback or internal error in its
log, no forged log line, descriptors and trio tasks back at the baseline, the good calls
lost no frame, under one byte of log per byte received, a clean stop on SIGTERM.

A failure prints the table, the case(s) that caused each problem, and where their bytes were
saved (tmp_path/cases); `bench/fuzz.py --seed 11 --replay N` sends one of them again.

Against the tree of 30 Nov 11:10 (issue 13's hardening under way) seed 11 fails two checks:
"no traceback" (Hypercorn's `Error in ASGI Framework`, a BusyResourceError race between a
response send and the connection's close) and "back at baseline" (every request Hypercorn
answers 400 itself holds a counted connection and two tasks for its 75 s keep-alive timeout).
Earlier trees also failed it on h2c tracebacks and two X-Twilio-Signature headers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"
SEED = 11


def load_bench():
    spec = importlib.util.spec_from_file_location("voxd_bench_fuzz", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_fuzz_short(tmp_path):
    fuzz = load_bench()
    options = fuzz.Options(seed=SEED, minutes=0.4, connections=4, max_cases=1000,
                           good_call_seconds=6.0, settle=15.0, triage=False, quiet=True,
                           out=tmp_path / "cases", log_copy=tmp_path / "voxd.log")
    report = await fuzz.run_fuzz(options)
    assert not report.failed, f"{report.render()}\n(voxd's log: {report.log_path})"
    # The fuzz did reach every surface: each kind ran, signed upgrades got past the handshake
    # (so frames and Twilio messages were parsed), and several good calls were judged.
    assert set(report.kinds) == set(fuzz.KINDS), report.kinds
    assert min(report.kinds.values()) >= 10, report.kinds
    assert report.accepted >= 20, report.render()
    assert report.good_calls >= 3, report.render()

"""`voxd loadtest` as a command: its flags checked, voxd (and an echo upstream) started when
no webhook URL is given, the load run, the report printed, and every way it can go wrong said
in one line: voxd unreachable before any call (exit 1), calls that failed (each counted in the
report under its reason, exit 1), Ctrl-C (the report so far, exit 130).
voxd/cli.py declares the flags and hands the parsed arguments here."""

from __future__ import annotations

import argparse
import math
import os
import sys

import trio

from voxd.config import plural
from voxd.errors import EXIT_INTERRUPTED, VoxdError, is_interrupt
from voxd.sim.explain import url_problem
from voxd.sim.interrupt import interruptible
from voxd.sim.load import LoadTest, check_reachable, shortest_call
from voxd.sim.load_report import TURN_HOLD_MS
from voxd.sim.rig import Processes

USAGE = 2
FAILED = 1


def _say(text: str) -> None:
    print(f"voxd: {text}", file=sys.stderr, flush=True)


def _usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags (None when nothing is)."""
    if args.calls < 1 or args.workers < 1:
        return "--calls and --workers must be at least 1"
    if not math.isfinite(args.seconds):
        return "--seconds must be a number of seconds"
    if args.seconds < (least := shortest_call(args.calls)):
        return (f"--seconds must be at least {least:g} (the {least - 4:g} s ramp of "
                f"{plural(args.calls, 'call')} plus a 4 s steady window)")
    if args.turns and args.webhook_url:
        return ("--turns applies to the echo upstream loadtest starts; against a running "
                "voxd, start `voxd echo-upstream --reply-after-ms 400` for it")
    if args.webhook_url and (problem := url_problem(args.webhook_url)):
        return f"WEBHOOK_URL: {problem}"
    return None


def loadtest_command(args: argparse.Namespace) -> int:
    """`voxd loadtest [WEBHOOK_URL] ...`: 0 when every call ran to its end, 1 when any
    failed or the test could not run, 2 for bad flags, 130 when interrupted."""
    if problem := _usage(args):
        _say(problem)
        return USAGE
    test: LoadTest | None = None
    processes: Processes | None = None

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run() -> None:
        nonlocal test, processes
        if args.webhook_url:
            url = args.webhook_url
            token = args.auth_token or os.environ.get("VOXD_TWILIO_AUTH_TOKEN") or None
            test = LoadTest(url, args.calls, args.seconds, auth_token=token,
                            progress=progress, turns=args.turns)
            await check_reachable(url)
        else:
            processes = Processes(args.audio, args.workers, args.calls,
                                  reply_after_ms=TURN_HOLD_MS if args.turns else 0)
            await processes.ready()
            test = LoadTest(processes.webhook_url, args.calls, args.seconds,
                            auth_token=processes.token, progress=progress, turns=args.turns)
        await test.run()

    what = (args.webhook_url if args.webhook_url else
            f"{args.audio}, {plural(args.workers, 'worker')}, echo upstream"
            f"{' answering turns' if args.turns else ''}")
    print(f"voxd loadtest: {plural(args.calls, 'call')} x {args.seconds:.0f}s ({what})",
          flush=True)
    try:
        try:
            outcome = trio.run(interruptible, run)
        except BaseException as exc:
            if not is_interrupt(exc):
                raise
            outcome = None  # a Ctrl-C before the signal receiver was up
    except VoxdError as exc:  # before any call: voxd cannot be started or reached
        _say(str(exc))
        return FAILED
    finally:
        if processes is not None:
            processes.stop()
    if outcome is None or outcome.interrupted:
        if test is None or test.placed == 0:
            _say("interrupted before any call was placed")
        else:
            print(test.report.render(), flush=True)
            _say(f"interrupted: the report covers the {plural(test.placed, 'call')} placed so "
                 "far (cut short, so not a measurement of the full run)")
        return EXIT_INTERRUPTED if outcome is None or outcome.interrupted != "SIGTERM" \
            else 128 + 15
    assert test is not None
    print(test.report.render(), flush=True)
    failed = len(test.report.errors)
    if failed:
        _say(f"{failed} of {plural(args.calls, 'call')} failed (reasons above)")
        return FAILED
    return 0

"""`voxd call` and `voxd demo` as commands: their flags checked, the call placed, the report
printed and written (WAV, picture), Ctrl-C turned into a clean stop that keeps the recording.
voxd/cli.py declares the flags and hands the parsed arguments here.

Exit codes: 0 the call ran and ended normally (the caller hung up, or voxd hung up or
transferred); 1 the call could not run (one line says why) or voxd ended it with a failure
(`CallReport.failure`: the fallback, an abnormal close) or the call saw errors; 2 bad flags or
URL; 130 interrupted (143 for SIGTERM)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from voxd.config import plural
from voxd.errors import EXIT_INTERRUPTED, VoxdError, is_interrupt
from voxd.sim.caller import FRAME_SECONDS, CallReport, TwilioSimulator, parse_dtmf
from voxd.sim.explain import url_problem
from voxd.sim.interrupt import Outcome, interruptible

FAILED = 1
"""Exit code when the call could not run, or voxd ended it with a failure."""
USAGE = 2
"""Exit code for bad flags (as argparse's)."""


class UsageError(VoxdError):
    """A flag's value is unusable; the message names the flag."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _number(flag: str, value: float | None, *, minimum: float, inclusive: bool,
            unit: str, note: str = "") -> None:
    """A numeric flag must be finite and at least (or above) `minimum`."""
    if value is None:
        return
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise UsageError(f"{flag}: must be {relation} {minimum:g}{unit}, got {value:g}"
                         + (f" ({note})" if note else ""))


def _record_problem(flag: str, path: Path | None) -> str | None:
    """Why the file cannot be written there (checked before the call, not after it)."""
    if path is None:
        return None
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return f"{flag}: {path} is a directory"
    if not parent.is_dir():
        return f"{flag}: no such directory: {parent}"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{flag}: cannot write {path}: permission denied"
    return None


def _outputs(args: argparse.Namespace) -> None:
    """The --record and --plot paths are writable (and matplotlib is there for --plot)."""
    for flag, path in (("--record", args.record), ("--plot", getattr(args, "plot", None))):
        if problem := _record_problem(flag, path):
            raise UsageError(problem)
    if getattr(args, "plot", None) is not None:
        from voxd.sim.plot import plotting_available

        if not plotting_available():
            raise UsageError("--plot needs matplotlib: pip install 'voxd[plot]'")


def _run(place: Callable[[], Awaitable[CallReport]],
         simulator: Callable[[], TwilioSimulator | None]) -> Outcome[CallReport]:
    """Run the call in trio, Ctrl-C (or SIGTERM) hanging the caller up early (or cancelling
    the call before its stream is up: its outcome then has no result, and the report so far
    is the simulator's)."""
    def hang_up() -> bool:
        sim = simulator()
        return sim is not None and sim.hang_up()

    try:
        return trio.run(partial(interruptible, place, hang_up))
    except BaseException as exc:
        if is_interrupt(exc):  # before the signal receiver was up, or a second Ctrl-C
            return Outcome(None, "SIGINT")
        raise


def _interrupted(outcome: Outcome[CallReport], sim: TwilioSimulator | None,
                 record: Path | None, plot: Path | None) -> int:
    """One line on what an interrupted call kept; the recording so far written."""
    report = outcome.result or (sim.report_so_far if sim is not None else None)
    seconds = len(report.caller_frames) * FRAME_SECONDS if report is not None else 0.0
    if report is None or sim is None or not sim.stream_started.is_set():
        line = "interrupted before the media stream started: nothing recorded"
    else:
        ended = None  # the caller hung up: the timeline says so
        if outcome.result is None:  # cut off
            ended = "interrupted"
            report.events.append((seconds, "interrupted (Ctrl-C): the call was cut short"))
        written = []
        try:
            if record is not None:
                report.write_wav(record)
                written.append(str(record))
            if plot is not None:
                from voxd.sim.plot import plot_call

                plot_call(report, plot, ended=ended)
                written.append(str(plot))
        except OSError as exc:
            _say(f"voxd: {_unwritten(record, plot, written, exc)}")
        line = (f"interrupted: wrote the {seconds:.1f} s recorded so far to "
                f"{' and '.join(written)}" if written else
                f"interrupted after {seconds:.1f} s of the call (nothing written: no --record)")
    _say(f"voxd: {line}")
    return EXIT_INTERRUPTED if outcome.interrupted != "SIGTERM" else 128 + 15


def _unwritten(record: Path | None, plot: Path | None, written: list[str],
               exc: OSError) -> str:
    """The output that could not be written (the first of --record, --plot not yet in
    `written`), and why."""
    flag, path = (("--record", record) if record is not None and str(record) not in written
                  else ("--plot", plot))
    return f"{flag}: cannot write {path}: {exc.strerror or exc}"


def _finish(report: CallReport, record: Path | None, plot: Path | None,
            wrote: Callable[[Path], str]) -> int:
    print(report.render())
    written: list[str] = []
    try:
        if record is not None:
            report.write_wav(record)
            written.append(str(record))
            print(wrote(record))
        if plot is not None:
            from voxd.sim.plot import plot_call

            plot_call(report, plot)
            written.append(str(plot))
            print(f"drew the call to {plot}")
    except OSError as exc:
        _say(f"voxd: {_unwritten(record, plot, written, exc)}")
        return FAILED
    if failure := report.failure():
        _say(f"voxd: {failure}")
        return FAILED
    if report.errors:
        _say(f"voxd: the call ran, with {plural(len(report.errors), 'error')} (listed above)")
        return FAILED
    return 0


def call_command(args: argparse.Namespace) -> int:
    """`voxd call WEBHOOK_URL ...`"""
    return _usage_checked(_call, args)


def demo_command(args: argparse.Namespace) -> int:
    """`voxd demo ...`"""
    return _usage_checked(_demo, args)


def _usage_checked(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a usage problem it finds is one line and exit 2."""
    try:
        return command(args)
    except UsageError as exc:
        _say(f"voxd: {exc}")
        return USAGE


def _call(args: argparse.Namespace) -> int:
    from voxd.config import parse_listen
    from voxd.sim.audio_files import AudioFileError, read_audio
    from voxd.sim.demo import TAIL_SECONDS, bundled_sample
    from voxd.sim.rest import SimulatedRest

    if problem := url_problem(args.webhook_url):
        raise UsageError(f"WEBHOOK_URL: {problem}")
    _number("--seconds", args.seconds, minimum=0, inclusive=False, unit=" s")
    _number("--line-echo", args.line_echo, minimum=0, inclusive=True, unit=" dB",
            note="how much quieter the echo is than what the caller heard")
    if args.wav is not None and not args.wav.exists():
        raise UsageError(f"--wav: no such file: {args.wav}")
    _outputs(args)
    token = args.auth_token or os.environ.get("VOXD_TWILIO_AUTH_TOKEN") or None
    if args.account_sid is not None and not re.fullmatch(r"AC[0-9a-f]{32}", args.account_sid):
        raise UsageError("--account-sid: must be AC followed by 32 lower-case hex digits")
    if args.rest_listen is not None:
        try:
            parse_listen(args.rest_listen)
        except ValueError as exc:
            raise UsageError(f"--rest-listen: {exc}") from None
        if token is None:
            raise UsageError("--rest-listen: needs the auth token (--auth-token or "
                             "$VOXD_TWILIO_AUTH_TOKEN): voxd authenticates with it")
    try:
        audio = read_audio(args.wav) if args.wav else bundled_sample()
    except AudioFileError as exc:
        raise UsageError(f"--wav: {exc}") from None
    seconds = args.seconds if args.seconds is not None else len(audio) / 8000 + TAIL_SECONDS
    try:
        presses = parse_dtmf(args.dtmf, seconds) if args.dtmf is not None else []
    except ValueError as exc:
        raise UsageError(f"--dtmf: {exc}") from None
    echo = (args.line_echo, 120.0) if args.line_echo is not None else None
    rest = (SimulatedRest(args.account_sid or "", token or "")
            if args.rest_listen is not None else None)
    simulator = TwilioSimulator(args.webhook_url, auth_token=token, line_echo=echo,
                                account_sid=args.account_sid, rest=rest)
    simulator.on_stream_started = partial(
        print, f"stream started: the caller speaks for {seconds:.1f}s (Ctrl-C hangs up and "
               "keeps what was recorded)", flush=True)

    async def place() -> CallReport:
        if rest is None:
            return await simulator.call(audio, seconds, dtmf=presses)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(partial(rest.serve, bind=args.rest_listen))
            except OSError as exc:
                raise VoxdError(f"--rest-listen: cannot listen on {args.rest_listen}: "
                                f"{exc.strerror or exc}") from None
            print(f"simulated Twilio REST API on {rest.base_url} (account "
                  f"{rest.account_sid})", flush=True)
            report = await simulator.call(audio, seconds, dtmf=presses)
            nursery.cancel_scope.cancel()
        return report

    print(f"calling {args.webhook_url} for {seconds:.1f}s"
          f"{' (signed)' if token else ' (unsigned)'} ...", flush=True)
    outcome = _run(place, lambda: simulator)
    if outcome.interrupted or outcome.result is None:
        return _interrupted(outcome, simulator, args.record, getattr(args, "plot", None))
    return _finish(outcome.result, args.record, getattr(args, "plot", None),
                   lambda out: f"recorded the call to {out} (left: caller, right: assistant "
                               "as heard)")


def _demo(args: argparse.Namespace) -> int:
    from voxd.observability.logging import configure_logging
    from voxd.sim.demo import demo_seconds, describe, run_demo

    _outputs(args)
    try:
        presses = parse_dtmf(args.dtmf, demo_seconds()) if args.dtmf is not None else []
    except ValueError as exc:
        raise UsageError(f"--dtmf: {exc}") from None
    configure_logging("info")
    what = describe(args.provider)
    if args.provider != "echo":
        what += (f" (in-process on 127.0.0.1, throwaway key, assistant.provider = "
                 f"\"{args.provider}\")")
    print(f"voxd demo: starting voxd with {what} and calling it "
          "(it repeats each sentence after a short pause) ...", flush=True)
    placed: list[TwilioSimulator] = []

    def follow(simulator: TwilioSimulator) -> None:
        placed.append(simulator)
        simulator.on_stream_started = partial(
            print, "stream started: the caller speaks (Ctrl-C hangs up and keeps what was "
                   "recorded)", flush=True)

    outcome = _run(partial(run_demo, args.audio, dtmf=presses, provider=args.provider,
                           on_call=follow), lambda: placed[0] if placed else None)
    if outcome.interrupted or outcome.result is None:
        return _interrupted(outcome, placed[0] if placed else None, args.record,
                            getattr(args, "plot", None))
    return _finish(outcome.result, args.record, getattr(args, "plot", None),
                   lambda out: f"\nwrote {out}: left = caller, right = what the caller heard. "
                               "Play it with any audio player (e.g. `aplay` or `play`).")

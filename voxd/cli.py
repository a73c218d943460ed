"""The `voxd` command line: serve, check-config, reload, call, demo."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from voxd import __version__
from voxd.config import config_warnings, load_settings, resolve_config_path, summary
from voxd.errors import ConfigError, VoxdError
from voxd.observability import untrusted
from voxd.observability.logging import configure_logging, stderr_problem

log = logging.getLogger("voxd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxd", description="Bridge Twilio phone calls to voice-AI assistants.")
    parser.add_argument("--version", action="version", version=f"voxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", metavar="PATH", help="voxd.toml to use")

    check = sub.add_parser("check-config", help="validate the config and exit")
    check.add_argument("--config", metavar="PATH", help="voxd.toml to check")

    reload = sub.add_parser(
        "reload", help="check the config, then tell a running voxd to reload it (SIGHUP)",
        description="Check the config like check-config; if it is valid, send SIGHUP to the "
                    "running voxd (exit 0), else print one line per problem and signal nothing "
                    "(exit 2). The unit's ExecReload= runs it, so `systemctl reload voxd` fails "
                    "when the file is invalid.")
    reload.add_argument("--config", metavar="PATH", help="voxd.toml the running voxd reads")
    reload.add_argument("--pid", metavar="PID",
                        help="the voxd process to signal (default: $MAINPID, which systemd sets "
                             "for ExecReload=)")

    call = sub.add_parser("call", help="place a simulated Twilio call against a webhook")
    call.add_argument("webhook_url", metavar="WEBHOOK_URL",
                      help="e.g. http://127.0.0.1:3000/twilio/voice")
    call.add_argument("--wav", metavar="IN", type=Path,
                      help="caller audio: WAV of any kind, FLAC, OGG or AIFF, any rate and "
                           "channel count (mixed to mono, resampled; default: the bundled "
                           "sample)")
    call.add_argument("--record", metavar="OUT.wav", type=Path,
                      help="write the call as stereo WAV (caller left, assistant right)")
    call.add_argument("--plot", metavar="OUT.png", type=Path,
                      help="draw the call: both channels, each turn's latency, barge-ins and "
                           "clears, marks and the end (needs matplotlib: voxd[plot])")
    call.add_argument("--seconds", type=float, metavar="N",
                      help="call length (default: the audio plus 4 s to hear the reply)")
    call.add_argument("--line-echo", metavar="DB", type=float,
                      help="mix what the caller hears back into what it says, DB quieter "
                           "(>= 0) and 120 ms later, like a phone line's echo (e.g. 20)")
    call.add_argument("--auth-token", metavar="T",
                      help="Twilio auth token to sign with (default: $VOXD_TWILIO_AUTH_TOKEN)")
    call.add_argument("--dtmf", metavar="KEY@Ts,...",
                      help='keypad presses, each a key (0-9 * # A-D) and its time in seconds '
                           'since the stream started, e.g. "1@2.0s,#@3.5s"')
    call.add_argument("--rest-listen", metavar="HOST:PORT",
                      help="also serve a simulated Twilio REST API there (point voxd's "
                           "twilio.api_base_url at it): voxd's hang-ups and redirects of the "
                           "call drive it (needs the auth token)")
    call.add_argument("--account-sid", metavar="AC...",
                      help="the call's AccountSid (default: random; with --rest-listen, the "
                           "account the REST API accepts)")

    demo = sub.add_parser("demo", help="run voxd with the echo assistant (or a simulated vendor) "
                                       "and place one call")
    demo.add_argument("--provider", default="echo",
                      choices=("echo", "websocket", "vapi", "openai", "elevenlabs", "deepgram"),
                      help="the assistant: the built-in echo (default), or a simulator of that "
                           "vendor's protocol run in-process with a throwaway key (no account "
                           "needed), which says each sentence back through that protocol")
    demo.add_argument("--record", metavar="OUT.wav", type=Path, default=Path("voxd-demo.wav"),
                      help="where to write the call (default: ./voxd-demo.wav)")
    demo.add_argument("--plot", metavar="OUT.png", type=Path,
                      help="draw the call: both channels, each turn's latency, barge-ins and "
                           "clears, marks and the end (needs matplotlib: voxd[plot])")
    demo.add_argument("--audio", choices=("pcm16", "mulaw"), default="pcm16",
                      help="audio format spoken to the assistant (default: pcm16)")
    demo.add_argument("--dtmf", metavar="KEY@Ts,...",
                      help='keypad presses during the call, e.g. "1@2.0s,#@3.5s"')

    load = sub.add_parser("loadtest", help="many concurrent simulated calls; voxd's cost per call")
    load.add_argument("webhook_url", metavar="WEBHOOK_URL", nargs="?",
                      help="a running voxd whose upstream echoes audio (default: start voxd "
                           "and an echo upstream, each in its own process)")
    load.add_argument("--calls", type=int, default=50, metavar="N",
                      help="concurrent calls (default 50)")
    load.add_argument("--seconds", type=float, default=20.0, metavar="S",
                      help="length of each call (default 20)")
    load.add_argument("--audio", choices=("pcm16", "mulaw"), default="pcm16",
                      help="upstream audio of the voxd it starts (default pcm16)")
    load.add_argument("--workers", type=int, default=1, metavar="K",
                      help="server.workers of the voxd it starts (default 1)")
    load.add_argument("--turns", action="store_true",
                      help="the echo it starts answers each caller turn 400 ms after the caller "
                           "stops (measures turn latency; round trips and losses are measured "
                           "without it)")
    load.add_argument("--auth-token", metavar="T",
                      help="Twilio auth token to sign with, for a running voxd "
                           "(default: $VOXD_TWILIO_AUTH_TOKEN)")

    dial = sub.add_parser(
        "dial", help="place an outbound call through Twilio's REST API to this voxd's webhook",
        description="Create the call with Twilio REST (needs twilio.account_sid, "
                    "outbound.from_number or --from, and the auth token); Twilio then asks "
                    "voxd's own voice webhook, and the assistant talks to whoever answers. "
                    "Prints the CallSid.")
    dial.add_argument("to", metavar="TO", help="the number to call, E.164 (+14155550100); must "
                                               "match outbound.allowed_to")
    dial.add_argument("--from", dest="from_number", metavar="NUMBER",
                      help="caller id (default: outbound.from_number)")
    dial.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="a parameter for the assistant, as an inbound call's (repeatable)")
    dial.add_argument("--wait", action="store_true",
                      help="wait until the call is over and print how it ended (exit 1 unless "
                           "it was answered)")
    dial.add_argument("--config", metavar="PATH", help="voxd.toml to use")

    show = sub.add_parser("show", help="a recorded call's timeline (and a picture of it)")
    show.add_argument("call_sid", metavar="CALLSID", help="the call's SID (CA...)")
    show.add_argument("--plot", metavar="OUT.png", type=Path,
                      help="also draw both channels with turns, latencies and barge-ins marked "
                           "(needs the plot extra: pip install 'voxd[plot]')")
    show.add_argument("--directory", metavar="DIR", type=Path,
                      help="where the recordings are (default: recording.directory)")
    show.add_argument("--config", metavar="PATH", help="voxd.toml to use")

    echo = sub.add_parser("echo-upstream",
                          help="a fast echo assistant (generic WebSocket protocol, or a "
                               "simulated vendor's) for loadtest and the benchmarks")
    echo.add_argument("--listen", default=None, metavar="HOST:PORT",
                      help="where to listen (default 127.0.0.1:9100; the generic protocol "
                           "only: a simulated vendor picks free loopback ports and prints them)")
    echo.add_argument("--protocol", default="websocket",
                      choices=("websocket", "vapi", "openai", "elevenlabs", "deepgram"),
                      help="websocket (default): voxd's generic protocol on voxd's lean "
                           "WebSocket; any other: that vendor's simulator (voxd/sim/vendors) "
                           "echoing every piece of audio at once; it prints the voxd config "
                           "and secrets that point at it, as JSON")
    echo.add_argument("--audio", choices=("pcm16", "mulaw"), default="mulaw",
                      help="with --protocol: the audio format the simulated assistant is set "
                           "to (what an ElevenLabs agent is configured for; the others take "
                           "what voxd asks for; default mulaw)")
    echo.add_argument("--reply-after-ms", type=float, default=0.0, metavar="MS",
                      help="take turns: say each stretch of caller speech back once the caller "
                           "has been quiet this long (default 0: echo every frame at once)")
    from voxd import install
    install.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one voxd command; returns the exit code (0 ok, 1 runtime failure, 2 bad usage)."""
    try:
        try:
            return _command(argv)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here, not at the interpreter's exit
    except BrokenPipeError:
        # Its reader went away (`voxd ... | head -1`): stop quietly. What was written stays;
        # Python's own flush at exit must find somewhere to go.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def _command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    unknown = _unknown_command(parser, argv[0])
    if unknown:
        _problem(f"voxd: {unknown}")
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "reload":
            return _reload(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "call":
            return _call(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "loadtest":
            return _loadtest(args)
        if args.command == "echo-upstream":
            return _echo_upstream(args)
        if args.command == "dial":
            from voxd.outbound import dial_command
            return dial_command(args)
        if args.command == "show":
            from voxd.call_record import show_command
            return show_command(args)
        if args.command == "install-service":
            from voxd.install import run as install_service
            return install_service(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _problem(f"voxd: {problem}")
        return 2
    except VoxdError as exc:
        _problem(f"voxd: {exc}")
        return 1
    except KeyboardInterrupt:
        print("voxd: interrupted", file=sys.stderr)
        return 130
    return 2  # pragma: no cover - argparse requires a command


def _unknown_command(parser: argparse.ArgumentParser, word: str) -> str | None:
    """Why `word` is not one of voxd's commands (with the nearest one), or None if it is one
    (or an option, which argparse handles)."""
    if word.startswith("-"):
        return None
    commands = next(action.choices for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    if word in commands:
        return None
    near = difflib.get_close_matches(word, list(commands), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"no command '{untrusted.show(word, 40)}': {hint}`voxd --help` lists them"


def _problem(text: str, level: int = logging.ERROR) -> None:
    """Print a problem (with its journal priority under systemd)."""
    print(stderr_problem(text, level), file=sys.stderr, flush=True)


def _check_config(args: argparse.Namespace) -> int:
    from voxd.providers import build_provider

    settings = load_settings(resolve_config_path(args.config))
    build_provider(settings)
    print(summary(settings))
    for warning in config_warnings(settings):
        _problem(f"voxd: warning: {warning}", logging.WARNING)
    return 0


def _reload(args: argparse.Namespace) -> int:
    from voxd.providers import build_provider

    named = args.pid if args.pid is not None else os.environ.get("MAINPID", "")
    if not named:
        _problem("voxd: reload: no --pid given and no $MAINPID (systemd sets it for ExecReload=)")
        return 2
    if not named.isdigit() or int(named) <= 1:
        _problem(f"voxd: reload: {'--pid' if args.pid is not None else '$MAINPID'} is not a "
                 f"process id: {named!r}")
        return 2
    pid = int(named)
    environ = _reload_environ(pid)
    try:
        settings = load_settings(resolve_config_path(args.config), environ)
        build_provider(settings)  # the checks the running voxd applies to the new file
    except ConfigError as exc:
        for problem in exc.problems:
            _problem(f"voxd: reload refused, voxd keeps its running config: {problem}")
        return 2
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        _problem(f"voxd: reload: no process {pid}")
        return 1
    except PermissionError:
        _problem(f"voxd: reload: not allowed to signal process {pid}")
        return 1
    print(f"{summary(settings)}; sent SIGHUP to process {pid} (server.listen, "
          "server.metrics_listen and server.workers keep their running values until a "
          "restart: the journal says when one of them changed)", flush=True)
    return 0


def _reload_environ(pid: int) -> dict[str, str]:
    """The environment to check the new file in: with the secrets the running voxd sees.

    systemd (252 at least) does not mount a service's credentials for ExecReload= when the
    service has its own mount namespace (systemd issue #35227): $CREDENTIALS_DIRECTORY is set
    but cannot be read there. The running voxd's directory can be, through /proc/PID/root,
    unless PrivateUsers= (as in the shipped unit) puts each process in a user namespace of its
    own. Failing both, every secret counts as given: the file's own checks are made here, and
    voxd checks the secrets it needs on SIGHUP, refusing the file with a log line if one is
    missing (credentials do not change on reload: they are loaded when the service starts)."""
    from voxd.config import SECRET_SOURCES

    env = dict(os.environ)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if not creds:
        return env
    for seen in (f"/proc/{pid}/root{creds}", creds):
        if os.access(seen, os.R_OK | os.X_OK):
            return {**env, "CREDENTIALS_DIRECTORY": seen}
    _problem(f"voxd: reload: the service's credentials ({creds}) are not readable here: the "
             "file is checked as if every secret were set; voxd checks the secrets itself",
             logging.INFO)
    env.pop("CREDENTIALS_DIRECTORY")
    return {**env, **{var: env.get(var) or "unseen" for var in SECRET_SOURCES.values()}}


def _serve(args: argparse.Namespace) -> int:
    from voxd.providers import build_provider
    from voxd.server import run_daemon

    settings = load_settings(resolve_config_path(args.config))
    build_provider(settings)  # fail now, with the config key, not on the first call
    configure_logging(settings.config.logging.level)
    log.info("voxd %s starting: %s", __version__, summary(settings))
    if not settings.config.twilio.validate_signatures:
        log.warning("twilio.validate_signatures is false: ANYONE who can reach %s can place "
                    "calls through this daemon. Use this only for local testing.",
                    settings.config.server.public_url)
    try:
        if settings.config.server.workers > 1:
            from voxd.supervisor import run_workers

            return trio.run(run_workers, settings)
        trio.run(run_daemon, settings)
    except OSError as exc:
        _problem(f"voxd: server.listen: cannot listen on {settings.config.server.listen}: "
                 f"{exc.strerror or exc}")
        return 1
    return 0


def _call(args: argparse.Namespace) -> int:
    from voxd.sim.commands import call_command

    return call_command(args)


def _demo(args: argparse.Namespace) -> int:
    from voxd.sim.commands import demo_command

    return demo_command(args)


def _loadtest(args: argparse.Namespace) -> int:
    from voxd.sim.load_command import loadtest_command

    return loadtest_command(args)


def _echo_upstream(args: argparse.Namespace) -> int:
    from voxd.config import parse_listen
    from voxd.sim.echo_upstream import serve_echo
    from voxd.sim.interrupt import serve_until_stopped

    if args.protocol != "websocket":
        if args.listen is not None:
            print("voxd: --listen applies to --protocol websocket only (a simulated vendor "
                  "picks free loopback ports and prints them)", file=sys.stderr)
            return 2
        return _vendor_echo(args.protocol, args.audio)
    args.listen = args.listen or "127.0.0.1:9100"
    try:
        parse_listen(args.listen)
    except ValueError as exc:
        print(f"voxd: --listen: {exc}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.reply_after_ms) and args.reply_after_ms >= 0):
        print(f"voxd: --reply-after-ms: must be >= 0, got {args.reply_after_ms:g}",
              file=sys.stderr)
        return 2
    configure_logging("info")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_echo, args.listen,
                                               reply_after=args.reply_after_ms / 1000))
            host = args.listen.rpartition(":")[0]
            print(f"echo upstream on ws://{host}:{port}/ (set websocket.url to it)", flush=True)

    try:
        return serve_until_stopped(serve)
    except OSError as exc:
        print(f"voxd: --listen: cannot listen on {args.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1


def _vendor_echo(protocol: str, audio: str) -> int:
    """`voxd echo-upstream --protocol VENDOR`: that vendor's simulator, echoing, until stopped;
    prints the voxd config and secrets (environment variables) that point at it, as JSON."""
    import json

    from voxd.config import SECRET_SOURCES
    from voxd.sim.interrupt import serve_until_stopped
    from voxd.sim.vendors import SIMULATORS, serve_echo_simulator

    configure_logging("warning")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            sim = await nursery.start(serve_echo_simulator, protocol, audio)
            sections = {"assistant": {"provider": protocol, "audio": audio}, **sim.sections()}
            env = {SECRET_SOURCES[name]: value for name, value in sim.secrets.items()}
            print(f"{SIMULATORS[protocol][2]} simulator (echo), {audio}", flush=True)
            print(f"config: {json.dumps(sections)}", flush=True)
            print(f"secrets: {json.dumps(env)}", flush=True)

    return serve_until_stopped(run)

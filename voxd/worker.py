"""One worker process of `server.workers > 1`: `python -m voxd.worker --config PATH`.

`voxd.supervisor` starts these (never a person): each serves on the socket the supervisor
bound and passed down (`voxd.worker_env`). The service's start is announced once, by the
supervisor (`voxd serve`'s "starting" line and the config's warnings); a worker says only what
is its own, every line with `worker=N`.

A worker runs in a session of its own, so a terminal's Ctrl-C reaches only the supervisor, which
passes one SIGTERM on; and it drains and exits by itself if the supervisor is gone (killed with
SIGKILL, say), so no orphan is left serving the port.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import trio

from voxd.config import Settings, load_settings
from voxd.errors import EXIT_INTERRUPTED, ConfigError, VoxdError, is_interrupt
from voxd.observability.logging import configure_logging, stderr_problem
from voxd.worker_env import supervisor_lifeline

log = logging.getLogger("voxd.worker")


def main(argv: list[str]) -> int:
    """Serve as a worker until told to stop; the exit code (2: the config no longer loads)."""
    from voxd.providers import build_provider

    if len(argv) != 2 or argv[0] != "--config":
        print(stderr_problem("voxd.worker: started by voxd serve (server.workers > 1), as "
                             "python -m voxd.worker --config PATH"), file=sys.stderr)
        return 2
    try:
        # Read again here: a worker restarted after a crash takes the file as it is now.
        settings = load_settings(Path(argv[1]))
        build_provider(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(stderr_problem(f"voxd: {problem}"), file=sys.stderr, flush=True)
        return 2
    except VoxdError as exc:
        print(stderr_problem(f"voxd: {exc}"), file=sys.stderr, flush=True)
        return 1
    configure_logging(settings.config.logging.level)
    try:
        trio.run(_serve, settings)
    except OSError as exc:  # the inherited socket is unusable, or the metrics one cannot bind
        print(stderr_problem(f"voxd: cannot serve: {exc.strerror or exc}", logging.ERROR),
              file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        # A SIGINT sent to the worker itself (the supervisor passes SIGTERM) before trio's
        # receiver was up or after it closed; inside nurseries it arrives as a group.
        if not is_interrupt(exc):
            raise
        print(stderr_problem("voxd: interrupted", logging.INFO), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


async def _serve(settings: Settings) -> None:
    """`voxd serve`'s serving part, drained (as by SIGTERM) if the supervisor goes away."""
    from voxd.server import run_daemon

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_when_orphaned)
            await run_daemon(settings)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # run_daemon's own error (an OSError: main says it)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _drain_when_orphaned() -> None:
    """Wait for the supervisor's end of the lifeline to close, then SIGTERM this worker: its
    live calls drain (up to drain.timeout_seconds) and it exits, releasing the port."""
    fd = supervisor_lifeline()
    if fd is None:
        return
    try:
        await trio.lowlevel.wait_readable(fd)  # the supervisor never writes: end-of-file
    except OSError as exc:  # not a descriptor this process can wait on: serve without it
        log.warning("no lifeline to the supervisor (descriptor %d: %s): a worker left behind "
                    "by a killed supervisor will not notice", fd, exc.strerror or exc)
        return
    log.warning("the supervisor (voxd serve) is gone: draining and exiting")
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""One worker process of `server.workers > 1`: `python -m voxd.worker --config PATH`.

`voxd.supervisor` starts these (never a person): each serves on the socket the supervisor
bound and passed down (`voxd.worker_env`). The service's start is announced once, by the
supervisor (`voxd serve`'s "starting" line and the config's warnings); a worker says only what
is its own, every line with `worker=N`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

from voxd.config import load_settings
from voxd.errors import ConfigError, VoxdError
from voxd.observability.logging import configure_logging, stderr_problem


def main(argv: list[str]) -> int:
    """Serve as a worker until told to stop; the exit code (2: the config no longer loads)."""
    from voxd.providers import build_provider
    from voxd.server import run_daemon

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
        trio.run(run_daemon, settings)
    except OSError as exc:  # the inherited socket is unusable, or the metrics one cannot bind
        print(stderr_problem(f"voxd: cannot serve: {exc.strerror or exc}", logging.ERROR),
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before trio's own handler was in place
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""What the supervisor (`voxd.supervisor`, `server.workers > 1`) hands each worker process
through its environment, and how a worker picks it up."""

from __future__ import annotations

import os
import socket
from typing import Final

FD_ENV: Final = "VOXD_WORKER_FD"
"""The public listening socket's descriptor."""
METRICS_FD_ENV: Final = "VOXD_WORKER_METRICS_FD"
"""`server.metrics_listen`'s listening socket's descriptor."""
TOKENS_ENV: Final = "VOXD_WORKER_TOKENS"
"""The directory where the workers share used stream tokens (`voxd.shared_state`)."""
INDEX_ENV: Final = "VOXD_WORKER"
"""This worker's index (its presence marks a worker)."""
LIFELINE_ENV: Final = "VOXD_WORKER_LIFELINE_FD"
"""The read end of a pipe whose write end only the supervisor holds: it reads as end-of-file
once the supervisor is gone, however it went (SIGKILL included)."""


def inherited_listener(name: str = FD_ENV) -> socket.socket | None:
    """In a worker: the listening socket the supervisor passed down in `name` (the public
    one, or METRICS_FD_ENV's); None otherwise."""
    fd = os.environ.get(name)
    if not fd or os.environ.get(INDEX_ENV) is None:
        return None
    return socket.socket(fileno=int(fd))


def supervisor_lifeline() -> int | None:
    """In a worker: the descriptor that becomes readable (end-of-file) when the supervisor is
    gone; None when there is none (not a worker, or a supervisor that passed none)."""
    fd = os.environ.get(LIFELINE_ENV, "")
    return int(fd) if fd.isdigit() and os.environ.get(INDEX_ENV) is not None else None


def shared_tokens_directory() -> str | None:
    """In a worker: the directory the workers share used stream tokens in."""
    return os.environ.get(TOKENS_ENV) if os.environ.get(INDEX_ENV) is not None else None


def worker_number() -> int | None:
    """In a worker: its number as logs show it, 1 to server.workers (`worker=N`); None in the
    main process and with server.workers = 1."""
    index = os.environ.get(INDEX_ENV)
    return int(index) + 1 if index is not None and index.isdigit() else None

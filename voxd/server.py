"""Running the daemon: the listening socket, Hypercorn (trio), and signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
from dataclasses import replace

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from voxd.app import Runtime, create_app
from voxd.config import Settings, parse_listen

log = logging.getLogger("voxd.server")

SHUTDOWN_GRACE_SECONDS = 2.0


def open_listener(listen: str) -> socket.socket:
    """Bind and listen on `host:port` (port 0 picks a free one); raises OSError if it can't."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def bound_origin(sock: socket.socket) -> str:
    """`http://host:port` of a listening socket (for a port chosen by the kernel)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def with_public_url(settings: Settings, public_url: str) -> Settings:
    """The same settings with another `server.public_url` (used for kernel-chosen ports)."""
    server = settings.config.server.model_copy(update={"public_url": public_url})
    return replace(settings, config=settings.config.model_copy(update={"server": server}))


def hypercorn_config(settings: Settings, sock: socket.socket) -> HypercornConfig:
    """Hypercorn's settings derived from voxd's."""
    config = HypercornConfig()
    # Hypercorn takes ownership of an fd:// socket and closes it: give it its own copy.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    # voxd's own check (call.max_message_bytes) names the problem in the call's log line;
    # Hypercorn's, above it, bounds what is buffered before that check can run.
    config.websocket_max_message_size = 2 * settings.config.call.max_message_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = SHUTDOWN_GRACE_SECONDS
    config.keep_alive_timeout = 75  # longer than Twilio's HTTP client keeps connections idle
    return config


async def serve(
    settings: Settings,
    sock: socket.socket,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve voxd on an already-listening socket until `shutdown` is set (or cancelled)."""
    runtime = Runtime.from_settings(settings)
    app = create_app(lambda: runtime)
    stop = shutdown if shutdown is not None else trio.Event()

    try:
        async with trio.open_nursery() as nursery:

            async def hypercorn(task_status: trio.TaskStatus[None]) -> None:
                await hypercorn_serve(app, hypercorn_config(settings, sock),  # type: ignore[arg-type]
                                      shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # served its last connection: end background work

            runtime.background = nursery
            await nursery.start(hypercorn)
            log.info("listening on %s (public URL %s)", bound_origin(sock),
                     settings.config.server.public_url)
            task_status.started(runtime)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await runtime.provider.aclose()


async def run_daemon(settings: Settings) -> None:
    """`voxd serve`: listen, serve, and stop cleanly on SIGTERM or SIGINT."""
    sock = open_listener(settings.config.server.listen)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            await serve(settings, sock, shutdown=shutdown)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    log.info("stopped")


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()

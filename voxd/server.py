"""Running the daemon: the listening socket, Hypercorn (trio), and signals."""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig

from voxd.background import Background
from voxd.call.recording import sweep
from voxd.config import (
    Settings,
    config_warnings,
    load_settings,
    parse_listen,
    plural,
    scrub_environment,
    summary,
)
from voxd.errors import ConfigError, VoxdError
from voxd.media import MediaEndpoint
from voxd.net.front import NOT_FOUND, ConnectionLimits, FrontDoor
from voxd.net.http import HttpServer
from voxd.net.stream import DirectStream
from voxd.observability import metrics
from voxd.observability.logging import configure_logging
from voxd.observability.systemd import Notifier
from voxd.observability.throttled import throttle_logger
from voxd.routes import create_app, create_metrics_app
from voxd.runtime import LiveCalls, Runtime
from voxd.shared_state import RedisState, after_stream_store, answered_by_store, token_ledger
from voxd.worker_env import (
    METRICS_FD_ENV,
    inherited_listener,
    shared_tokens_directory,
    worker_number,
)

SWEEP_SECONDS = 3600.0
"""How often old recordings are looked for."""
ACTION_GRACE_SECONDS = 1.0
"""How long a drained server still answers `<Connect action>` requests (without REST)."""

log = logging.getLogger("voxd.server")

SHUTDOWN_GRACE_SECONDS = 2.0

RESTART_ONLY = ("listen", "metrics_listen", "workers")
"""`[server]` keys a reload cannot change (the sockets are bound, the workers started): a new
value is reported and the running one kept until a restart."""


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


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn's settings derived from voxd's."""
    config = HypercornConfig()
    # voxd's own check (call.max_message_bytes) names the problem in the call's log line;
    # Hypercorn's, above it, bounds what is buffered before that check can run.
    config.websocket_max_message_size = 2 * settings.config.call.max_message_bytes
    config.accesslog = None
    config.include_server_header = False  # no stack name on the public port
    config.errorlog = logging.getLogger("hypercorn.error")
    throttle_logger(config.errorlog)  # what it logs can be a peer's doing: throttled
    config.graceful_timeout = SHUTDOWN_GRACE_SECONDS
    # Every answer says Connection: close: nothing is kept alive, and an idle wait must not
    # hold a connection's slot (Hypercorn keeps it after answering a malformed request 400).
    config.keep_alive_timeout = settings.config.server.handshake_timeout
    # The front door bounds the wait for a connection's first request; this bounds each read
    # after it (a later request sent byte by byte).
    config.read_timeout = int(settings.config.server.handshake_timeout * 4)
    return config


async def serve(
    settings: Settings,
    sock: socket.socket,
    *,
    shutdown: trio.Event | None = None,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve voxd on an already-listening socket until `shutdown` is set (or cancelled); opens
    `server.metrics_listen` itself when it is set."""
    metrics_listen = settings.config.server.metrics_listen
    metrics_sock = open_listener(metrics_listen) if metrics_listen else None
    try:
        server = Server(settings, sock, notifier or Notifier({}), metrics_sock)
        await server.run(shutdown if shutdown is not None else trio.Event(),
                         task_status=task_status)
    finally:
        if metrics_sock is not None:
            metrics_sock.close()


class Server:
    """One voxd process: the front door, the media endpoint and Hypercorn serving the HTTP app,
    plus draining, reloading, and telling systemd how it is doing.

    Its nursery holds only what cannot fail on a peer's account: every connection runs behind
    the front door's boundary, every call behind its session's, and work that outlives a
    request behind `Background`'s."""

    def __init__(self, settings: Settings, sock: socket.socket, notifier: Notifier,
                 metrics_sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.metrics_sock = metrics_sock
        """Where /metrics is served instead of the public port (server.metrics_listen)."""
        self.notifier = notifier
        self.shared = RedisState(settings.redis_url) if settings.redis_url else None
        directory = shared_tokens_directory()
        self.live = LiveCalls(on_change=self._calls_changed, shared=self.shared,
                              used_tokens=token_ledger(self.shared, directory),
                              after=after_stream_store(self.shared, directory),
                              answered=answered_by_store(self.shared, directory))
        self.background = Background()
        self.runtime = Runtime.from_settings(settings, self.live, self.background)
        self._runtimes = [self.runtime]
        """Runtimes whose provider may still need closing at the stop."""
        self.app = create_app(lambda: self.runtime, metrics_here=metrics_sock is None)
        self.media = MediaEndpoint(lambda: self.runtime)
        self._stop = trio.Event()

    def _status(self) -> str:
        state = "draining" if self.live.draining else "ready"
        return f"{state}, {plural(len(self.live), 'active call')}"

    def _calls_changed(self, live: LiveCalls) -> None:
        self.notifier.status(self._status())
        self._show_readiness()

    def _show_readiness(self) -> None:
        """voxd_ready (what /readyz answers) and voxd_calls_max (this worker's limit): set on
        each call's start and end, the drain and a reload, never per frame."""
        metrics.CALLS_MAX.set(self.runtime.settings.config.call.max_concurrent_calls)
        metrics.READY.set(0 if self.runtime.not_ready() else 1)

    def _limits(self) -> ConnectionLimits:
        server = self.runtime.settings.config.server
        return ConnectionLimits(server.handshake_timeout, server.max_connections,
                                server.max_connections_per_address, server.ipv6_prefix_length)

    async def run(self, shutdown: trio.Event,
                  task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown` is set (then stop at once) or `drain()` has finished. On the
        stop, accepting ends at once; open connections get SHUTDOWN_GRACE_SECONDS."""
        settings = self.runtime.settings
        http = HttpServer(self.app, hypercorn_config(settings))
        front = FrontDoor(self._limits, self.media, http.handle)
        metrics_http = (HttpServer(create_metrics_app(), hypercorn_config(settings))
                        if self.metrics_sock is not None else None)

        async def stop_on(event: trio.Event) -> None:
            await event.wait()
            self._stop.set()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.background.run)
                await nursery.start(http.run, self._stop)
                if metrics_http is not None:
                    await nursery.start(metrics_http.run, self._stop)
                nursery.start_soon(stop_on, shutdown)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:
                        await accepting.start(front.serve, self.sock, connections)
                        if metrics_http is not None and self.metrics_sock is not None:
                            metrics_door = FrontDoor(self._limits, no_media, metrics_http.handle)
                            await accepting.start(metrics_door.serve, self.metrics_sock,
                                                  connections)
                            log.info("serving /metrics on %s", bound_origin(self.metrics_sock))
                        log.info("listening on %s (public URL %s)", bound_origin(self.sock),
                                 settings.config.server.public_url)
                        metrics.WORKERS.set(1)
                        self._show_readiness()
                        self.notifier.ready(self._status())
                        self.background.start("the systemd watchdog", "", self.notifier.watchdog)
                        self.background.start("removing old recordings", "",
                                              self._sweep_recordings)
                        if metrics.MULTIPROCESS:
                            self.background.start("sampling process metrics", "",
                                                  metrics.sample_process_forever)
                        task_status.started(self.runtime)
                        await self._stop.wait()
                        accepting.cancel_scope.cancel()
                    connections.cancel_scope.deadline = (trio.current_time()
                                                         + SHUTDOWN_GRACE_SECONDS)
                nursery.cancel_scope.cancel()
        finally:
            metrics.READY.set(0)
            metrics.WORKERS.set(0)
            for runtime in self._runtimes:
                if not runtime.closed:
                    await runtime.aclose()
            if self.shared is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self.shared.aclose()

    async def _sweep_recordings(self) -> None:
        """Delete recordings past recording.keep_days, now and every hour (the current
        config's directory and retention; nothing when recording is off)."""
        while True:
            recording = self.runtime.settings.config.recording
            if recording.enabled and recording.keep_days > 0:
                removed = await trio.to_thread.run_sync(
                    sweep, Path(recording.directory), recording.keep_days, time.time())
                if removed:
                    log.info("removed %d recording file(s) older than %g days", removed,
                             recording.keep_days)
            await trio.sleep(SWEEP_SECONDS)

    async def drain(self) -> None:
        """SIGTERM: take no new calls (webhooks get the fallback, /readyz 503), let live calls
        finish for up to drain.timeout_seconds, end the rest cleanly, then stop."""
        timeout = self.runtime.settings.config.drain.timeout_seconds
        self.live.draining = True
        self._show_readiness()
        log.info("draining: %s; no new calls; waiting up to %.0fs for them to end",
                 plural(len(self.live), "active call"), timeout)
        self.notifier.stopping(self._status())
        with trio.move_on_after(timeout):
            await self.live.wait_idle()
        if self.live.sessions:
            log.warning("drain timeout: ending %s (the callers hear the fallback)",
                        plural(len(self.live), "call"))
            for session in list(self.live.sessions):
                session.shutdown("drain-timeout")
            with trio.move_on_after(5):
                await self.live.wait_idle()
        phone = self.runtime.phone
        if phone is not None and not phone.rest:
            # Without REST, Twilio asks /twilio/stream-ended what follows a call right after
            # its stream closed (tens of ms): answer those of the last calls before going.
            await trio.sleep_until(self.live.last_ended + ACTION_GRACE_SECONDS)
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; new calls use it, live calls keep theirs. An invalid
        config is refused with one log line, and the running one stays."""
        old = self.runtime
        source = old.settings.source
        if source is None:
            log.error("reload refused: voxd was not started from a config file")
            return
        try:
            # What the scrubbed environment no longer holds, and a generated stream secret
            # (tokens already given out stay valid), carry over from the running config.
            settings = load_settings(source, secrets_before=old.settings.secrets)
            settings, ignored = keep_restart_only(settings, old.settings)
            runtime = Runtime.from_settings(settings, self.live, self.background)
        except ConfigError as exc:
            # Each problem names its key, or the file when the file itself is the problem.
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return
        except VoxdError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        for line in ignored:
            log.warning("%s", line)
        if settings.redis_url != old.settings.redis_url:
            log.warning("the shared state's Redis changed: that takes a restart; still using "
                        "the one voxd started with")
        known = config_warnings(old.settings)  # said at the start or the last reload
        for warning in config_warnings(settings):
            if warning not in known:
                log.warning("%s", warning)
        self.runtime = runtime
        self._show_readiness()
        self._runtimes = [r for r in self._runtimes if not r.closed] + [runtime]
        old.retire()  # its provider closes when its last call and background task end
        configure_logging(settings.config.logging.level)
        log.info("reloaded %s: %s", source, summary(settings))
        self.notifier.status(self._status())


def keep_restart_only(new: Settings, running: Settings) -> tuple[Settings, list[str]]:
    """`new` with the RESTART_ONLY keys' running values, and one line for each that the new
    file changes ("server.listen change ignored until restart: ..."), so what a reload reports
    and applies is what is in effect."""
    now, wanted = running.config.server, new.config.server
    changed = [key for key in RESTART_ONLY if getattr(wanted, key) != getattr(now, key)]
    if not changed:
        return new, []
    metrics_on = now.metrics_listen or "the public port"
    in_effect = {"listen": f"still listening on {now.listen}",
                 "metrics_listen": f"still serving /metrics on {metrics_on}",
                 "workers": f"still {plural(now.workers, 'worker')}"}
    said = {key: str(getattr(wanted, key)) or '""' for key in changed}
    lines = [f"server.{key} change ignored until restart: {in_effect[key]} (the file now says "
             f"{said[key]})" for key in changed]
    server = wanted.model_copy(update={key: getattr(now, key) for key in changed})
    return replace(new, config=new.config.model_copy(update={"server": server})), lines


async def no_media(stream: DirectStream, data: bytes, peer: str) -> None:
    """The metrics address has no media endpoint."""
    await stream.send_all(NOT_FOUND)


async def run_daemon(settings: Settings) -> None:
    """`voxd serve`: listen, serve; SIGTERM or SIGINT drains (a second one stops at once),
    SIGHUP reloads."""
    scrub_environment()  # read already; no child process or dump gets them
    if worker_number() is None:  # with workers, the supervisor warns once for all of them
        for warning in config_warnings(settings):
            log.warning("%s", warning)
    sock = inherited_listener() or open_listener(settings.config.server.listen)
    metrics_listen = settings.config.server.metrics_listen
    try:
        metrics_sock = (inherited_listener(METRICS_FD_ENV) or open_listener(metrics_listen)
                        if metrics_listen else None)
    except OSError:
        sock.close()
        raise
    notifier = Notifier()
    server = Server(settings, sock, notifier, metrics_sock)
    now = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, server, now, nursery)
            await server.run(now)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
    notifier.stopping("stopped")
    log.info("stopped")


async def _watch_signals(server: Server, now: trio.Event, nursery: trio.Nursery) -> None:
    draining = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading %s",
                         server.runtime.settings.source or "the config")
                Background.call_quietly("reloading the config", "", server.reload)
            elif not draining:
                draining = True
                log.info("%s received: draining (send it again to stop at once)", name)
                nursery.start_soon(server.drain)
            else:
                log.info("%s received again: stopping now", name)
                now.set()

"""`server.workers = N`: N worker processes sharing one listening socket, supervised here.

Each worker is a `voxd.worker` process (one trio loop, one core: `voxd serve`'s serving part)
started on the socket this process bound, so the kernel spreads new connections over them.
This process:
- announces the service once (`voxd serve`'s "starting" line, the config's warnings, "ready"
  when every worker is), while each worker's own lines carry `worker=N` (N = 1..workers, as
  in this process's "worker N started" lines);
- is the one systemd talks to: it gives the workers its own notify socket, sends READY=1 once
  every worker is ready, sums their "N active calls" into one STATUS, and passes WATCHDOG=1
  on only while every worker keeps pinging (a stalled worker loop gets the service restarted);
- passes SIGTERM/SIGINT on as one SIGTERM to each worker (each drains its own calls), and
  SIGHUP (each reloads);
- restarts a worker that dies while not stopping;
- gives the workers one PROMETHEUS_MULTIPROC_DIR, so /metrics adds up all of them.
Hypercorn's own multi-worker mode is not used: it has no drain and no sd_notify of its own.

Stopping: a worker given SIGTERM twice stops at once (live calls cut), so each must get exactly
one. The workers run in sessions of their own: a terminal's Ctrl-C (SIGINT to the foreground
process group) reaches only this process. The units say KillMode=mixed: systemd signals only
this process, and SIGKILLs the rest only at TimeoutStopSec. With KillMode=control-group (an
older unit; `kill -TERM -- -PGID` is the same) every worker gets systemd's SIGTERM too: this
process waits FORWARD_GRACE for the workers to say they are draining (STOPPING=1) and passes it
on only to those that did not. A worker that ends by a signal while the service stops has
stopped, not failed: the exit code is 0 after a clean drain, 1 if a worker failed. The workers
hold the read end of a pipe only this process writes to (`LIFELINE_ENV`): if this process dies
(SIGKILL), they see end-of-file and drain, so none is left serving the port.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from voxd.config import SECRET_SOURCES, Settings, config_warnings, plural, scrub_environment
from voxd.errors import is_interrupt
from voxd.observability.systemd import Notifier
from voxd.server import open_listener
from voxd.worker_env import FD_ENV, INDEX_ENV, LIFELINE_ENV, METRICS_FD_ENV, TOKENS_ENV

log = logging.getLogger("voxd.supervisor")

RESTART_DELAY = 1.0
FORWARD_GRACE = 0.5
"""Seconds to wait, after SIGTERM or SIGINT, for workers that got the signal themselves (systemd's
KillMode=control-group signals every process) to report STOPPING=1 before passing it on."""
STOPPED_BY = (0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT)
"""A worker's exit codes that, while the service stops, mean it stopped: a clean drain, or a
signal that ended it before its drain began (still starting) or after it ended."""


@dataclass
class Worker:
    """One worker process and what it last told us."""

    index: int
    """0..workers-1, as the worker's environment (INDEX_ENV) and sd_notify tag carry it."""
    process: trio.Process | None = None
    ready: bool = False
    draining: bool = False
    """It said STOPPING=1: it got SIGTERM/SIGINT (from us, or from systemd directly)."""
    calls: int = 0
    last_ping: float = field(default=0.0)

    @property
    def number(self) -> int:
        """The worker's number in logs: 1..workers (its lines say `worker=N`)."""
        return self.index + 1


async def run_workers(settings: Settings) -> int:
    """Run `server.workers` workers until they have all stopped; the exit code."""
    count = settings.config.server.workers
    assert settings.source is not None
    for warning in config_warnings(settings):
        log.warning("%s", warning)
    sock = open_listener(settings.config.server.listen)
    os.set_inheritable(sock.fileno(), True)
    metrics_listen = settings.config.server.metrics_listen
    metrics_sock = open_listener(metrics_listen) if metrics_listen else None
    inherited: tuple[int, ...] = (sock.fileno(),) if metrics_sock is None else (sock.fileno(),
                                                                metrics_sock.fileno())
    notifier = Notifier()
    scratch = Path(tempfile.mkdtemp(prefix="voxd-"))
    (scratch / "metrics").mkdir()
    (scratch / "tokens").mkdir()  # stream tokens used by any worker (voxd.shared_state)
    inbox = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await inbox.bind(str(scratch / "notify"))
    workers = [Worker(i) for i in range(count)]
    stopping = trio.Event()
    draining = trio.Event()  # every running worker said STOPPING=1
    lifeline, held = os.pipe()  # both close-on-exec: only `lifeline` is passed, `held` never
    inherited += (lifeline,)
    env = {**os.environ, FD_ENV: str(sock.fileno()), LIFELINE_ENV: str(lifeline),
           **({METRICS_FD_ENV: str(metrics_sock.fileno())} if metrics_sock else {}),
           "PROMETHEUS_MULTIPROC_DIR": str(scratch / "metrics"),
           "NOTIFY_SOCKET": str(scratch / "notify"), TOKENS_ENV: str(scratch / "tokens")}
    if notifier.watchdog_interval is not None:
        env["WATCHDOG_USEC"] = str(int(notifier.watchdog_interval * 1e6))  # ping us twice as often
    env.pop("WATCHDOG_PID", None)
    # The workers get the secrets this process read (and then removed from its environment);
    # one stream secret for all of them, so each verifies the others' tokens.
    for name, variable in SECRET_SOURCES.items():
        secret = getattr(settings.secrets, name)
        if secret is not None:
            env[variable] = secret.reveal()
    scrub_environment()
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_listen, inbox, workers, notifier, stopping, draining,
                                   settings.config.server.public_url)
                await nursery.start(_forward_signals, workers, stopping, draining, notifier)
                nursery.start_soon(_watchdog, workers, notifier)
                async with trio.open_nursery() as keepers:
                    for worker in workers:
                        keepers.start_soon(_keep, worker, settings, env, inherited, stopping)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            # A SIGINT still queued when the signal receiver closed is raised again as a
            # KeyboardInterrupt (inside the nurseries, as a group): after a stop in which every
            # worker has exited it changes nothing; else it is the command line's Ctrl-C (a
            # plain KeyboardInterrupt: "voxd: interrupted", exit 130).
            if not is_interrupt(exc):
                raise
            if not stopping.is_set() or _running(workers):
                raise KeyboardInterrupt from None
    finally:
        os.close(held)
        os.close(lifeline)
        inbox.close()
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [w.number for w in workers
              if w.process is not None and w.process.returncode not in STOPPED_BY]
    notifier.stopping("stopped")
    if failed:
        log.error("all %d workers stopped; %s failed", count,
                  ("worker " if len(failed) == 1 else "workers ") + ", ".join(map(str, failed)))
        return 1
    log.info("all %d workers stopped", count)
    return 0


async def _keep(worker: Worker, settings: Settings, env: dict[str, str],
                fds: tuple[int, ...], stopping: trio.Event) -> None:
    """Run one worker; start it again if it dies while the service is not stopping."""
    from prometheus_client import multiprocess

    command = [sys.executable, "-m", "voxd.worker", "--config", str(settings.source)]
    while True:
        worker.ready = worker.draining = False
        # A session of its own: a terminal's Ctrl-C is for this process, which passes it on.
        worker.process = await trio.lowlevel.open_process(
            command, env={**env, INDEX_ENV: str(worker.index)}, pass_fds=fds,
            start_new_session=True)
        log.info("worker %d started (pid %d)", worker.number, worker.process.pid)
        code = await worker.process.wait()
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            worker.process.pid, env["PROMETHEUS_MULTIPROC_DIR"])
        if stopping.is_set():
            if code in STOPPED_BY:
                log.info("worker %d stopped (%s)", worker.number, _exit(code))
            else:
                log.error("worker %d (pid %d) failed while stopping (%s)", worker.number,
                          worker.process.pid, _exit(code))
            return
        log.error("worker %d (pid %d) exited unexpectedly (%s); starting it again",
                  worker.number, worker.process.pid, _exit(code))
        await trio.sleep(RESTART_DELAY)


def _exit(code: int) -> str:
    """A worker's exit as its log line says it: "exit 0", "SIGTERM"."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


async def _listen(inbox: trio.socket.SocketType, workers: list[Worker], notifier: Notifier,
                  stopping: trio.Event, draining: trio.Event, public_url: str) -> None:
    """Read the workers' sd_notify messages and speak for all of them to systemd."""
    announced = False
    while True:
        data = await inbox.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        index = fields.get(INDEX_ENV)
        if index is None or not index.isdigit() or int(index) >= len(workers):
            continue
        worker = workers[int(index)]
        if fields.get("WATCHDOG") == "1":
            worker.last_ping = trio.current_time()
        if fields.get("READY") == "1":
            worker.ready = True
        if fields.get("STOPPING") == "1":
            worker.draining = True
            if all(w.draining for w in _running(workers)):
                draining.set()
        match = re.search(r"(\d+) active call", fields.get("STATUS", ""))
        if match:
            worker.calls = int(match.group(1))
        if not announced and all(w.ready for w in workers):
            announced = True
            log.info("ready: %d workers serving %s", len(workers), public_url)
            notifier.ready(_status(workers, stopping))
        elif "STATUS" in fields and announced:
            notifier.status(_status(workers, stopping))


def _status(workers: list[Worker], stopping: trio.Event) -> str:
    calls = sum(w.calls for w in workers)
    state = "draining" if stopping.is_set() else "ready"
    return f"{state}, {plural(calls, 'active call')} ({len(workers)} workers)"


async def _forward_signals(workers: list[Worker], stopping: trio.Event, draining: trio.Event,
                           notifier: Notifier,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGHUP to every worker; the first SIGTERM/SIGINT as one SIGTERM to every worker that did
    not get it itself (each drains); a second one to all of them (they stop at once)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: passing it to the %d workers", len(workers))
                _send(workers, signal.SIGHUP)
                continue
            if stopping.is_set():
                log.info("%s received again: the workers stop at once", name)
                _send(workers, signal.SIGTERM)
                continue
            stopping.set()
            log.info("%s received: the %d workers drain their calls", name, len(workers))
            notifier.stopping(_status(workers, stopping))
            with trio.move_on_after(FORWARD_GRACE):  # those signalled by systemd directly
                await draining.wait()
            had = [w.number for w in _running(workers) if w.draining]
            if had:
                log.info("%s %s got the signal directly (KillMode=control-group?): not "
                         "signalled again", "worker" if len(had) == 1 else "workers",
                         ", ".join(map(str, had)))
            _send([w for w in workers if not w.draining], signal.SIGTERM)


def _running(workers: list[Worker]) -> list[Worker]:
    return [w for w in workers if w.process is not None and w.process.returncode is None]


def _send(workers: list[Worker], signum: signal.Signals) -> None:
    for worker in _running(workers):
        worker.process.send_signal(signum)  # type: ignore[union-attr]


async def _watchdog(workers: list[Worker], notifier: Notifier) -> None:
    """WATCHDOG=1 to systemd only while every worker pinged within the interval."""
    interval = notifier.watchdog_interval
    if interval is None:
        await trio.sleep_forever()
    assert interval is not None
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        if all(now - w.last_ping <= 2 * interval for w in workers):
            notifier.notify("WATCHDOG=1")
        else:
            stale = [w.number for w in workers if now - w.last_ping > 2 * interval]
            log.warning("%s stopped pinging: withholding the watchdog",
                        ("worker " if len(stale) == 1 else "workers ")
                        + ", ".join(map(str, stale)))

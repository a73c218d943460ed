"""Chaos: minutes of concurrent calls through a real `voxd serve` while the Twilio side and the
assistants misbehave at random, then check that nothing one call did reached the daemon or
another call.

Run: .venv/bin/python bench/chaos.py [--minutes 10] [--calls 50] [--workers 2] [--seed 1]
                                     [--provider websocket|vapi|mixed] [--audio pcm16|mulaw]

voxd runs as its own process (config in a temporary directory; signatures and stream tokens on,
as in production); the fake Twilio side and the fake assistants (tests/fakes/chaos.py) run in
this process, all on 127.0.0.1. Each call follows a plan drawn from --seed: a good call, or a
Twilio side that hangs up before the stream, at the 101, mid-turn or without `stop`, drops,
resets, stalls, floods or sends garbage; an assistant that refuses, closes or resets at any
moment (at the 101, right after `end-call`), stalls, floods or sends garbage; a Vapi
create-call that fails, 429s or times out. SIGHUP reloads arrive at random times (with
`mixed`, each switches the provider between `websocket` and `vapi`).

At the end it prints a table of checks and exits 1 if any failed: the daemon (and each worker)
is the same process it was; every call that reached the media endpoint has exactly one
`call ended:` line; the log has no traceback and no internal error; each worker's RSS, open
descriptors and trio tasks are back at their baseline; good calls completed and lost no frame;
no call failed by one side was blamed on the other; every Vapi call created was ended.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.chaos import (
    FORGED_FROM,
    CallerRecord,
    ChaosAssistant,
    ChaosCaller,
    ChaosVapi,
    Plan,
    make_plan,
)
from voxd.sim.load import free_port, process_tree, speech_ulaw

EARLY_CLAIM_SECONDS = 30.0
"""voxd ends an early-created Vapi call nobody claimed after this long (voxd.providers.vapi)."""
TWILIO_BLAME = ("twilio-silent", "twilio-stalled", "caller-disconnected", "protocol-error")
ASSISTANT_BLAME = ("upstream",)


@dataclass
class Options:
    minutes: float = 10.0
    calls: int = 50
    """Concurrent calls."""
    workers: int = 2
    seed: int = 1
    provider: str = "mixed"
    audio: str = "pcm16"
    good_share: float = 0.35
    sighup_every: float = 8.0
    """Mean seconds between reloads (0: none)."""
    max_calls: int = 100_000
    rss_slack_mb: float = 40.0
    log_copy: Path | None = None
    quiet: bool = False


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    options: Options
    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 10
        out = list(self.lines)
        out.append("")
        out.append(f"{'check':{width}}  result  detail")
        for c in self.checks:
            out.append(f"{c.name:{width}}  {'ok' if c.ok else 'FAIL':6}  {c.detail}")
        out.append("")
        out.append("chaos: all checks passed" if not self.failed else
                   f"chaos: FAILED: {', '.join(self.failed)}")
        return "\n".join(out)


# -- voxd in its own process --------------------------------------------------------------------


class Daemon:
    """`voxd serve` with a generated config in `home`, its stderr in home/voxd.log."""

    def __init__(self, options: Options, home: Path, assistant_url: str, vapi_url: str,
                 provider: str) -> None:
        self.options = options
        self.home = home
        port = free_port()
        self.origin = f"http://127.0.0.1:{port}"
        self.token = secrets.token_hex(16)
        self.assistant_url = assistant_url
        self.vapi_url = vapi_url
        self.config = home / "voxd.toml"
        self.log_path = home / "voxd.log"
        self.write_config(provider)
        env = {**os.environ, "VOXD_TWILIO_AUTH_TOKEN": self.token,
               "VAPI_API_KEY": "vapi-test-key", "TMPDIR": str(home)}
        for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                     "JOURNAL_STREAM", "VOXD_STREAM_SECRET", "VOXD_WORKER", "VOXD_WORKER_FD"):
            env.pop(name, None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voxd", "serve", "--config", str(self.config)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def webhook_url(self) -> str:
        return self.origin + "/twilio/voice"

    def write_config(self, provider: str) -> None:
        o = self.options
        limit = 6 * o.calls + 200
        sections = {
            "server": {"listen": self.origin.split("//")[1], "public_url": self.origin,
                       "workers": o.workers, "max_connections": limit,
                       "max_connections_per_address": limit},
            "twilio": {"validate_signatures": True},
            "assistant": {"provider": provider, "audio": o.audio},
            "websocket": {"url": self.assistant_url},
            "vapi": {"base_url": self.vapi_url, "assistant_id": "chaos-assistant",
                     "early_start": True},
            "call": {"max_concurrent_calls": 2 * o.calls + 50, "stream_token": True},
            # The fakes echo the caller back at once: that is not the caller barging in.
            "barge_in": {"local_vad": False},
            "logging": {"level": "info"},
        }
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                               for k, v in values.items())
                       for name, values in sections.items())
        partial = self.config.with_suffix(".new")
        partial.write_text(text)
        partial.replace(self.config)  # a reload never reads half a file

    def reload(self, provider: str) -> None:
        self.write_config(provider)
        self.proc.send_signal(signal.SIGHUP)

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"voxd serve exited with {self.proc.returncode}: "
                                       f"{self.log_tail()}")
                try:
                    if (await client.get(self.origin + "/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.05)
        raise RuntimeError(f"voxd did not become ready within 15 s: {self.log_tail()}")

    def worker_pids(self) -> list[int]:
        tree = process_tree(self.proc.pid)
        return sorted(tree[1:]) if self.options.workers > 1 else [self.proc.pid]

    def tasks(self, client_text: str | None) -> dict[int, float]:
        """Trio tasks per worker: from the workers' multiprocess metric files (each writes its
        own every second), or /metrics with one process."""
        if self.options.workers == 1:
            found = re.search(r"^voxd_trio_tasks (\S+)$", client_text or "", re.M)
            return {self.proc.pid: float(found.group(1))} if found else {}
        from prometheus_client.mmap_dict import MmapedDict

        tasks: dict[int, float] = {}
        for path in self.home.glob("voxd-*/metrics/gauge_livesum_*.db"):
            pid = int(path.stem.rsplit("_", 1)[1])
            for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
                if json.loads(key)[0] == "voxd_trio_tasks":
                    tasks[pid] = value
        return tasks

    def all_workers_called(self) -> bool:
        """Every worker has counted a call (its counter file exists)."""
        return all(list(self.home.glob(f"voxd-*/metrics/counter_{pid}.db"))
                   for pid in self.worker_pids())

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM (drain), then wait; kill what does not stop within 20 s. The exit code."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        else:
            code = self.proc.returncode
        self._log.close()
        return code


@dataclass
class Usage:
    rss: float
    fds: int
    tasks: float | None
    kinds: Counter[str] = field(default_factory=Counter)
    """What the descriptors are (sockets with their TCP state and peer port)."""


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def tcp_sockets() -> dict[str, str]:
    """Socket inode -> "tcp STATE local:port->remote:port" (IPv4 loopback is all we use)."""
    found = {}
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            f = row.split()
            local, remote = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
            found[f[9]] = f"tcp {TCP_STATES.get(f[3], f[3])} :{local}->:{remote}"
    return found


def fd_kinds(pid: int, sockets: dict[str, str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    target = sockets.get(target[8:-1], "socket (not tcp4)")
                elif target.startswith("/"):
                    target = "file " + target.rsplit("/", 1)[-1]
                kinds[re.sub(r"\[\d+\]", "", target)] += 1
    return kinds


def usage(pid: int, tasks: dict[int, float]) -> Usage | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return Usage(rss, fds, tasks.get(pid), fd_kinds(pid, tcp_sockets()))


async def sample(daemon: Daemon, client: httpx.AsyncClient) -> tuple[dict[int, Usage], str]:
    """Each worker's figures, and the /metrics text. The scrape comes first and the per-worker
    figures 1.2 s later: by then each worker has written its task count again (every second)
    with no scrape in progress, and the scrape's own connection is closed."""
    text = ""
    with contextlib.suppress(httpx.HTTPError):
        text = (await client.get(daemon.origin + "/metrics")).text
    await trio.sleep(1.2)
    tasks = daemon.tasks(text)
    found = {pid: usage(pid, tasks) for pid in daemon.worker_pids()}
    return {pid: u for pid, u in found.items() if u is not None}, text


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# -- the run ------------------------------------------------------------------------------------


async def run_chaos(options: Options) -> Report:
    """Run the chaos as `options` say and check the daemon afterwards."""
    report = Report(options)
    rng = random.Random(options.seed)
    reload_rng = random.Random(options.seed + 1)
    vapi_used = options.provider in ("vapi", "mixed")
    plans: dict[str, Plan] = {}
    callers: list[ChaosCaller] = []
    ulaw = speech_ulaw(8.0, seed=options.seed)
    payloads = [base64.b64encode(ulaw[i:i + 160]).decode() for i in range(0, len(ulaw), 160)]
    assistant = ChaosAssistant(plans, options.seed + 2, audio=options.audio)
    vapi = ChaosVapi(plans)
    home = Path(tempfile.mkdtemp(prefix="voxd-chaos-"))
    providers = ["websocket", "vapi"] if options.provider == "mixed" else [options.provider]
    provider = reload_rng.choice(providers)
    reloads: list[str] = []
    progress = (lambda text: None) if options.quiet else (
        lambda text: print(text, file=sys.stderr, flush=True))
    async with trio.open_nursery() as fakes:
        await fakes.start(assistant.serve)
        await fakes.start(vapi.serve)
        # Started with the websocket provider for the warm-up: early-created Vapi calls of
        # warm-up calls would linger EARLY_CLAIM_SECONDS and inflate the baseline.
        daemon = Daemon(options, home, assistant.url, vapi.base_url, "websocket")
        stopped: int | None = None
        try:
            await daemon.ready()
            report.log_path = daemon.log_path
            limits = httpx.Limits(max_connections=options.calls * 2 + 10)
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                # Warm-up (first-use allocations, metric files), then the baseline.
                warm: list[ChaosCaller] = []
                for _ in range(5):  # until every worker has carried a call
                    batch = [ChaosCaller(daemon.webhook_url, daemon.token,
                                         Plan(f"CA{len(warm) + i:032x}", seconds=1.0), payloads)
                             for i in range(2 * options.workers)]
                    warm += batch
                    async with trio.open_nursery() as nursery:
                        for caller in batch:
                            nursery.start_soon(caller.run, client)
                    await trio.sleep(0.5)
                    if options.workers == 1 or daemon.all_workers_called():
                        break
                await trio.sleep(1.0)
                pids = daemon.worker_pids()
                base, _ = await sample(daemon, client)
                if provider != "websocket":
                    reloads.append(provider)
                    daemon.reload(provider)
                started = trio.current_time()
                end = started + options.minutes * 60
                last_webhook = started
                progress(f"chaos: voxd pid {daemon.proc.pid}, workers {pids}, {options.calls} "
                         f"calls at a time for {options.minutes:g} min, seed {options.seed}, "
                         f"provider {options.provider} (now {provider}); log {daemon.log_path}")

                async def slot() -> None:
                    nonlocal last_webhook
                    while trio.current_time() < end and len(callers) < options.max_calls:
                        plan = make_plan(rng, options.good_share, vapi_used)
                        plans[plan.call_sid] = plan
                        caller = ChaosCaller(daemon.webhook_url, daemon.token, plan, payloads)
                        callers.append(caller)
                        last_webhook = trio.current_time()
                        await caller.run(client)

                async def reloader() -> None:
                    nonlocal provider
                    if options.sighup_every <= 0:
                        return
                    while True:
                        await trio.sleep(reload_rng.expovariate(1 / options.sighup_every))
                        if trio.current_time() >= end:
                            return
                        provider = reload_rng.choice(providers)
                        reloads.append(provider)
                        daemon.reload(provider)

                async def watch() -> None:
                    while True:
                        await trio.sleep(10)
                        done = sum(c.record.done for c in callers)
                        progress(f"[{trio.current_time() - started:5.0f}s] calls placed "
                                 f"{len(callers)}, done {done}, reloads {len(reloads)}, voxd "
                                 f"{'alive' if daemon.proc.poll() is None else 'DEAD'}")

                async with trio.open_nursery() as run:
                    run.start_soon(watch)
                    run.start_soon(reloader)
                    async with trio.open_nursery() as slots:
                        for i in range(options.calls):
                            slots.start_soon(slot)
                            await trio.sleep(min(0.05, 2.0 / options.calls) * (i < options.calls))
                    run.cancel_scope.cancel()
                chaos_seconds = trio.current_time() - started
                if vapi_used:
                    # Back to the warm-up's provider: the retired Vapi providers must close their
                    # HTTP pools once their calls and early starts are over, so descriptors come
                    # back to the baseline exactly.
                    reloads.append("websocket")
                    daemon.reload("websocket")
                progress(f"chaos: {len(callers)} calls in {chaos_seconds:.0f} s; waiting for "
                         "voxd to settle")
                # Settle: unclaimed early Vapi calls are ended EARLY_CLAIM_SECONDS after their
                # webhook; everything else within a few seconds of the last call.
                deadline = max(trio.current_time() + 5, last_webhook + 8 +
                               (EARLY_CLAIM_SECONDS + 5 if vapi_used else 0))
                allowance = 0
                peak: dict[int, float] = {}
                while True:
                    after, text = await sample(daemon, client)
                    for pid, u in after.items():
                        peak[pid] = max(peak.get(pid, 0), u.rss)
                    settled = all(
                        pid in after and after[pid].fds <= base[pid].fds + allowance
                        and (after[pid].tasks or 0) <= (base[pid].tasks or 0) for pid in base
                    ) and metric_sum(text, "voxd_calls_active") == 0 and all(
                        vapi.connect_attempts.get(cid) for cid in vapi.calls)
                    if settled or trio.current_time() >= deadline or daemon.proc.poll() is not None:
                        break
                    await trio.sleep(1.0)
                pids_after = daemon.worker_pids() if daemon.proc.poll() is None else []
                alive = daemon.proc.poll() is None
        finally:
            stopped = daemon.stop()
            fakes.cancel_scope.cancel()
    log = daemon.log_path.read_text(errors="replace")
    if options.log_copy is not None:
        options.log_copy.write_text(log)
        report.log_path = options.log_copy
        shutil.rmtree(home, ignore_errors=True)
    judge(report, options, callers, assistant, vapi, log, base, after, peak, text, pids,
          pids_after, alive, stopped, allowance, reloads, chaos_seconds)
    return report


def judge(report: Report, options: Options, callers: list[ChaosCaller],
          assistant: ChaosAssistant, vapi: ChaosVapi, log: str, base: dict[int, Usage],
          after: dict[int, Usage], peak: dict[int, float], metrics_text: str, pids: list[int],
          pids_after: list[int], alive: bool, stopped: int | None, allowance: int,
          reloads: list[str], chaos_seconds: float) -> None:
    records: list[CallerRecord] = [c.record for c in callers]
    ended: dict[str, list[str]] = {}
    anonymous = 0
    for line in log.splitlines():
        if " call ended: " not in line:
            continue
        sid = re.search(r"call_sid=(\S+)", line)
        reason = re.search(r"reason=(.+)$", line)
        key = sid.group(1) if sid else "-"
        if key.startswith("CA0000000000000000"):  # the warm-up's
            continue
        if key == "-":
            anonymous += 1
        else:
            ended.setdefault(key, []).append(reason.group(1) if reason else "?")
    started_sids = {sid for sid in re.findall(r"call_sid=(\S+) \S+ call started:", log)
                    if not sid.startswith("CA0000000000000000")}
    add = report.checks.append
    lines = report.lines
    by_twilio = Counter(r.plan.twilio for r in records)
    by_assistant = Counter(r.plan.assistant for r in records)
    by_create = Counter(r.plan.create for r in records)
    reasons = Counter(reason for rs in ended.values() for reason in rs)
    good = [r for r in records if r.plan.good]
    lines.append(f"chaos: seed {options.seed}, {options.calls} concurrent calls, "
                 f"{options.workers} workers, provider {options.provider}, audio "
                 f"{options.audio}, {chaos_seconds:.0f} s, {len(records)} calls "
                 f"({len(good)} good), {len(reloads)} reloads")
    lines.append("twilio side:  " + ", ".join(f"{k} {v}" for k, v in by_twilio.most_common()))
    lines.append("assistant:    " + ", ".join(f"{k} {v}" for k, v in by_assistant.most_common())
                 + f"; connection-level faults {assistant.connection_faults}")
    lines.append("vapi create:  " + ", ".join(f"{k} {v}" for k, v in by_create.most_common()))
    longest = sorted(records, key=lambda r: -r.seconds)[:3]
    lines.append("longest calls: " + "; ".join(
        f"{r.plan.call_sid} {r.seconds:.0f} s (twilio {r.plan.twilio}, assistant "
        f"{r.plan.assistant}, create {r.plan.create})" for r in longest))
    lines.append("voxd reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
                 + f", (no call_sid) {anonymous}")

    # 1. the daemon is the same processes
    restarts = [line for line in log.splitlines() if "exited unexpectedly" in line]
    add(Check("daemon alive", alive and pids_after == pids and not restarts,
              f"pids {pids} -> {pids_after or 'dead'}" + (f"; {restarts[0].strip()}"
                                                          if restarts else "")))

    # 2. exactly one summary per call that reached the media endpoint
    twice = {sid: rs for sid, rs in ended.items() if len(rs) > 1}
    certain = {r.plan.call_sid for r in records if r.got_101 and r.start_sent and r.start_held}
    certain |= started_sids
    missing = sorted(sid for sid in certain if sid not in ended)
    reached = sum(r.got_101 for r in records)
    tried = sum(r.upgrade_sent for r in records)
    total = sum(len(rs) for rs in ended.values()) + anonymous
    counted = metric_sum(metrics_text, "voxd_calls_total")
    problems = []
    if twice:
        problems.append(f"{len(twice)} calls with several summaries, e.g. "
                        f"{next(iter(twice.items()))}")
    if missing:
        problems.append(f"{len(missing)} calls without a summary, e.g. {missing[:3]}")
    if not reached <= total <= tried:
        problems.append(f"{total} summaries for {reached} streams opened ({tried} upgrades)")
    add(Check("one summary per call", not problems,
              "; ".join(problems) or f"{total} summaries for {reached} streams opened "
              f"({len(certain)} with a known start); voxd_calls_total {counted:.0f} (with the "
              f"warm-up's)"))

    # 3. a clean log
    tracebacks = log.count("Traceback")
    internal = [line for line in log.splitlines() if "internal error" in line.lower()]
    first = ""
    if tracebacks:  # the first exception line of a traceback (its own line, not a log line)
        found = re.search(r"^[ |+]*((?!ExceptionGroup)[A-Za-z_][\w.]*(?:Error|Exception|Closed|"
                          r"Timeout|Exit)\w*: .*)$", log, re.M)
        first = found.group(1)[:200] if found else ""
    add(Check("no traceback", not tracebacks and not internal,
              f"{tracebacks} tracebacks, {len(internal)} internal errors"
              + (f"; first: {first}" if first else "")
              + (f"; {internal[0].strip()[:200]}" if internal else "")))

    # 4. resources back at baseline, per worker
    slack = options.rss_slack_mb * 2**20
    rows, bad = [], []
    for i, pid in enumerate(pids):
        b, a = base.get(pid), after.get(pid)
        if b is None or a is None:
            bad.append(f"worker {pid} gone")
            continue
        tasks_ok = a.tasks is not None and b.tasks is not None and a.tasks <= b.tasks
        if a.rss > b.rss + slack or a.fds > b.fds + allowance or not tasks_ok:
            bad.append(f"worker {pid}")
            extra = a.kinds - b.kinds
            if extra:
                rows.append(f"worker {i} (pid {pid}) descriptors not at baseline: "
                            + ", ".join(f"{k} x{v}" for k, v in extra.most_common(8)))
        rows.append(f"worker {i} (pid {pid}): RSS {b.rss / 2**20:.1f} -> {a.rss / 2**20:.1f} MB "
                    f"(peak {peak.get(pid, 0) / 2**20:.1f}), fds {b.fds} -> {a.fds}, trio tasks "
                    f"{b.tasks} -> {a.tasks}")
    active = metric_sum(metrics_text, "voxd_calls_active")
    lines.extend(rows)
    add(Check("back at baseline", not bad and active == 0,
              (f"{', '.join(bad)} above baseline (RSS slack {options.rss_slack_mb:g} MB, fds "
               f"+{allowance}); " if bad else "")
              + f"calls active {active:.0f}; see the rows above"))

    # 5. good calls completed without losing a frame. The websocket fake's faults before the
    # 101 hit whichever call connects (its upgrade does not name the call): a call whose start
    # never reached a fake and that ended upstream-error is excused, as many as there were.
    hit = [r for r in records if r.plan.call_sid not in assistant.records
           and r.plan.call_sid not in vapi.records and r.plan.create == "ok"
           and any(x.startswith("upstream") for x in ended.get(r.plan.call_sid, []))]
    hit = hit[:assistant.connection_faults]
    hit_sids = {r.plan.call_sid for r in hit}
    judged = [r for r in good if r.plan.call_sid not in hit_sids]
    failed_good = [r for r in judged if r.error or not r.stop_sent or r.lost
                   or ended.get(r.plan.call_sid) != ["caller-hangup"]]
    sent = sum(r.frames_sent for r in judged)
    lost = sum(r.lost for r in judged)
    example = ""
    if failed_good:
        r = failed_good[0]
        example = (f"; e.g. {r.plan.call_sid}: error {r.error or '-'}, stop sent {r.stop_sent}, "
                   f"lost {r.lost}/{r.frames_sent}, voxd {ended.get(r.plan.call_sid)}")
    add(Check("good calls complete", bool(judged) and not failed_good,
              f"{len(judged)} good calls ({len(good) - len(judged)} more hit by "
              f"connection-level assistant faults), {len(failed_good)} failed; frames sent "
              f"{sent}, lost {lost}{example}"))

    # 6. the cause is named: one side's failure is never blamed on the other
    blamed = []
    for r in records:
        reasons_of = ended.get(r.plan.call_sid, [])
        assistant_only = r.plan.twilio == "good" and (r.plan.assistant != "good"
                                                      or r.plan.create != "ok")
        twilio_only = (r.plan.twilio != "good" and r.plan.assistant == "good"
                       and r.plan.create == "ok")
        for reason in reasons_of:
            if assistant_only and reason.startswith(TWILIO_BLAME):
                blamed.append(f"{r.plan.call_sid} assistant {r.plan.assistant}/"
                              f"{r.plan.create} ended as {reason}")
            if twilio_only and reason.startswith(ASSISTANT_BLAME) and \
                    r.plan.call_sid not in hit_sids:
                blamed.append(f"{r.plan.call_sid} twilio {r.plan.twilio} ended as {reason}")
    add(Check("right side blamed", not blamed,
              f"{len(blamed)} calls blamed on the wrong side" +
              (f", e.g. {'; '.join(blamed[:3])}" if blamed else "")))

    # 7. every Vapi call created was ended (or at least contacted to end it)
    if vapi.calls:
        never = [cid for cid in vapi.calls if not vapi.connect_attempts.get(cid)]
        many = {sid: ids for sid, ids in vapi.created_for.items() if len(ids) > options.workers}
        add(Check("vapi calls ended", not never and not many,
                  f"{len(vapi.calls)} Vapi calls created, {len(never)} never connected to (left "
                  f"running at Vapi)" + (f", e.g. for {vapi.sid_of[never[0]]}" if never else "")
                  + f"; phone calls with more than {options.workers} Vapi calls: {len(many)}"))

    # 8. forged stream parameters never reach the assistant
    forged = [sid for sid, rec in assistant.records.items()
              if rec.start.get("from") == FORGED_FROM]
    forged += [c.body.get("metadata", {}).get("twilioCallSid", "?") for c in vapi.calls.values()
               if c.body.get("metadata", {}).get("from") == FORGED_FROM]
    add(Check("forged parameters refused", not forged,
              f"{len(forged)} forged caller numbers reached the assistant"
              + (f", e.g. {forged[0]}" if forged else "")))

    # 9. it still stops cleanly
    add(Check("clean stop", stopped == 0, f"exit code {stopped} after SIGTERM"))


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=50, help="concurrent calls")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--provider", choices=("websocket", "vapi", "mixed"), default="mixed")
    parser.add_argument("--audio", choices=("pcm16", "mulaw"), default="pcm16")
    parser.add_argument("--good-share", type=float, default=0.35)
    parser.add_argument("--sighup-every", type=float, default=8.0,
                        help="mean seconds between reloads (0: none)")
    parser.add_argument("--max-calls", type=int, default=100_000)
    parser.add_argument("--rss-slack-mb", type=float, default=40.0)
    parser.add_argument("--log", type=Path, help="keep voxd's log here")
    args = parser.parse_args(argv)
    return Options(minutes=args.minutes, calls=args.calls, workers=args.workers, seed=args.seed,
                   provider=args.provider, audio=args.audio, good_share=args.good_share,
                   sighup_every=args.sighup_every, max_calls=args.max_calls,
                   rss_slack_mb=args.rss_slack_mb, log_copy=args.log)


def main() -> int:
    options = parse_args()
    started = time.monotonic()
    report = trio.run(run_chaos, options)
    print(report.render())
    print(f"(wall time {time.monotonic() - started:.0f} s; voxd's log: {report.log_path})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

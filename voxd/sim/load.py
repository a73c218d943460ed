"""`voxd loadtest`: many concurrent simulated calls, paced in real time like Twilio.

Each call POSTs the voice webhook (signed when a token is given), follows the TwiML to the
media stream, streams speech-like audio in 20 ms frames and echoes marks back at once. Against
an upstream that echoes audio (the `echo-upstream` process this module can start), every frame
a call sends comes back: the load test counts what is lost and times each frame's round trip.
voxd's own CPU and memory come from its /metrics (`voxd_process_*`, summed over workers).

Without a webhook URL the load test starts its own echo upstream and `voxd serve` (each in its
own process, so neither's cost is counted as the other's) and stops them at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import trio
from twilio.request_validator import RequestValidator

from voxd.audio.g711 import pcm16_to_ulaw
from voxd.errors import VoxdError
from voxd.net.websocket import ConnectionClosed, HandshakeError, WebSocket, connect
from voxd.sim.caller import parse_twiml

FRAME = 0.020
TURN_HOLD_MS = 400
"""With --turns, the echo answers this long after the caller stops (part of the turn latency,
not voxd's)."""
SETTLE_SECONDS = 0.3
"""After its last frame a call waits this long for the echoes still on their way, then hangs
up (so a frame not back by then counts as lost)."""


class LoadTestError(VoxdError):
    """The load test could not run (voxd or the upstream unreachable, a bad URL)."""


def speech_ulaw(seconds: float, seed: int = 7, pauses: bool = True) -> bytes:
    """Speech-like mu-law audio at about -20 dBFS: syllable-shaped noise, in 1.2 s bursts with
    0.8 s pauses (or without pauses)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 8000)
    x = np.convolve(rng.standard_normal(n), np.hanning(9) / 4.5, mode="same")
    t = np.arange(n) / 8000
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    if pauses:
        x *= (t % 2.0) < 1.2
    x = x / max(1e-9, float(np.max(np.abs(x)))) * 0.3 * 32767
    return pcm16_to_ulaw(x.astype("<i2").tobytes())


def speech_frames(seconds: float, seed: int = 7) -> list[bytes]:
    """`speech_ulaw` (with pauses) in whole 20 ms frames."""
    ulaw = speech_ulaw(seconds, seed)
    return [ulaw[i:i + 160] for i in range(0, len(ulaw) - 159, 160)]


@dataclass
class CallResult:
    """One call's figures."""

    sent_at: list[float] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    voxd_latencies: list[float] = field(default_factory=list)
    teardown: float | None = None
    """Seconds from `stop` sent to voxd closing the socket."""
    error: str = ""

    @property
    def lost(self) -> int:
        return max(0, len(self.sent_at) - len(self.received_at))

    def round_trips(self) -> list[float]:
        return [r - s for s, r in zip(self.sent_at, self.received_at, strict=False)]


class LoadCall:
    """One simulated call (webhook, stream, paced frames, marks echoed)."""

    def __init__(self, webhook_url: str, frames: list[bytes], auth_token: str | None) -> None:
        self.webhook_url = webhook_url
        self.payloads = [base64.b64encode(f).decode() for f in frames]
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.call_sid = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.result = CallResult()
        self.live = False
        self.closed = trio.Event()
        """voxd closed the stream."""

    def _sign(self, url: str, params: dict[str, str]) -> dict[str, str]:
        if self.validator is None:
            return {}
        return {"X-Twilio-Signature": self.validator.compute_signature(url, params)}

    async def run(self, client: httpx.AsyncClient) -> None:
        try:
            await self._run(client)
        except (ConnectionClosed, HandshakeError, OSError, httpx.HTTPError, VoxdError) as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.live = False

    async def _run(self, client: httpx.AsyncClient) -> None:
        form = {"CallSid": self.call_sid, "AccountSid": "AC" + "0" * 32, "From": "+15005550006",
                "To": "+15005550001", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
                "Direction": "inbound"}
        response = await client.post(self.webhook_url, data=form,
                                     headers=self._sign(self.webhook_url, form))
        if response.status_code != 200:
            raise LoadTestError(f"webhook answered HTTP {response.status_code}")
        stream = parse_twiml(response.text)
        ws = await connect(stream.url, list(self._sign(stream.url, {}).items()))
        try:
            sid = self.stream_sid
            await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            await ws.send(json.dumps({"event": "start", "streamSid": sid, "start": {
                "streamSid": sid, "callSid": self.call_sid, "accountSid": "AC" + "0" * 32,
                "tracks": ["inbound"], "customParameters": stream.parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                "channels": 1}}}))
            self.live = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, ws)
                await self._send_frames(ws)
                await trio.sleep(SETTLE_SECONDS)
                await ws.send(f'{{"event":"stop","streamSid":"{sid}"}}')
                stopped = trio.current_time()
                with trio.move_on_after(5):
                    await self.closed.wait()
                if self.closed.is_set():
                    self.result.teardown = trio.current_time() - stopped
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1):
                await ws.close()

    async def _send_frames(self, ws: WebSocket) -> None:
        prefix = f'{{"event":"media","streamSid":"{self.stream_sid}","media":{{"track":"inbound",'
        sent_at = self.result.sent_at
        start = trio.current_time()
        for i, payload in enumerate(self.payloads):
            await trio.sleep_until(start + (i + 1) * FRAME)
            sent_at.append(trio.current_time())
            await ws.send(f'{prefix}"chunk":"{i + 1}","timestamp":"{i * 20}",'
                          f'"payload":"{payload}"}}}}')

    async def _receive(self, ws: WebSocket) -> None:
        received_at = self.result.received_at
        try:
            while True:
                message = await ws.receive()
                if '"media"' in message[:20]:
                    received_at.append(trio.current_time())
                elif '"mark"' in message[:20]:
                    mark = json.loads(message)
                    name = mark["mark"]["name"]
                    if found := re.search(r"latency_ms=(\d+)", name):
                        self.result.voxd_latencies.append(int(found.group(1)) / 1000)
                    await ws.send(json.dumps({"event": "mark", "streamSid": self.stream_sid,
                                              "mark": {"name": name}}))
        except ConnectionClosed:
            self.closed.set()


async def place_calls(calls: list[LoadCall], concurrency: int) -> None:
    """Run `calls`, at most `concurrency` at a time (soaks: many short calls in a row)."""
    limit = trio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
        for call in calls:
            await limit.acquire()

            async def one(call: LoadCall = call) -> None:
                try:
                    await call.run(client)
                finally:
                    limit.release()

            nursery.start_soon(one)


# -- voxd's own figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSample:
    at: float
    cpu_seconds: float
    rss_bytes: float


async def sample_daemon(client: httpx.AsyncClient, metrics_url: str) -> DaemonSample | None:
    """voxd's CPU time and RSS (summed over its workers), from its /metrics."""
    try:
        text = (await client.get(metrics_url)).text
    except httpx.HTTPError:
        return None
    values = {}
    for name in ("voxd_process_cpu_seconds", "voxd_process_resident_memory_bytes"):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        if found is None:
            return None
        values[name] = float(found.group(1))
    return DaemonSample(trio.current_time(), values["voxd_process_cpu_seconds"],
                        values["voxd_process_resident_memory_bytes"])


@dataclass
class LoadReport:
    calls: int
    seconds: float
    results: list[CallResult]
    cpu_cores: float | None = None
    """voxd's CPU over the steady window, in cores (1.0 = one core)."""
    rss_per_call: float | None = None
    idle_rss: float | None = None
    turns: bool = False
    """The upstream answered turns (only speech comes back, later: no round trips or losses)."""

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.results)

    @property
    def sent(self) -> int:
        return sum(len(r.sent_at) for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error]

    def percentile(self, values: list[float], p: float) -> float:
        return float(np.percentile(values, p)) * 1000 if values else float("nan")

    def figures(self) -> dict[str, float]:
        trips = [t for r in self.results for t in r.round_trips()]
        latencies = [t for r in self.results for t in r.voxd_latencies]
        teardowns = [r.teardown for r in self.results if r.teardown is not None]
        return {
            "cpu_per_call_pct": (self.cpu_cores / self.calls * 100
                                 if self.cpu_cores is not None else float("nan")),
            "rss_per_call_kb": (self.rss_per_call / 1024
                                if self.rss_per_call is not None else float("nan")),
            "rtt_p50_ms": self.percentile(trips, 50),
            "rtt_p99_ms": self.percentile(trips, 99),
            "turn_p50_ms": self.percentile(latencies, 50),
            "turn_p95_ms": self.percentile(latencies, 95),
            "teardown_max_ms": max(teardowns) * 1000 if teardowns else float("nan"),
        }

    def render(self) -> str:
        f = self.figures()
        frames = (f"frames sent {self.sent}, lost {self.lost}" if not self.turns else
                  f"frames sent {self.sent} (the echo answers turns: losses not counted)")
        lines = [
            f"calls {self.calls} x {self.seconds:.0f}s; {frames}; calls failed "
            f"{len(self.errors)}",
            f"voxd CPU per call      {f['cpu_per_call_pct']:.2f}% of one core "
            f"(voxd total {self.cpu_cores or float('nan'):.2f} cores)",
            f"voxd RSS per call      {f['rss_per_call_kb']:.0f} kB "
            f"(idle {(self.idle_rss or float('nan')) / 2**20:.1f} MB)",
            (f"frame round trip       p50 {f['rtt_p50_ms']:.1f} ms, p99 {f['rtt_p99_ms']:.1f} ms "
             "(Twilio -> voxd -> echo -> voxd -> Twilio; one way through voxd is at most half)"
             if not self.turns else
             "frame round trip       not measured with --turns (the echo holds each turn)"),
            (f"turn latency (voxd's)  p50 {f['turn_p50_ms']:.0f} ms, p95 {f['turn_p95_ms']:.0f} ms"
             f"{f' (the echo waits {TURN_HOLD_MS} ms of it)' if self.turns else ''}"
             if f["turn_p50_ms"] == f["turn_p50_ms"] else  # not NaN
             "turn latency (voxd's)  no turns: a passthrough echo talks continuously "
             "(run with --turns)"),
            f"teardown after stop    max {f['teardown_max_ms']:.0f} ms",
        ]
        lines += [f"  error: {e}" for e in sorted(set(self.errors))[:5]]
        return "\n".join(lines)


Sampler = Callable[[], Awaitable[DaemonSample | None]]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (a voxd supervisor and its workers), from /proc."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    todo.extend(int(c) for c in children.read().split())
        except OSError:
            pass
    return pids


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (/proc/<pid>/stat; never blocks)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_sampler(pid: int) -> Sampler:
    """CPU and RSS of process `pid` and its children (workers), read from /proc: for a
    bridge that has no voxd metrics (bench/peer_bridge.py), or to check them."""
    page = os.sysconf("SC_PAGE_SIZE")

    def read() -> tuple[float, float]:  # /proc reads never block
        cpu = rss = 0.0
        for p in process_tree(pid):
            try:
                cpu += process_cpu_seconds(p)
                with open(f"/proc/{p}/statm") as statm:
                    rss += int(statm.read().split()[1]) * page
            except OSError:
                continue
        return cpu, rss

    async def sample() -> DaemonSample | None:
        await trio.lowlevel.checkpoint()
        cpu, rss = read()
        return DaemonSample(trio.current_time(), cpu, rss)

    return sample


async def run_load(webhook_url: str, calls: int, seconds: float, *,
                   auth_token: str | None = None, ramp_seconds: float | None = None,
                   progress: Callable[[str], None] | None = None,
                   sampler: Sampler | None = None, turns: bool = False) -> LoadReport:
    """Place `calls` concurrent calls of `seconds` each (started evenly over `ramp_seconds`)
    and measure them, and the bridge (voxd's /metrics, or `sampler`) over the window when all
    of them are up."""
    origin = webhook_url.split("/twilio/")[0]
    metrics_url = origin + "/metrics"
    ramp = ramp_seconds if ramp_seconds is not None else min(5.0, calls * 0.05)
    if seconds < ramp + 4:
        raise LoadTestError(f"--seconds must be at least {ramp + 4:.0f} (the {ramp:.0f}s ramp "
                            "plus a steady window)")
    frames = speech_frames(seconds)
    load = [LoadCall(webhook_url, frames, auth_token) for _ in range(calls)]
    report = LoadReport(calls, seconds, [c.result for c in load], turns=turns)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        def default_sampler() -> Awaitable[DaemonSample | None]:
            return sample_daemon(client, metrics_url)

        sample_bridge = sampler or default_sampler
        idle = await sample_bridge()
        report.idle_rss = idle.rss_bytes if idle else None
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                steady_from = started + ramp + 1.0
                steady_to = started + ramp + seconds - 1.0
                first = last = None
                while trio.current_time() < started + ramp + seconds + 2:
                    await trio.sleep(1.0)
                    now = trio.current_time()
                    sample = await sample_bridge()
                    if sample is not None and steady_from <= now <= steady_to:
                        first = first or sample
                        last = sample
                    if progress is not None:
                        up = sum(c.live for c in load)
                        got = sum(len(c.result.received_at) for c in load)
                        sent = sum(len(c.result.sent_at) for c in load)
                        cpu = ""
                        if first is not None and last is not None and last.at > first.at:
                            cores = (last.cpu_seconds - first.cpu_seconds) / (last.at - first.at)
                            cpu = f", voxd {cores * 100:.0f}% of a core"
                        progress(f"[{now - started:5.1f}s] {up}/{calls} calls up, frames "
                                 f"sent {sent} back {got}, failed "
                                 f"{sum(bool(c.result.error) for c in load)}{cpu}")
                if first is not None and last is not None and last.at > first.at:
                    report.cpu_cores = ((last.cpu_seconds - first.cpu_seconds)
                                        / (last.at - first.at))
                    if idle is not None:
                        report.rss_per_call = (last.rss_bytes - idle.rss_bytes) / calls

            nursery.start_soon(watch)
            for i, call in enumerate(load):
                nursery.start_soon(call.run, client)
                await trio.sleep_until(started + ramp * (i + 1) / calls)
    return report


# -- starting voxd and an echo upstream for a self-contained run ------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VoxdProcess:
    """`voxd serve` on a free loopback port with a generated config, in its own process.
    `sections` are voxd.toml's tables; `server.listen` and `server.public_url` are filled in."""

    def __init__(self, sections: dict[str, dict[str, object]],
                 env: dict[str, str] | None = None, quiet: bool = False) -> None:
        port = free_port()
        self.origin = f"http://127.0.0.1:{port}"
        server = {"listen": f"127.0.0.1:{port}", "public_url": self.origin}
        # No real Twilio REST API behind a simulated call: calls end through <Connect action>.
        twilio = {"rest_call_control": False, **sections.get("twilio", {})}
        sections = {**sections, "server": {**server, **sections.get("server", {})},
                    "twilio": twilio}
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                                 values.items()) for name, values in
                       sections.items())
        fd, path = tempfile.mkstemp(suffix=".toml")
        os.write(fd, text.encode())
        os.close(fd)
        self.config = Path(path)
        self.proc = subprocess.Popen([sys.executable, "-m", "voxd", "serve", "--config", path],
                                     env={**os.environ, **(env or {})},
                                     stderr=subprocess.DEVNULL if quiet else None)

    @property
    def webhook_url(self) -> str:
        return self.origin + "/twilio/voice"

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise LoadTestError(f"voxd serve exited with {self.proc.returncode}")
                try:
                    if (await client.get(self.origin + "/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.05)
        raise LoadTestError("voxd did not become ready within 15 s")

    def stop(self) -> None:
        stop_processes([self.proc])
        self.config.unlink(missing_ok=True)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate, then wait (killing what does not stop within 10 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_echo(reply_after_ms: float = 0) -> tuple[int, subprocess.Popen[bytes]]:
    """`voxd echo-upstream` on a free loopback port, in its own process: (port, process)."""
    port = free_port()
    return port, subprocess.Popen(
        [sys.executable, "-m", "voxd", "echo-upstream", "--listen", f"127.0.0.1:{port}",
         "--reply-after-ms", str(reply_after_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_vendor_echo(protocol: str, audio: str) -> tuple[dict[str, dict[str, object]],
                                                         dict[str, str],
                                                         subprocess.Popen[bytes]]:
    """`voxd echo-upstream --protocol VENDOR` (a vendor's simulator, echoing) in its own
    process: (the voxd config sections that point at it, the secrets' environment, process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxd", "echo-upstream", "--protocol", protocol, "--audio", audio],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    found: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:  # three lines, printed once it listens
        key, _, value = line.decode().partition(": ")
        if key in ("config", "secrets"):
            found[key] = value
        if len(found) == 2:
            break
    proc.stdout.close()
    if len(found) < 2:
        stop_processes([proc])
        raise LoadTestError(f"the {protocol} simulator did not start")
    return json.loads(found["config"]), json.loads(found["secrets"]), proc


class Processes:
    """`voxd echo-upstream` and `voxd serve` (configured to use it), each its own process.
    With `protocol` (a provider name other than "websocket"), the upstream is that vendor's
    simulator (`voxd echo-upstream --protocol`) and voxd speaks its protocol."""

    def __init__(self, audio: str, workers: int, calls: int,
                 extra: dict[str, dict[str, object]] | None = None,
                 reply_after_ms: float = 0, protocol: str = "websocket") -> None:
        env: dict[str, str] = {}
        self.token = secrets.token_hex(16)
        if protocol == "websocket":
            echo_port, self.echo = start_echo(reply_after_ms)
            upstream: dict[str, dict[str, object]] = {
                "assistant": {"provider": "websocket", "audio": audio},
                "websocket": {"url": f"ws://127.0.0.1:{echo_port}/"}}
        else:
            upstream, env, self.echo = start_vendor_echo(protocol, audio)
        sections: dict[str, dict[str, object]] = {
            "server": {"workers": workers, "max_connections": 4 * calls + 100,
                       "max_connections_per_address": 4 * calls + 100},
            **upstream,
            "call": {"max_concurrent_calls": calls + 10},
            # The echo talks over the caller all the time: that is not a barge-in to act on.
            "barge_in": {"local_vad": False},
            "logging": {"level": "warning"},
        }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        self.daemon = VoxdProcess(sections, {**env, "VOXD_TWILIO_AUTH_TOKEN": self.token})
        self.voxd = self.daemon.proc
        self.origin = self.daemon.origin
        self.webhook_url = self.daemon.webhook_url

    async def ready(self) -> None:
        await self.daemon.ready()

    def stop(self) -> None:
        stop_processes([self.voxd, self.echo])
        self.daemon.config.unlink(missing_ok=True)

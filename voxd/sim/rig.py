"""The process rig of the load tests and benchmarks: `voxd serve` and an echo upstream (or a
vendor's simulator) each in its own process, stopped cleanly; and their cost, read from voxd's
/metrics or from /proc (CPU seconds and RSS of a process and its children).

Each process runs in its own session, so a terminal's Ctrl-C reaches only the load test, which
stops them (`stop_processes`) after reporting."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from voxd.errors import VoxdError


class LoadTestError(VoxdError):
    """The load test could not run (voxd or the upstream unreachable, a bad URL)."""


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
                                     stderr=subprocess.DEVNULL if quiet else None,
                                     start_new_session=True)

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
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_vendor_echo(protocol: str, audio: str) -> tuple[dict[str, dict[str, object]],
                                                         dict[str, str],
                                                         subprocess.Popen[bytes]]:
    """`voxd echo-upstream --protocol VENDOR` (a vendor's simulator, echoing) in its own
    process: (the voxd config sections that point at it, the secrets' environment, process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxd", "echo-upstream", "--protocol", protocol, "--audio", audio],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
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

"""Floods of tiny frames against a real `voxd serve`: what one good call and `/healthz` see.

Run: .venv/bin/python bench/flood.py [--floods 0,1,4,16] [--seconds 8] [--voxd-path DIR]

voxd runs as its own process, in the production posture for the media endpoint: signatures on
(`twilio.validate_signatures`, the default) and stream tokens on, with one worker and an echo
upstream (`voxd echo-upstream`, its own process). One change from the defaults:
`call.start_timeout = 60`, so a flooder that never sends `start` keeps its socket for the whole
run instead of being closed after 10 s (each flooder reconnects anyway if it is closed).

Each flooder is what a holder of a captured upgrade signature can do: it posts a signed webhook
(as Twilio would, with the auth token), opens the stream URL from the TwiML with a valid
`X-Twilio-Signature`, then writes as fast as the socket takes them empty pings and unsolicited
pongs (6 bytes each, masked: the cheapest frames to send, each one parsed by voxd, every ping
answered), reading and discarding what voxd answers. (Tiny text messages end the call now:
before `start` the only valid one, `connected`, may come once.) The flooders run in a child
process of their own (so their work is not the good call's), all on 127.0.0.1.

For each number of flooders (0 first, as the baseline), with the flood running: one good call
(`voxd.sim.load.LoadCall`: real-time 20 ms frames through voxd to the echo and back) for
--seconds, and `GET /healthz` every 50 ms on a kept-alive connection. Reported: the good
call's frame round trip (Twilio -> voxd -> echo -> voxd -> Twilio) p50/p99 and its lost
frames, `/healthz` latency p50/p99 and failed probes, and how many flood bytes voxd took
(what the flooders' sockets accepted).

--voxd-path runs the daemon (and the echo) from another checkout, e.g. the code before a
change: `git worktree add /tmp/voxd-base <commit>` then `--voxd-path /tmp/voxd-base`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from twilio.request_validator import RequestValidator
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.sim.caller import parse_twiml
from voxd.sim.load import LoadCall, Processes, speech_frames

HEALTH_EVERY = 0.05
HEALTH_TIMEOUT = 2.0
WARMUP = 1.5
"""Seconds the flood runs before the good call starts."""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the flooders (a child process) -----------------------------------------------------------


def flood_block() -> bytes:
    """64 KiB of masked client frames: empty pings and pongs, in turn."""
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN)
    for _ in range(65536 // 12):
        client.send_ping(b"")
        client.send_pong(b"")
    return b"".join(client.data_to_send())


class Flooder:
    def __init__(self, webhook_url: str, token: str, deadline: float) -> None:
        self.webhook_url = webhook_url
        self.validator = RequestValidator(token)
        self.deadline = deadline
        self.sent = 0
        self.connections = 0
        self.refused = 0

    async def run(self, client: httpx.AsyncClient, block: bytes) -> None:
        while trio.current_time() < self.deadline:
            with contextlib.suppress(OSError, trio.BrokenResourceError,
                                     trio.ClosedResourceError, httpx.HTTPError):
                await self._one(client, block)
            await trio.sleep(0.05)

    async def _one(self, client: httpx.AsyncClient, block: bytes) -> None:
        form = {"CallSid": "CA" + secrets.token_hex(16), "AccountSid": "AC" + "0" * 32,
                "From": "+15005550006", "To": "+15005550001", "CallStatus": "ringing",
                "ApiVersion": "2010-04-01", "Direction": "inbound"}
        signature = self.validator.compute_signature(self.webhook_url, form)
        response = await client.post(self.webhook_url, data=form,
                                     headers={"X-Twilio-Signature": signature})
        if response.status_code != 200:
            self.refused += 1
            return
        url = parse_twiml(response.text).url
        uri = parse_uri(url)
        stream = await trio.open_tcp_stream(uri.host, uri.port)
        async with stream:
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            head = (f"GET {uri.resource_name} HTTP/1.1\r\nHost: {uri.host}:{uri.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                    f"X-Twilio-Signature: {self.validator.compute_signature(url, {})}\r\n\r\n")
            await stream.send_all(head.encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = await stream.receive_some(4096)
                if not data:
                    return
                answer += data
            if not answer.startswith(b"HTTP/1.1 101"):
                self.refused += 1
                return
            self.connections += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._discard, stream, nursery.cancel_scope)
                with trio.move_on_at(self.deadline):
                    while True:
                        await stream.send_all(block)
                        self.sent += len(block)
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _discard(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        while await stream.receive_some(65536):
            pass
        scope.cancel()  # voxd closed the connection


async def flooders_main(webhook_url: str, token: str, count: int, seconds: float) -> None:
    deadline = trio.current_time() + seconds
    block = flood_block()
    flooders = [Flooder(webhook_url, token, deadline) for _ in range(count)]
    async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
        for flooder in flooders:
            nursery.start_soon(flooder.run, client, block)
    print(sum(f.sent for f in flooders), sum(f.connections for f in flooders),
          sum(f.refused for f in flooders), flush=True)


# -- the measurement --------------------------------------------------------------------------


async def probe_health(origin: str, until: float, latencies: list[float]) -> int:
    """GET /healthz every HEALTH_EVERY until `until`; the failures."""
    failed = 0
    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as client:
        while trio.current_time() < until:
            started = trio.current_time()
            try:
                response = await client.get(origin + "/healthz")
                if response.status_code == 200:
                    latencies.append(trio.current_time() - started)
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1
            await trio.sleep_until(started + HEALTH_EVERY)
    return failed


async def scenario(procs: Processes, floods: int, seconds: float) -> dict[str, Any]:
    flood_seconds = WARMUP + seconds + 2.0
    child = None
    if floods:
        child = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--flooder", procs.webhook_url, procs.token,
             str(floods), str(flood_seconds)], stdout=subprocess.PIPE)
    await trio.sleep(WARMUP)
    call = LoadCall(procs.webhook_url, speech_frames(seconds), procs.token)
    health: list[float] = []
    failed = 0

    async def health_task() -> None:
        nonlocal failed
        failed = await probe_health(procs.origin, trio.current_time() + seconds, health)

    async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
        nursery.start_soon(health_task)
        nursery.start_soon(call.run, client)
    flood_bytes = connections = refused = 0
    if child is not None:
        assert child.stdout is not None
        output = b""
        with trio.move_on_after(flood_seconds + 20):
            while chunk := await child.stdout.receive_some():
                output += chunk
            await child.wait()
        if child.returncode is None:
            child.kill()
            await child.wait()
        if output.split():
            flood_bytes, connections, refused = map(int, output.split()[:3])
    trips = call.result.round_trips()
    return {"floods": floods, "p50": percentile(trips, 0.5) * 1000,
            "p99": percentile(trips, 0.99) * 1000, "lost": call.result.lost,
            "sent": len(call.result.sent_at), "error": call.result.error or "",
            "h50": percentile(health, 0.5) * 1000, "h99": percentile(health, 0.99) * 1000,
            "hfail": failed, "hok": len(health), "mb": flood_bytes / 1e6, "conns": connections,
            "refused": refused}


async def main(floods: list[int], seconds: float, label: str) -> None:
    procs = Processes("mulaw", workers=1, calls=40, extra={
        "call": {"start_timeout": 60.0, "stream_token": True},
        "twilio": {"validate_signatures": True},
    })
    try:
        await procs.ready()
        rows = [await scenario(procs, n, seconds) for n in floods]
    finally:
        procs.stop()
    print(f"\n{label}: one good call for {seconds:.0f} s per row\n")
    print("| flooding connections | good call frame delay p50 / p99 ms | lost frames "
          "| /healthz p50 / p99 ms | /healthz failed (2 s timeout) | flood MB taken by voxd "
          "| flood connections opened |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["sent"]:
            lost = f"{r['lost']} of {r['sent']}"
            delay = f"{r['p50']:.1f} / {r['p99']:.1f}" if r["sent"] > r["lost"] else "-"
        else:
            error = r["error"].rstrip(": ") or "no frame sent"
            lost, delay = "-", f"call not placed ({error})"
        health = f"{r['h50']:.1f} / {r['h99']:.1f}" if r["hok"] else "-"
        print(f"| {r['floods']} | {delay} | {lost} | {health} "
              f"| {r['hfail']} of {r['hfail'] + r['hok']} | {r['mb']:.0f} | {r['conns']} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--flooder":
        webhook, token, count, seconds = sys.argv[2:6]
        trio.run(flooders_main, webhook, token, int(count), float(seconds))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floods", default="0,1,4,16",
                        help="numbers of flooding connections, one row each")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of the good call in each row")
    parser.add_argument("--voxd-path", type=Path,
                        help="run the daemon and the echo from this checkout instead")
    parser.add_argument("--label", default="",
                        help="a title for the table (default: the daemon's checkout)")
    args = parser.parse_args()
    if args.voxd_path is not None:  # `python -m voxd` looks in the working directory first
        os.environ["PYTHONPATH"] = str(args.voxd_path.resolve())
        os.chdir(args.voxd_path)
    daemon_code = subprocess.run([sys.executable, "-c", "import voxd; print(voxd.__file__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    label = f"{args.label or 'voxd'} (daemon runs {Path(daemon_code).parent})"
    trio.run(main, [int(n) for n in args.floods.split(",")], args.seconds, label)

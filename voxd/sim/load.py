"""`voxd loadtest`: many concurrent simulated calls, paced in real time like Twilio.

Each call POSTs the voice webhook (signed when a token is given), follows the TwiML to the
media stream, streams speech-like audio in 20 ms frames and echoes marks back at once. Against
an upstream that echoes audio (the `echo-upstream` process this module can start), every frame
a call sends comes back: the load test counts what is lost and times each frame's round trip.
voxd's own CPU and memory come from its /metrics (`voxd_process_*`, summed over workers).

A call that fails (the webhook refused or unreachable, voxd answering its fallback without a
stream, voxd ending the stream before the caller's `stop`, garbage from voxd) ends alone, its
reason in one line (`CallResult.error`, the same words for every call that failed the same
way); the others and the run go on.

Without a webhook URL the load test starts its own echo upstream and `voxd serve` (each in its
own process, so neither's cost is counted as the other's) and stops them at the end.

This module places and paces the calls; `rig` starts and measures the processes,
`load_report` holds the figures, `speech` makes the caller's audio and `messages` builds what
Twilio sends.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx
import trio
from twilio.request_validator import RequestValidator

from voxd.errors import VoxdError
from voxd.net.websocket import ConnectionClosed, HandshakeError, WebSocket, connect
from voxd.observability.untrusted import show
from voxd.sim import messages
from voxd.sim.explain import connection_problem, elsewhere_hint, status_problem
from voxd.sim.interrupt import single
from voxd.sim.load_report import TURN_HOLD_MS, CallResult, LoadReport
from voxd.sim.rig import (
    DaemonSample,
    LoadTestError,
    Processes,
    Sampler,
    VoxdProcess,
    free_port,
    proc_sampler,
    process_cpu_seconds,
    process_tree,
    sample_daemon,
    start_echo,
    start_vendor_echo,
    stop_processes,
)
from voxd.sim.speech import speech_frames, speech_ulaw
from voxd.sim.twiml import parse_twiml, twiml_verbs

__all__ = [  # moved to the modules by job (the benchmarks import them from here)
    "TURN_HOLD_MS", "CallResult", "DaemonSample", "LoadReport", "LoadTestError", "Processes",
    "Sampler", "VoxdProcess", "free_port", "proc_sampler", "process_cpu_seconds",
    "process_tree", "speech_frames", "speech_ulaw", "start_echo", "start_vendor_echo",
    "stop_processes",
]

FRAME = 0.020
SETTLE_SECONDS = 0.3
"""After its last frame a call waits this long for the echoes still on their way, then hangs
up (so a frame not back by then counts as lost)."""
REACH_SECONDS = 5.0
"""Longest the check that the webhook's origin takes connections may take."""
CONNECT_SECONDS = 10.0
"""Longest the media stream's WebSocket (or the stream's action request) may take."""


_encoded: tuple[list[bytes], list[str]] = ([], [])


def _payloads(frames: list[bytes]) -> list[str]:
    """The frames base64-encoded, shared by the calls given the same list (a thousand calls
    of 20 s would otherwise hold 400 MB of copies)."""
    global _encoded
    if _encoded[0] is not frames:
        _encoded = (frames, [base64.b64encode(f).decode() for f in frames])
    return _encoded[1]


class LoadCall:
    """One simulated call (webhook, stream, paced frames, marks echoed). Whatever goes wrong
    ends this call only, as one line in `result.error` (the same words for every call that
    failed the same way, so the report can count them)."""

    def __init__(self, webhook_url: str, frames: list[bytes], auth_token: str | None) -> None:
        self.webhook_url = webhook_url
        self.payloads = _payloads(frames)
        self.account_sid = "AC" + "0" * 32
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.call_sid = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.result = CallResult()
        self.live = False
        self.closed = trio.Event()
        """voxd closed the stream."""
        self.close_code: int | None = None

    def _sign(self, url: str, params: dict[str, str]) -> dict[str, str]:
        if self.validator is None:
            return {}
        return {"X-Twilio-Signature": self.validator.compute_signature(url, params)}

    def _form(self, status: str) -> dict[str, str]:
        return {"CallSid": self.call_sid, "AccountSid": self.account_sid, "From": "+15005550006",
                "To": "+15005550001", "CallStatus": status, "ApiVersion": "2010-04-01",
                "Direction": "inbound"}

    async def run(self, client: httpx.AsyncClient) -> None:
        """Place the call; never raises but for a cancellation (its failure is the result's
        `error`)."""
        try:
            await self._run(client)
        except Exception as exc:  # one call's failure is a figure, not a crash
            if not self.result.error:
                self.result.error = _failure(exc, self.webhook_url)
        finally:
            self.live = False

    async def _run(self, client: httpx.AsyncClient) -> None:
        form = self._form("ringing")
        try:
            response = await client.post(self.webhook_url, data=form,
                                         headers=self._sign(self.webhook_url, form))
        except httpx.HTTPError as exc:
            raise LoadTestError(f"cannot reach the webhook: "
                                f"{connection_problem(exc, self.webhook_url)}") from None
        if response.status_code != 200:
            raise LoadTestError(status_problem("webhook", self.webhook_url,
                                               response.status_code, response.reason_phrase,
                                               response.text))
        stream = parse_twiml(response.text)
        try:
            with trio.fail_after(CONNECT_SECONDS):
                ws = await connect(stream.url, list(self._sign(stream.url, {}).items()))
        except HandshakeError as exc:
            raise LoadTestError(f"the media stream was refused: {exc}") from None
        except (OSError, trio.TooSlowError) as exc:
            raise LoadTestError(f"cannot open the media stream: "
                                f"{connection_problem(exc, stream.url, CONNECT_SECONDS)}"
                                f"{elsewhere_hint(stream.url, self.webhook_url)}") from None
        try:
            if not await self._stream(ws, stream.parameters):  # voxd ended the call
                self.result.error = await self._ended_by_voxd(client, stream.action)
        finally:
            with trio.move_on_after(1):
                await ws.close()

    async def _stream(self, ws: WebSocket, parameters: dict[str, str]) -> bool:
        """The stream, to the caller's `stop`: True if the caller hung up, False if voxd
        closed the stream first."""
        sid = self.stream_sid
        try:
            await ws.send(messages.encode(messages.connected()))
            await ws.send(messages.encode(messages.start(sid, self.call_sid, self.account_sid,
                                                         parameters)))
        except ConnectionClosed as exc:
            self._closed_with(exc)
            return False
        self.live = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, ws)
            hung_up = await self._talk(ws)
            nursery.cancel_scope.cancel()
        return hung_up

    async def _talk(self, ws: WebSocket) -> bool:
        """The caller's side: the frames, a moment for the last echoes, then `stop` (and the
        wait for voxd to close). False when voxd closed the stream first."""
        try:
            await self._send_frames(ws)
            with trio.move_on_after(SETTLE_SECONDS):
                await self.closed.wait()
            if self.closed.is_set():
                return False
            await ws.send(messages.encode(messages.stop(self.stream_sid, self.call_sid,
                                                        self.account_sid)))
        except ConnectionClosed as exc:
            self._closed_with(exc)
            return False
        stopped = trio.current_time()
        with trio.move_on_after(5):
            await self.closed.wait()
        if self.closed.is_set():
            self.result.teardown = trio.current_time() - stopped
        return True

    def _closed_with(self, exc: ConnectionClosed) -> None:
        self.close_code = self.close_code or exc.code
        self.closed.set()

    async def _ended_by_voxd(self, client: httpx.AsyncClient, action: str) -> str:
        """voxd closed the stream before the caller hung up (an assistant that failed, a
        stream refused after its upgrade): the failure, with what voxd gives the caller next
        (its `<Connect action>` answer, asked as Twilio does)."""
        line = "voxd ended the stream before the caller hung up"
        if self.close_code not in (None, 1000):
            line = f"the stream was closed abnormally (code {self.close_code}) before the " \
                   "caller hung up"
        why = "(voxd's log says why: the call's reason=)"
        if not action:
            return f"{line} {why}"
        url = urljoin(self.webhook_url, action)
        form = self._form("in-progress")
        try:
            with trio.fail_after(CONNECT_SECONDS):
                response = await client.post(url, data=form, headers=self._sign(url, form))
            if response.status_code != 200:
                return f"{line}; its action answered HTTP {response.status_code} {why}"
            verbs = twiml_verbs(response.text, "the stream's action")
        except (httpx.HTTPError, trio.TooSlowError, VoxdError):
            return f"{line} {why}"
        return f"{line} and gave the caller {show(verbs or 'nothing', 120)} {why}"

    async def _send_frames(self, ws: WebSocket) -> None:
        media = messages.MediaFrames(self.stream_sid)
        sent_at = self.result.sent_at
        start = trio.current_time()
        for i, payload in enumerate(self.payloads):
            await trio.sleep_until(start + (i + 1) * FRAME)
            if self.closed.is_set():
                return
            sent_at.append(trio.current_time())
            await ws.send(media.frame(i, payload))

    async def _receive(self, ws: WebSocket) -> None:
        received_at = self.result.received_at
        try:
            while True:
                message = await ws.receive()
                if '"media"' in message[:20]:
                    received_at.append(trio.current_time())
                elif '"mark"' in message[:20]:
                    try:
                        name = str(json.loads(message)["mark"]["name"])
                    except (ValueError, KeyError, TypeError):
                        self.result.error = "voxd sent an unreadable mark message"
                        continue
                    if found := re.search(r"latency_ms=(\d+)", name):
                        self.result.voxd_latencies.append(int(found.group(1)) / 1000)
                    await ws.send(messages.encode(messages.mark(self.stream_sid, name)))
        except ConnectionClosed as exc:
            self._closed_with(exc)


def _failure(exc: BaseException, url: str) -> str:
    """A call's failure in words (the same for every call that failed the same way)."""
    if isinstance(exc, BaseExceptionGroup):
        exc = single(exc)
    if isinstance(exc, VoxdError):
        return str(exc) or type(exc).__name__
    return connection_problem(exc, url)


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


def ramp_for(calls: int) -> float:
    """Seconds over which the calls are started, by default (50 ms a call, at most 5 s)."""
    return min(5.0, calls * 0.05)


def shortest_call(calls: int) -> float:
    """The least --seconds for `calls` calls: the default ramp plus a 4 s steady window."""
    return ramp_for(calls) + 4


class LoadTest:
    """`calls` concurrent calls of `seconds` each (started evenly over `ramp_seconds`), and
    the bridge's cost (voxd's /metrics, or `sampler`) over the window when all of them are
    up. `report` fills in as the calls run: what an interrupted run reports."""

    def __init__(self, webhook_url: str, calls: int, seconds: float, *,
                 auth_token: str | None = None, ramp_seconds: float | None = None,
                 progress: Callable[[str], None] | None = None,
                 sampler: Sampler | None = None, turns: bool = False) -> None:
        self.webhook_url = webhook_url
        self.metrics_url = webhook_url.split("/twilio/")[0] + "/metrics"
        self.ramp = ramp_seconds if ramp_seconds is not None else ramp_for(calls)
        if seconds < self.ramp + 4:
            raise LoadTestError(f"--seconds must be at least {self.ramp + 4:.0f} (the "
                                f"{self.ramp:.0f}s ramp plus a steady window)")
        self.seconds = seconds
        self.progress = progress
        self.sampler = sampler
        frames = speech_frames(seconds)
        self.calls = [LoadCall(webhook_url, frames, auth_token) for _ in range(calls)]
        self.report = LoadReport(calls, seconds, [c.result for c in self.calls], turns=turns)
        self.placed = 0
        """Calls started so far."""

    async def run(self) -> LoadReport:
        calls, report, load = len(self.calls), self.report, self.calls
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
            def default_sampler() -> Awaitable[DaemonSample | None]:
                return sample_daemon(client, self.metrics_url)

            sample_bridge = self.sampler or default_sampler
            idle = await sample_bridge()
            report.idle_rss = idle.rss_bytes if idle else None
            started = trio.current_time()
            ramp, seconds = self.ramp, self.seconds
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
                        if self.progress is not None:
                            up = sum(c.live for c in load)
                            got = sum(len(c.result.received_at) for c in load)
                            sent = sum(len(c.result.sent_at) for c in load)
                            cpu = ""
                            if first is not None and last is not None and last.at > first.at:
                                cores = ((last.cpu_seconds - first.cpu_seconds)
                                         / (last.at - first.at))
                                cpu = f", voxd {cores * 100:.0f}% of a core"
                            self.progress(f"[{now - started:5.1f}s] {up}/{calls} calls up, "
                                          f"frames sent {sent} back {got}, failed "
                                          f"{len(report.errors)}{cpu}")
                    if first is not None and last is not None and last.at > first.at:
                        report.cpu_cores = ((last.cpu_seconds - first.cpu_seconds)
                                            / (last.at - first.at))
                        if idle is not None:
                            report.rss_per_call = (last.rss_bytes - idle.rss_bytes) / calls

                nursery.start_soon(watch)
                for i, call in enumerate(load):
                    nursery.start_soon(call.run, client)
                    self.placed += 1
                    await trio.sleep_until(started + ramp * (i + 1) / calls)
        return report


async def run_load(webhook_url: str, calls: int, seconds: float, *,
                   auth_token: str | None = None, ramp_seconds: float | None = None,
                   progress: Callable[[str], None] | None = None,
                   sampler: Sampler | None = None, turns: bool = False) -> LoadReport:
    """Run a LoadTest (see it) and return its report."""
    return await LoadTest(webhook_url, calls, seconds, auth_token=auth_token,
                          ramp_seconds=ramp_seconds, progress=progress, sampler=sampler,
                          turns=turns).run()


async def check_reachable(webhook_url: str) -> None:
    """LoadTestError naming the problem when no connection can be made to the webhook's
    origin (voxd not running, a wrong host or port, TLS to a plain port): then no call can
    run. Any answer will do (the calls report a wrong path)."""
    parts = urlsplit(webhook_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    try:
        async with httpx.AsyncClient(timeout=REACH_SECONDS) as client:
            await client.get(origin + "/healthz")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise LoadTestError(f"cannot reach {show(origin, 80)}: "
                            f"{connection_problem(exc, webhook_url, REACH_SECONDS)} (is voxd "
                            "running there?)") from None
    except httpx.HTTPError:
        pass  # something answers there: the calls will say what

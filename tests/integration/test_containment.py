"""Containment: nothing one call, one assistant, one background task or one reload does reaches
the daemon or another call.

The fault matrix injects each kind of failure into each task of a call's nursery while another
call runs on the same daemon: only the victim ends, with exactly one summary line naming the
cause; the bystander loses no frame; the daemon goes on serving.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import trio
import trio.testing

from tests.fakes.vapi import FakeVapi, VapiScript
from tests.integration.audio import burst, silence
from voxd.background import Background
from voxd.call.session import CallSession
from voxd.config import load_settings
from voxd.errors import CallerDisconnected, ProtocolError, UpstreamError
from voxd.net.websocket import ConnectionClosed
from voxd.observability import metrics
from voxd.observability.logging import _CallFilter
from voxd.observability.systemd import Notifier
from voxd.providers import vapi as vapi_module
from voxd.providers.echo import EchoAssistant
from voxd.providers.ws_upstream import WebSocketAssistant
from voxd.server import Server, bound_origin, open_listener
from voxd.sim.caller import CallReport, TwilioSimulator

KEY = "vapi-test-key"
SUMMARY = re.compile(r"call ended: .*frames_in=(\d+) .*dropped_in=(\d+) dropped_out=(\d+) "
                     r".*reason=(\S+)")


def errors_counted(kind: str) -> float:
    return metrics.ERRORS.labels(kind=kind)._value.get()


@pytest.fixture(autouse=True)
def call_context_on_records(monkeypatch):
    """Every record carries the call's log context (`call_sid=... `) from its creation, as
    voxd's own handler adds it, so caplog's records can be told apart by call."""
    make = logging.getLogRecordFactory()
    stamp = _CallFilter()

    def factory(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = make(*args, **kwargs)
        stamp.filter(record)
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", factory)


def summaries(caplog: pytest.LogCaptureFixture, call_sid: str) -> list[re.Match[str]]:
    """The summary lines logged for one call (matched on the call's log context)."""
    found = []
    for record in caplog.records:
        if f"call_sid={call_sid} " in getattr(record, "call", ""):
            match = SUMMARY.search(record.getMessage())
            if match:
                found.append(match)
    return found


async def eventually(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    """Wait until `condition()` holds (checked every 20 ms); fail after `seconds`."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await trio.sleep(0.02)
    raise AssertionError("condition not reached in time")


# -- a call's tasks ---------------------------------------------------------------------

FAILURES: dict[str, Callable[[CallSession], BaseException | None]] = {
    "voxd-error": lambda s: ProtocolError("injected protocol error"),
    "upstream-error": lambda s: UpstreamError("injected upstream error"),
    "caller-gone": lambda s: CallerDisconnected("injected disconnect"),
    "connection-closed": lambda s: ConnectionClosed(1006, "injected"),
    "broken-resource": lambda s: trio.BrokenResourceError("injected"),
    "os-error": lambda s: OSError(errno.ECONNRESET, "injected reset"),
    "runtime-error": lambda s: RuntimeError("injected bug"),
    "cancelled-from-outside": lambda s: s.shutdown("injected-outside-cancel"),
}
TASKS = ["_inbound", "_watchdog", "_playout", "_assistant_side", "_feeder", "_outbound",
         "_keepalive", "_barge_in_watcher", "_keypad"]
EXPECTED_REASON = {
    "voxd-error": "protocol-error", "upstream-error": "upstream-error",
    "caller-gone": "caller-disconnected", "connection-closed": "internal-error",
    "broken-resource": "internal-error", "os-error": "internal-error",
    "runtime-error": "internal-error", "cancelled-from-outside": "injected-outside-cancel",
}
"""What each injected failure must end the call as: VoxdErrors by their kind, anything that
reaches a call's task unmapped is voxd's own bug (the boundaries map every transport error
before it gets there), and an outside cancellation with the reason it gave."""


@pytest.mark.parametrize("task", TASKS)
async def test_a_failing_task_ends_only_its_own_call(start_voxd, monkeypatch, caplog, task):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(signed=False)
    victims = {kind: TwilioSimulator(voxd.webhook) for kind in FAILURES}
    by_sid = {sim.call_sid: kind for kind, sim in victims.items()}
    real = getattr(CallSession, task)

    async def failing(self: CallSession, *args: object) -> object:
        kind = by_sid.get(self.call.call_sid if self.call else "")
        if kind is None:
            return await real(self, *args)
        await trio.sleep(0.6)  # the call is up and moving audio
        failure = FAILURES[kind](self)
        if failure is not None:
            raise failure
        await trio.sleep_forever()  # cancelled from outside: this task is cancelled too

    monkeypatch.setattr(CallSession, task, failing)
    bystander = TwilioSimulator(voxd.webhook)
    speech = np.concatenate([burst(0.5), silence(1.5)] * 2)  # the echo never overlaps it
    reports: dict[str, CallReport] = {}

    async def place(name: str, sim: TwilioSimulator, seconds: float) -> None:
        reports[name] = await sim.call(speech, seconds)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(place, "bystander", bystander, 4.6)
            for kind, sim in victims.items():
                nursery.start_soon(place, kind, sim, 3.0)
        await voxd.runtime.wait_idle()  # voxd's side of every call has ended too

    for kind, sim in victims.items():
        lines = summaries(caplog, sim.call_sid)
        assert len(lines) == 1, (kind, [m.group(0) for m in lines])
        assert lines[0].group(4) == EXPECTED_REASON[kind], (kind, lines[0].group(0))
        assert reports[kind].closed_by == "voxd", kind  # voxd ended it, not the caller
    (line,) = summaries(caplog, bystander.call_sid)
    assert line.group(4) == "caller-hangup"
    assert int(line.group(1)) == len(reports["bystander"].caller_frames)  # nothing lost
    assert (line.group(2), line.group(3)) == ("0", "0")
    assert len(reports["bystander"].received_audio) >= 2 * 0.4 * 8000  # both echoes came back
    async with httpx.AsyncClient() as client:  # the daemon lives
        assert (await client.get(voxd.origin + "/healthz")).status_code == 200


# -- the assistant stops reading -----------------------------------------------------------

@dataclass
class Stall:
    """Makes one call's assistant stop taking audio (its connection stays up) after N chunks:
    a send never completes, a send without waiting leaves everything owed."""

    after: int = 10
    sent: int = 0

    def stalled(self) -> bool:
        self.sent += 1
        return self.sent > self.after


@pytest.mark.parametrize("provider", ["echo", "websocket"])
async def test_a_stalled_assistant_is_blamed_on_the_assistant(
        start_voxd, monkeypatch, caplog, provider, nursery):
    caplog.set_level(logging.INFO)
    stall = Stall()
    if provider == "echo":
        real = EchoAssistant.send_audio

        async def send_audio(self, chunk: bytes) -> None:
            if stall.stalled():
                await trio.sleep_forever()
            await real(self, chunk)

        monkeypatch.setattr(EchoAssistant, "send_audio", send_audio)
        sections: dict = {}
    else:
        from tests.fakes.ws_assistant import FakeAssistant

        real_nowait = WebSocketAssistant.send_audio_nowait

        def send_audio_nowait(self, chunk: bytes) -> bool:
            return False if stall.stalled() else real_nowait(self, chunk)

        async def flush(self) -> None:
            await trio.sleep_forever()

        monkeypatch.setattr(WebSocketAssistant, "send_audio_nowait", send_audio_nowait)
        monkeypatch.setattr(WebSocketAssistant, "flush", flush)
        assistant = FakeAssistant()
        url = await nursery.start(assistant.serve)
        sections = {"assistant": {"provider": "websocket"}, "websocket": {"url": url}}
    # Twilio's own silence timeout is shorter than the stall's: blaming Twilio would show.
    voxd = await start_voxd(signed=False, call={"upstream_send_timeout": 1.0,
                                                "media_timeout": 0.8}, **sections)
    silent_before = errors_counted("twilio_silent")
    stalled_before = errors_counted("upstream_stalled")
    sim = TwilioSimulator(voxd.webhook)
    report = await sim.call(np.concatenate([burst(0.4), silence(5.0)]), 6.0)
    with trio.fail_after(5):
        await voxd.runtime.wait_idle()  # voxd's side of the call has ended too
    (line,) = summaries(caplog, sim.call_sid)
    assert line.group(4) == "upstream-stalled"
    assert report.closed_by == "voxd"
    assert report.next_twiml.startswith("<Say>")  # the caller hears the fallback
    # Twilio was read all along: the call ended about a second after the stall, not later.
    assert 0.2 * 50 < int(line.group(1)) < 3.5 * 50
    assert errors_counted("upstream_stalled") == stalled_before + 1
    assert errors_counted("twilio_silent") == silent_before
    assert any("stopped taking caller audio" in r.getMessage() for r in caplog.records)


# -- background work and reloads -----------------------------------------------------------

async def test_a_failing_background_task_is_one_line_and_goes_no_further(caplog):
    caplog.set_level(logging.INFO)
    background = Background()
    before = errors_counted("background")
    done: list[str] = []
    failures: list[BaseException] = [UpstreamError("vapi said no"),
                                     ConnectionClosed(1006, "gone"), OSError("disk"),
                                     RuntimeError("bug"), trio.BrokenResourceError("gone")]

    async def fail(exc: BaseException) -> None:
        await trio.sleep(0.01)
        raise exc

    async def survive() -> None:
        await trio.sleep(0.1)
        done.append("survivor")

    async with trio.open_nursery() as nursery:
        await nursery.start(background.run)
        for i, exc in enumerate(failures):
            background.start("an injected failure", f"CA{i}", fail, exc,
                             on_done=lambda i=i: done.append(str(i)))
        background.start("a healthy task", "CA9", survive)
        await eventually(lambda: not background.running)
        nursery.cancel_scope.cancel()
    assert sorted(done) == ["0", "1", "2", "3", "4", "survivor"]
    assert errors_counted("background") == before + len(failures)
    lines = {r.getMessage().split()[0]: r for r in caplog.records
             if "an injected failure failed" in r.getMessage()}
    assert sorted(lines) == [f"call_sid=CA{i}" for i in range(len(failures))]
    # A peer's failure (VoxdError) is one line; only voxd's own bugs carry a traceback.
    assert [bool(lines[f"call_sid=CA{i}"].exc_info) for i in range(len(failures))] == \
        [False, False, True, True, True]


@pytest.fixture
def vapi_server(nursery, tmp_path, monkeypatch):
    """`await vapi_server(script)` -> (Server, origin, fake): a daemon from a config file (so
    it can reload) with the Vapi provider and early start against a fake Vapi."""
    monkeypatch.setenv("VAPI_API_KEY", KEY)

    async def start(script: VapiScript | None = None) -> tuple[Server, str, FakeVapi]:
        fake = FakeVapi(script)
        await nursery.start(fake.serve)
        sock = open_listener("127.0.0.1:0")
        origin = bound_origin(sock)
        path = tmp_path / "voxd.toml"
        path.write_text(f'[server]\nlisten = "127.0.0.1:0"\npublic_url = "{origin}"\n'
                        '[twilio]\nvalidate_signatures = false\n'
                        '[assistant]\nprovider = "vapi"\naudio = "mulaw"\n'
                        f'[vapi]\nbase_url = "{fake.base_url}"\nassistant_id = "asst-1"\n')
        instance = Server(load_settings(path), sock, Notifier({}))
        nursery.start_soon(instance.run, trio.Event())
        await trio.testing.wait_all_tasks_blocked()
        return instance, origin, fake

    return start


@pytest.mark.parametrize("dead", ["close", "reset"])
async def test_an_unclaimed_early_call_whose_socket_is_dead_costs_one_line(
        vapi_server, monkeypatch, caplog, dead):
    """The stream never came (it went to another host, or the caller hung up first) and Vapi
    has already ended the call: its socket closes or resets right after the 101 when voxd
    opens it to send end-call. Before: the daemon died with every call on it."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(vapi_module, "EARLY_CLAIM_SECONDS", 0.3)
    instance, origin, fake = await vapi_server(VapiScript(socket_at_accept=dead))
    form = {"CallSid": "CA" + "7" * 32, "From": "+1", "To": "+2"}
    async with httpx.AsyncClient() as client:
        assert (await client.post(origin + "/twilio/voice", data=form)).status_code == 200
    with trio.fail_after(5):
        await fake.created.wait()
        await fake.last_call.closed.wait()
        # the clean-up has ended (the watchdog pinger and the metrics sampler stay)
        await eventually(lambda: instance.background.running <= 2)
    lines = [r.getMessage() for r in caplog.records
             if "never claimed" in r.getMessage() or "unclaimed" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and all(form["CallSid"] in line for line in lines)
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)
    # The daemon lives and takes the next call.
    fake.script.socket_at_accept = None
    report = await TwilioSimulator(origin + "/twilio/voice").call(
        np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None


async def test_a_reload_between_webhook_and_stream_keeps_the_early_call(vapi_server, caplog):
    """SIGHUP after Twilio's webhook, before its stream: the stream claims the Vapi call the
    webhook created (one Vapi call per phone call), and the replaced provider is closed once
    its work is done (no pool left open)."""
    caplog.set_level(logging.INFO)
    instance, origin, fake = await vapi_server()
    old = instance.runtime

    class ReloadBetween(TwilioSimulator):
        async def request_stream(self):  # type: ignore[no-untyped-def]
            instruction = await super().request_stream()
            instance.reload()
            return instruction

    report = await ReloadBetween(origin + "/twilio/voice").call(
        np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None
    assert instance.runtime is not old
    assert len(fake.create_requests) == 1  # exactly one Vapi call for the phone call
    assert any("created early by the webhook" in r.getMessage() for r in caplog.records)
    with trio.fail_after(3):
        await eventually(lambda: old.closed)
        await trio.testing.wait_all_tasks_blocked()
    assert old.provider._client is None  # type: ignore[attr-defined]  # the pool is closed
    assert not instance.runtime.closed


async def test_a_stream_that_ends_while_its_early_call_is_created_ends_the_call(
        vapi_server, caplog):
    """The caller hangs up while Vapi is still creating the call the webhook asked for (found
    by bench/chaos.py): once created, it is ended, not left running (and billed) at Vapi."""
    caplog.set_level(logging.INFO)
    _, origin, fake = await vapi_server(VapiScript(create_delay=1.0))
    report = await TwilioSimulator(origin + "/twilio/voice").call(silence(0.3), 0.4)
    assert report.closed_by == "caller"
    with trio.fail_after(5):
        await fake.created.wait()
        call = fake.last_call
        await call.closed.wait()
    assert call.control_in == [{"type": "end-call"}]
    assert any("ended before its socket opened; ending it" in r.getMessage()
               for r in caplog.records)

"""voxd with `assistant.provider = "vapi"` against a fake Vapi that follows the documented
protocol: whole calls through the simulator, interruptions, endings, and every failure."""

from __future__ import annotations

import logging
from dataclasses import replace

import httpx
import numpy as np
import pytest
import trio

from tests.fakes.twilio_rest import FakeTwilioRest
from tests.fakes.vapi import FakeVapi, VapiScript
from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import ulaw_decode
from voxd.observability import metrics
from voxd.observability.logging import configure_logging
from voxd.providers import vapi as vapi_module
from voxd.sim.caller import TwilioSimulator

KEY = "vapi-test-key"


@pytest.fixture
async def fake_vapi(nursery):
    async def start(script: VapiScript | None = None, via_proxy: bool = False) -> FakeVapi:
        fake = FakeVapi(script, via_proxy=via_proxy)
        await nursery.start(fake.serve)
        return fake

    return start


@pytest.fixture
def vapi_voxd(start_voxd, fake_vapi):
    """`await vapi_voxd(script, audio=..., call={...}, vapi={...})` -> (voxd, fake)."""

    async def start(script: VapiScript | None = None, *, audio: str = "mulaw",
                    via_proxy: bool = False, key: str = KEY, secrets: dict | None = None,
                    **sections):
        fake = await fake_vapi(script, via_proxy)
        vapi = {"base_url": fake.base_url, "assistant_id": "asst-123",
                **sections.pop("vapi", {})}
        voxd = await start_voxd(secrets=secrets or {"vapi_api_key": key},
                                assistant={"provider": "vapi", "audio": audio}, vapi=vapi,
                                **sections)
        return voxd, fake

    return start


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


async def place_call(voxd, caller: np.ndarray, seconds: float | None = None):
    return await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller, seconds)


async def summary(voxd, caplog) -> str:
    """The call's summary line (logged once the call is fully torn down)."""
    with trio.fail_after(2):
        await voxd.runtime.wait_idle()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def debug_logging():
    """voxd's own logging setup at its most verbose, for one test only: tests/conftest.py's
    `restore_logging` puts logging back as it was afterwards (later tests would pay for every
    library's per-frame debug lines; setting "info" here was undone by caplog's own restore,
    which left the root logger at DEBUG, with voxd's handler on a closed capture file)."""
    configure_logging("debug")


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_a_call_talks_to_the_assistant(vapi_voxd, caplog, audio, debug_logging):
    caplog.set_level(logging.DEBUG)
    voxd, fake = await vapi_voxd(audio=audio)
    utterance = burst(0.6, seed=3)
    report = await place_call(voxd, np.concatenate([silence(0.2), utterance, silence(1.6)]))

    assert report.errors == [] and report.closed_by == "caller"
    [turn] = report.turns()
    assert turn.latency is not None and turn.latency < 0.5 + 0.3  # 0.2 s scripted + VAD
    # What the caller heard is what it said, answered by the assistant.
    said = pcm(report.caller_frames)[1600:1600 + 4800]
    heard = pcm([bytes(report.received_audio)])  # what voxd sent, whatever the CPU load
    lag, correlation = best_alignment(said, heard)
    assert correlation > 0.95
    if audio == "mulaw":
        assert np.array_equal(heard[lag:lag + len(said)], said)
        # and Vapi got exactly the caller's bytes, in order
        assert bytes(fake.last_call.audio_in) == b"".join(report.caller_frames)
    else:
        assert snr_db(said, heard[lag:lag + len(said)]) > 25
        assert len(fake.last_call.audio_in) == 4 * len(b"".join(report.caller_frames))

    call = fake.last_call
    body = call.body
    assert body["assistantId"] == "asst-123"
    expected = {"format": "mulaw", "container": "raw", "sampleRate": 8000}
    if audio == "pcm16":
        expected = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
    assert body["transport"] == {"provider": "vapi.websocket", "audioFormat": expected}
    variables = body["assistantOverrides"]["variableValues"]
    assert variables["callSid"] == report.call_sid
    assert variables["from"] == "+15005550006" and variables["to"] == "+15005550001"
    assert body["metadata"]["twilioCallSid"] == report.call_sid
    assert call.socket_headers["authorization"] == f"Bearer {KEY}"
    # The caller hung up: Vapi was told, so the call does not run on (and bill) there.
    with trio.fail_after(1):
        await call.closed.wait()
    assert call.control_in == [{"type": "end-call"}]
    assert "reason=caller-hangup" in await summary(voxd, caplog)
    logged = caplog.text
    assert KEY not in logged and "/transport" not in logged  # no key, no websocketCallUrl


async def test_the_webhook_starts_the_vapi_call_early(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(VapiScript(create_delay=0.3))
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None
    assert len(fake.create_requests) == 1  # created once, by the webhook, used by the stream
    assert any("created early by the webhook" in r.getMessage() for r in caplog.records)


async def test_without_early_start_the_stream_creates_the_call(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(vapi={"early_start": False})
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None
    assert len(fake.create_requests) == 1
    assert not any("created early" in r.getMessage() for r in caplog.records)


async def test_stream_on_another_worker_works_and_the_orphan_is_ended(
        vapi_voxd, start_voxd, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(vapi_module, "EARLY_CLAIM_SECONDS", 0.5)
    shared = {"vapi_api_key": KEY, "stream_secret": "one-secret-for-every-host"}
    webhook_host, fake = await vapi_voxd(signed=False, secrets=shared)
    stream_host = await start_voxd(
        signed=False, secrets=shared,
        assistant={"provider": "vapi", "audio": "mulaw"},
        vapi={"base_url": fake.base_url, "assistant_id": "asst-123"})

    class StreamElsewhere(TwilioSimulator):
        """Twilio POSTs the webhook to one host; the media stream lands on another."""

        async def request_stream(self):
            instruction = await super().request_stream()
            path = instruction.url.split("/media-stream", 1)[1]  # the call's token
            return replace(instruction, url=stream_host.stream_url + path)

    report = await StreamElsewhere(webhook_host.webhook).call(
        np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None  # the call worked, on the other host
    assert len(fake.create_requests) == 2  # early on the webhook host, again on the other
    orphan = next(c for c in fake.calls.values() if c is not fake.last_call)
    with trio.fail_after(3):
        await orphan.closed.wait()
    assert orphan.control_in == [{"type": "end-call"}]  # ended, not left running on Vapi
    assert any("never claimed" in r.getMessage() for r in caplog.records)


async def test_caller_audio_is_held_while_vapi_connects(vapi_voxd):
    voxd, fake = await vapi_voxd(VapiScript(create_delay=0.8), vapi={"early_start": False})
    caller = np.concatenate([burst(0.5, seed=5), silence(1.6)])  # speaks at once
    report = await place_call(voxd, caller)
    # Nothing lost, nothing reordered, although Vapi was not there for the first 0.8 s.
    assert bytes(fake.last_call.audio_in) == b"".join(report.caller_frames)
    assert report.turns()[0].latency is not None


async def test_caller_audio_beyond_the_preconnect_bound_is_dropped_and_counted(
        vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(VapiScript(create_delay=1.0), vapi={"early_start": False},
                                 call={"preconnect_buffer_seconds": 0.4})
    report = await place_call(voxd, burst(2.0, seed=6))
    sent = b"".join(report.caller_frames)
    received = bytes(fake.last_call.audio_in)
    dropped = len(sent) - len(received)
    assert dropped > 0 and dropped % 160 == 0
    assert received == sent[dropped:]  # the oldest went; the rest arrived in order
    assert f"dropped_in={dropped // 160}" in await summary(voxd, caplog)
    assert any("dropped the oldest" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient() as client:
        text = (await client.get(voxd.origin + "/metrics")).text
    assert 'voxd_media_frames_dropped_total{direction="inbound",reason="preconnect"}' in text


@pytest.mark.parametrize("signal", ["user-interrupted", "speech-update"])
async def test_talking_over_the_assistant_clears_its_audio(vapi_voxd, caplog, signal):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(VapiScript(response_delay=0.1, interrupt_message=signal))
    # 1.5 s utterance -> 1.5 s reply starting ~0.4 s after; the caller cuts in 0.5 s into it.
    caller = np.concatenate([burst(1.5, seed=7), silence(0.9), burst(0.5, seed=8),
                             silence(1.5)])
    report = await place_call(voxd, caller)
    assert fake.last_call.interruptions >= 1
    assert report.clears >= 1
    clear_at = next(t for t, what in report.events if what.startswith("clear"))
    # After the clear, none of the interrupted reply is heard (its answer to the second
    # utterance may follow once the caller stops).
    heard = pcm(report.heard_frames)
    second_end = 1.5 + 0.9 + 0.5
    window = heard[int((clear_at + 0.04) * 8000):int(second_end * 8000)]
    assert np.max(np.abs(window)) < 200
    assert "barge_ins=1" in await summary(voxd, caplog)


async def test_vapi_ending_the_call_hangs_up_with_no_apology(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(VapiScript(end_after=0.6))
    report = await place_call(voxd, burst(0.3), seconds=5)
    assert report.closed_by == "voxd"
    assert report.next_twiml == "<Hangup/>"  # the stream's action hangs up: no fallback
    assert "reason=assistant-ended:vapi:assistant-ended-call" in await summary(voxd, caplog)
    assert fake.last_call.control_in == []  # no end-call: Vapi ended it


async def stream_closed_within(report, seconds: float) -> None:
    closed = [t for t, what in report.events if what.startswith("voxd closed the stream")]
    assert report.closed_by == "voxd" and closed and closed[0] < seconds, report.events


async def test_bad_api_key_gives_a_clear_error_and_the_fallback(vapi_voxd, caplog):
    voxd, fake = await vapi_voxd(key="wrong-key")
    report = await place_call(voxd, burst(0.3), seconds=3)
    await stream_closed_within(report, 1.0)
    assert len(fake.create_requests) == 1  # no retries for a bad key
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Vapi rejected the API key (HTTP 401" in e and "VAPI_API_KEY" in e
               for e in errors), errors
    assert "wrong-key" not in caplog.text


async def test_busy_vapi_is_retried_with_backoff(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, fake = await vapi_voxd(VapiScript(create_statuses=[429, 503], retry_after="0.1"))
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(1.2)]))
    assert report.turns()[0].latency is not None
    assert len(fake.create_requests) == 3
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and "HTTP 429" in retries[0] and "HTTP 503" in retries[1]


async def test_vapi_down_gives_up_within_the_deadline(vapi_voxd, caplog):
    voxd, fake = await vapi_voxd(VapiScript(create_statuses=[500] * 10),
                                 vapi={"create_attempts": 3, "create_timeout": 3.0})
    report = await place_call(voxd, burst(0.3), seconds=5)
    await stream_closed_within(report, 3.0 + 1.0)  # the create deadline, then teardown
    assert len(fake.create_requests) == 3
    assert any("gave up after 3 attempt(s)" in r.getMessage() for r in caplog.records)


async def test_vapi_not_answering_times_out(vapi_voxd, caplog):
    voxd, _ = await vapi_voxd(VapiScript(create_hangs=True),
                                 vapi={"create_timeout": 0.8, "early_start": False})
    report = await place_call(voxd, burst(0.3), seconds=3)
    await stream_closed_within(report, 1.5)
    assert any("cannot reach Vapi" in r.getMessage() for r in caplog.records)


async def test_socket_drop_mid_call_closes_the_stream(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, _ = await vapi_voxd(VapiScript(drop_after=0.6))
    report = await place_call(voxd, burst(0.3), seconds=4)
    await stream_closed_within(report, 1.5)
    assert "reason=upstream-error" in await summary(voxd, caplog)
    assert any("Vapi connection closed (no close frame)" in r.getMessage() for r in caplog.records)


def calls_total(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("voxd_calls_total", {"outcome": outcome}) or 0.0


async def test_silent_vapi_is_declared_dead_by_the_keepalive(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    errors_before = calls_total("error")
    voxd, fake = await vapi_voxd(via_proxy=True,
                                 call={"keepalive_interval": 0.3, "keepalive_timeout": 0.3})

    async def freeze_after_connect():
        await fake.created.wait()
        await fake.last_call.connected.wait()
        await trio.sleep(0.2)
        fake.proxy.freeze()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(freeze_after_connect)
        report = await place_call(voxd, burst(0.3), seconds=4)
    await stream_closed_within(report, 1.5)
    assert "reason=upstream-keepalive-timeout" in await summary(voxd, caplog)
    assert calls_total("error") == errors_before + 1  # a failed call, not a completed one


async def test_garbage_control_messages_are_logged_and_ignored(vapi_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd, _ = await vapi_voxd(VapiScript(garbage=True))
    report = await place_call(voxd, np.concatenate([burst(0.4), silence(1.4)]))
    assert report.closed_by == "caller" and report.turns()[0].latency is not None
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert 1 <= len(warnings) <= 3  # bounded: a chatty peer cannot flood the log


async def test_rest_call_control_redirects_to_the_fallback_after_a_failure(
        vapi_voxd, nursery, caplog):
    caplog.set_level(logging.INFO)
    token = "rest-token"
    rest = FakeTwilioRest(account_sid="AC" + "7" * 32, auth_token=token)
    await nursery.start(rest.serve)
    voxd, _ = await vapi_voxd(
        VapiScript(drop_after=0.5),
        twilio={"rest_call_control": True, "account_sid": rest.account_sid,
                "api_base_url": rest.base_url})
    rest.auth_token = voxd.token  # voxd's Twilio auth token: signatures and REST alike
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    [update] = rest.updates
    assert update["call_sid"] == report.call_sid
    assert update["Twiml"].endswith("<Response><Say>Sorry, the assistant is unavailable right "
                                    "now.</Say></Response>")
    assert any("redirect to the fallback done" in r.getMessage() for r in caplog.records)


async def test_rest_call_control_hangs_up_after_a_normal_end(vapi_voxd, nursery):
    rest = FakeTwilioRest(account_sid="AC" + "7" * 32, auth_token="")
    await nursery.start(rest.serve)
    voxd, _ = await vapi_voxd(
        VapiScript(end_after=0.5),
        twilio={"rest_call_control": True, "account_sid": rest.account_sid,
                "api_base_url": rest.base_url})
    rest.auth_token = voxd.token
    report = await place_call(voxd, burst(0.3), seconds=4)
    assert report.closed_by == "voxd"
    [update] = rest.updates
    assert update["Status"] == "completed"  # no fallback apology after a goodbye


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def test_audio_faster_than_real_time_for_minutes_is_paced_and_bounded(vapi_voxd, caplog):
    """Vapi sends ten minutes of pcm16 (19 MB) at once: voxd queues call.playback_queue_seconds
    of it, then stops reading (backpressure to Vapi); the caller hears it in real time, voxd's
    memory does not grow with it, and the call ends cleanly."""
    caplog.set_level(logging.INFO)
    ten_minutes = np.random.default_rng(1).integers(-3000, 3000, 16000 * 600).astype("<i2")
    script = VapiScript(first_message=ten_minutes.tobytes(), burst=True)
    voxd, fake = await vapi_voxd(script, audio="pcm16", call={"playback_queue_seconds": 2.0})
    baseline = rss_bytes()
    peak = baseline

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_memory)
        report = await place_call(voxd, silence(4.0))
        nursery.cancel_scope.cancel()
    line = await summary(voxd, caplog)
    call = next(iter(fake.calls.values()))
    assert 150 <= report.media_received <= 215  # real time: 50 frames a second
    assert call.frames_out < 30000 // 2  # Vapi was held back, far from all 30000 frames
    assert peak - baseline < 10 * 2**20, (peak - baseline) / 2**20
    assert "reason=caller-hangup" in line, line
    print(f"frames from Vapi {call.frames_out}, heard {report.media_received}, "
          f"peak RSS growth {(peak - baseline) / 2**20:.1f} MB")

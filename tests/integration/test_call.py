"""Whole calls through a real voxd, placed by the simulator exactly as a user would."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import trio
import trio.testing

from tests.integration.audio import best_alignment, burst, silence, snr_db
from voxd.audio.g711 import ulaw_decode
from voxd.sim.caller import TwilioSimulator
from voxd.sim.demo import run_demo


def heard_pcm(report) -> np.ndarray:
    """The assistant audio voxd sent, in order (the simulated real-time playout,
    report.heard_frames, would also show a frame made late by CPU load as a gap)."""
    return ulaw_decode(np.frombuffer(bytes(report.received_audio), np.uint8))


def said_pcm(report) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(report.caller_frames), np.uint8))


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_echo_call_plays_the_caller_back(start_voxd, audio):
    voxd = await start_voxd(assistant={"audio": audio})
    utterance = burst(0.6)
    caller = np.concatenate([silence(0.2), utterance, silence(1.6)])
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)

    assert report.errors == []
    [turn] = report.turns()
    assert turn.latency is not None and 0.3 < turn.latency < 0.9  # echo waits ~500 ms
    said = said_pcm(report)[int(0.2 * 8000):int(0.8 * 8000)]
    heard = heard_pcm(report)
    lag, correlation = best_alignment(said, heard)
    echoed = heard[lag:lag + len(said)]
    assert correlation > 0.95
    if audio == "mulaw":
        # mu-law end to end: not one byte changed on the way.
        assert np.array_equal(echoed, said)
    else:
        # mu-law -> pcm16 16 kHz -> echo -> 8 kHz -> mu-law: two codec passes and a resampler.
        assert snr_db(said, echoed) > 25


async def test_demo_places_a_full_call_with_the_bundled_sample(tmp_path):
    report = await run_demo("pcm16")
    turns = report.turns()
    assert len(turns) == 2
    # the caller talks over the first echo: a barge-in, in the timeline
    assert report.clears == 1
    assert any(what.startswith("clear:") for _, what in report.events)
    assert sorted(report.voxd_latencies) == [1, 2]  # voxd's own figures came through
    assert all(t.latency is not None and t.latency < 1.0 for t in turns)
    assert report.closed_by == "caller" and report.errors == []
    out = tmp_path / "demo.wav"
    report.write_wav(out)
    import wave

    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 8000)
        assert wav.getnframes() == len(report.caller_frames) * 160


async def test_hang_up_mid_playback_ends_the_call_cleanly(start_voxd, caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd()
    before = trio.lowlevel.current_statistics().tasks_living
    # Speak 1 s, then hang up 0.5 s into the echo's 1 s playback.
    caller = np.concatenate([burst(1.0), silence(0.5)])
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(
        caller, seconds=2.0)
    assert report.media_received > 0  # playback had started
    with trio.fail_after(1):  # torn down within 1 s of the hang-up
        await voxd.runtime.wait_idle()
    summaries = [r for r in caplog.records if r.getMessage().startswith("call ended")]
    assert len(summaries) == 1
    assert "reason=caller-hangup" in summaries[0].getMessage()
    await trio.testing.wait_all_tasks_blocked()
    assert trio.lowlevel.current_statistics().tasks_living <= before


async def test_twenty_concurrent_calls_all_complete(start_voxd):
    voxd = await start_voxd(assistant={"audio": "mulaw"})
    results = {}

    async def one(i: int) -> None:
        caller = np.concatenate([silence(0.1), burst(0.5, seed=i), silence(1.4)])
        results[i] = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert len(results) == 20
    for i, report in results.items():
        assert report.errors == []
        assert len(report.caller_frames) == 100
        said = said_pcm(report)[800:800 + 4000]
        _, correlation = best_alignment(said, heard_pcm(report))
        # each caller hears its own echo, not another call's
        assert correlation > 0.99, f"call {i}"
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()


async def test_no_task_outlives_its_call(start_voxd):
    voxd = await start_voxd()
    await trio.testing.wait_all_tasks_blocked()
    baseline = trio.lowlevel.current_statistics().tasks_living
    caller = np.concatenate([burst(0.4), silence(1.0)])
    for _ in range(3):
        await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)
    with trio.fail_after(1):
        await voxd.runtime.wait_idle()
    await trio.testing.wait_all_tasks_blocked()
    assert trio.lowlevel.current_statistics().tasks_living == baseline

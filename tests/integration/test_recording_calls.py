"""Recording on, with whole calls: the file's two channels are what the caller sent and heard,
and a disk that fails stops the recording, never the call."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import trio

from tests.integration.audio import burst, silence
from voxd.audio.g711 import ulaw_decode
from voxd.call.recording import RECORDING_ERRORS
from voxd.sim.caller import TwilioSimulator


async def wait_for(path: Path) -> None:
    for _ in range(100):
        if await trio.Path(path).exists():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 480) -> float:
    """The highest normalised correlation of `a` and `b` over lags of +-max_lag samples."""
    n = min(len(a), len(b))
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 8):
        x, y = (a[lag:], b[:n - lag]) if lag >= 0 else (a[:n + lag], b[-lag:])
        denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
        if denominator:
            best = max(best, float(np.dot(x, y) / denominator))
    return best


async def test_a_recorded_call_holds_what_the_caller_said_and_heard(start_voxd, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.INFO)
    voxd = await start_voxd(recording={"enabled": True, "directory": str(tmp_path),
                                       "format": "wav",
                                       "announce": "<Say>This call is recorded.</Say>"})
    simulator = TwilioSimulator(voxd.webhook, auth_token=voxd.token)
    caller = np.concatenate([burst(0.6, seed=1), silence(1.4), burst(0.5, seed=2)])
    report = await simulator.call(caller, seconds=5)
    path = tmp_path / f"{report.call_sid}.wav"
    await wait_for(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    audio, rate = sf.read(path, dtype="int16")
    assert rate == 8000 and audio.shape[1] == 2
    said = ulaw_decode(np.frombuffer(b"".join(report.caller_frames), np.uint8))
    heard = ulaw_decode(np.frombuffer(b"".join(report.heard_frames), np.uint8))
    assert abs(len(audio) - len(said)) <= 160  # as long as the caller's side
    assert np.array_equal(audio[:len(said), 0], said[:len(audio)])  # left: exactly the caller
    assert np.abs(heard).max() > 1000  # the echo was heard ...
    assert best_correlation(audio[:, 1], heard) > 0.9  # ... and recorded on the right


async def test_a_failing_disk_stops_the_recording_not_the_call(start_voxd, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the directory should be")
    before = RECORDING_ERRORS._value.get()
    voxd = await start_voxd(recording={"enabled": True, "directory": str(blocker / "rec")})
    caller = np.concatenate([burst(0.4), silence(1.4)])
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller, 3)
    assert report.closed_by == "caller" and report.turns()[0].latency is not None
    for _ in range(60):  # the writer thread reports it
        if RECORDING_ERRORS._value.get() != before:
            break
        await trio.sleep(0.05)
    assert RECORDING_ERRORS._value.get() == before + 1
    assert any("reason=caller-hangup" in r.getMessage() for r in caplog.records)


async def test_the_consent_notice_plays_before_the_stream(start_voxd, tmp_path):
    import xml.etree.ElementTree as ET

    import httpx

    notice = "<Say>This call is recorded.</Say>"
    voxd = await start_voxd(signed=False, recording={"enabled": True, "announce": notice,
                                                     "directory": str(tmp_path)})
    async with httpx.AsyncClient() as client:
        answer = await client.post(voxd.webhook, data={"CallSid": "CA" + "5" * 32})
    assert [v.tag for v in ET.fromstring(answer.text)] == ["Say", "Connect"]


def test_recording_config_is_checked():
    import pytest

    from voxd.config import parse_config
    from voxd.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"recording": {"enabled": True, "format": "mp3", "announce": "<Say>",
                                    "keep_days": -1}})
    found = caught.value.problems
    assert any(p.startswith("recording.format:") for p in found)
    assert any(p.startswith("recording.keep_days:") for p in found)
    assert any(p.startswith("recording.announce: not valid TwiML") for p in found)

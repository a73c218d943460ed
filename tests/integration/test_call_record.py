"""A recorded call's record, end to end: the simulator calls a real voxd with recording on;
`<CallSid>.jsonl` lands next to the audio with the call's timeline, the assistant's final
transcripts (Vapi's and a generic assistant's), keys as "pressed", who answered; and
`voxd show` prints it and draws it, run as a user runs it."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio

from tests.fakes.vapi import FakeVapi, VapiScript
from tests.fakes.ws_assistant import FakeAssistant
from tests.integration.audio import burst, silence
from voxd.call_record import (
    AnsweredByEvent,
    BargeIn,
    Ended,
    Event,
    Pressed,
    Started,
    Transcribed,
    Turn,
    read_record,
)
from voxd.sim.caller import CallReport, TwilioSimulator

# the caller speaks, waits for the echo, speaks again, then talks over the second echo
CALLER = np.concatenate([burst(0.8, seed=1), silence(1.4), burst(0.6, seed=2), silence(0.9),
                         burst(0.5, seed=3), silence(1.8)])


async def record_of(directory: Path, call_sid: str) -> list[Event]:
    path = directory / f"{call_sid}.jsonl"
    for _ in range(100):
        if await trio.Path(path).exists():
            return read_record(path)
        await trio.sleep(0.05)
    raise AssertionError(f"{path} was not written")


async def summary_line(voxd: Any, caplog: pytest.LogCaptureFixture) -> str:
    with trio.fail_after(3):
        await voxd.runtime.wait_idle()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ended")]
    return line


def recording(directory: Path, **more: object) -> dict[str, object]:
    return {"enabled": True, "directory": str(directory), "format": "wav", **more}


async def echo_call(start_voxd: Any, directory: Path, *, dtmf: list[tuple[str, float]] = (),
                    **sections: dict[str, object]) -> tuple[Any, CallReport]:
    voxd = await start_voxd(recording=recording(directory), **sections)
    simulator = TwilioSimulator(voxd.webhook, auth_token=voxd.token)
    report = await simulator.call(CALLER, seconds=len(CALLER) / 8000, dtmf=list(dtmf))
    return voxd, report


async def test_a_recorded_call_leaves_its_record_next_to_the_audio(start_voxd, tmp_path,
                                                                   caplog):
    caplog.set_level(logging.INFO)
    voxd, report = await echo_call(start_voxd, tmp_path)
    events = await record_of(tmp_path, report.call_sid)
    path = tmp_path / f"{report.call_sid}.jsonl"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / f"{report.call_sid}.wav").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]

    start, end = events[0], events[-1]
    assert isinstance(start, Started) and isinstance(end, Ended)
    assert start.call_sid == report.call_sid and start.stream_sid == report.stream_sid
    assert start.from_number == "+15005550006" and start.assistant == "echo"
    assert start.at.endswith("+00:00")
    turns = [e for e in events if isinstance(e, Turn)]
    assert len(turns) >= 2 and all(e.latency_ms > 0 for e in turns)
    assert [e.turn for e in turns] == list(range(1, len(turns) + 1))
    barge_ins = [e for e in events if isinstance(e, BargeIn)]
    assert len(barge_ins) == 1 and barge_ins[0].source == "vad" and barge_ins[0].heard_ms > 0
    times = [e.t for e in events]
    assert times == sorted(times)

    line = await summary_line(voxd, caplog)
    assert f"reason={end.reason} " in line + " " and end.reason == "caller-hangup"
    assert f"turns={end.turns} " in line and end.turns == len(turns)
    assert f"latency_p50={end.latency_p50_ms}ms" in line
    assert f"barge_ins={end.barge_ins} " in line and f"frames_in={end.frames_in} " in line

    # the marks sit on the waveform: each answer is heard just after its turn's time
    audio, rate = sf.read(tmp_path / f"{report.call_sid}.wav", dtype="int16")
    assert rate == 8000
    loud = np.abs(audio[:, 1].astype(np.int32)).reshape(-1, 160).max(axis=1) > 1000
    for turn in turns:
        slot = round(turn.t / 0.02)
        onset = slot + int(np.argmax(loud[slot:]))
        assert 0 <= (onset - slot) * 0.02 <= 0.2, (turn, onset * 0.02)
        assert not loud[max(0, slot - 10):slot].any()  # silence before it: the answer starts


async def test_keys_are_pressed_without_digits_unless_logged(start_voxd, tmp_path):
    presses = [("4", 0.3), ("7", 0.5)]
    _, report = await echo_call(start_voxd, tmp_path / "a", dtmf=presses)
    pressed = [e for e in await record_of(tmp_path / "a", report.call_sid)
               if isinstance(e, Pressed)]
    assert [(e.digits, round(e.t, 1)) for e in pressed] == [(None, 0.3), (None, 0.5)]
    raw = (tmp_path / "a" / f"{report.call_sid}.jsonl").read_text()
    assert '"digits"' not in raw

    _, report = await echo_call(start_voxd, tmp_path / "b", dtmf=presses,
                                keypad={"log_digits": True})
    pressed = [e for e in await record_of(tmp_path / "b", report.call_sid)
               if isinstance(e, Pressed)]
    assert [e.digits for e in pressed] == ["4", "7"]


@pytest.mark.parametrize("transcripts", [True, False])
async def test_vapi_final_transcripts_go_into_the_record(start_voxd, nursery, tmp_path,
                                                         transcripts):
    fake = FakeVapi(VapiScript(transcripts=True))
    await nursery.start(fake.serve)
    voxd = await start_voxd(secrets={"vapi_api_key": "vapi-test-key"},
                            assistant={"provider": "vapi", "audio": "mulaw"},
                            vapi={"base_url": fake.base_url, "assistant_id": "asst-123"},
                            recording=recording(tmp_path, transcripts=transcripts))
    caller = np.concatenate([burst(0.6, seed=4), silence(2.0)])
    report = await TwilioSimulator(voxd.webhook, auth_token=voxd.token).call(caller)
    events = await record_of(tmp_path, report.call_sid)
    said = [(e.role, e.text) for e in events if isinstance(e, Transcribed)]
    if transcripts:  # finals only: no partial, no role that is not a party to the call
        assert said == [("user", "caller utterance 1"), ("assistant", "reply 1")]
    else:
        assert said == []
    assert any(isinstance(e, Turn) for e in events)


async def test_a_generic_assistant_transcribes_and_hears_who_answered(start_voxd, nursery,
                                                                      tmp_path):
    fake = FakeAssistant(messages_at=[
        (0.2, {"type": "transcript", "role": "assistant", "text": "Hello\x1b[2J there"}),
        (0.3, {"type": "transcript", "role": "robot", "text": "ignored"}),
    ])
    await nursery.start(fake.serve)
    voxd = await start_voxd(assistant={"provider": "websocket", "audio": "mulaw"},
                            websocket={"url": fake.url}, recording=recording(tmp_path))
    # an outbound call (only those hear answering-machine verdicts)
    simulator = TwilioSimulator(voxd.webhook, auth_token=voxd.token, direction="outbound-api")
    async with trio.open_nursery() as calls:
        calls.start_soon(simulator.call, silence(1.5))
        for _ in range(250):  # until the stream has started (the record with it)
            if any(s.record is not None for s in voxd.runtime.calls):
                break
            await trio.sleep(0.02)
        [session] = voxd.runtime.calls
        session.answered_by("machine_end_beep")
    events = await record_of(tmp_path, simulator.call_sid)
    assert [(e.role, e.text) for e in events if isinstance(e, Transcribed)] == \
        [("assistant", "Hello\x1b[2J there")]
    [answered] = [e for e in events if isinstance(e, AnsweredByEvent)]
    assert answered.value == "machine_end_beep" and answered.t < 1.0
    assert {"type": "answered-by", "value": "machine_end_beep"} in fake.control_in


async def voxd_show(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "voxd", "show", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_voxd_show_prints_the_timeline_and_draws_it(start_voxd, tmp_path):
    _, report = await echo_call(start_voxd, tmp_path, dtmf=[("5", 4.4)])
    await record_of(tmp_path, report.call_sid)
    done = await voxd_show(report.call_sid, "--directory", str(tmp_path))
    out = done.stdout.decode()
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    assert out.startswith(f"call {report.call_sid}  stream {report.stream_sid}")
    assert "turn 1: the assistant answers, " in out and "barge-in (vad): the caller heard " in out
    assert "keypad: pressed\n" in out and "call ended: caller-hangup" in out

    picture = tmp_path / "call.png"
    done = await voxd_show(report.call_sid, "--directory", str(tmp_path), "--plot",
                           str(picture))
    if done.returncode == 2 and b"pip install 'voxd[plot]'" in done.stderr:
        pytest.skip("matplotlib is not installed (the plot extra)")
    assert done.returncode == 0, done.stderr
    data = picture.read_bytes()
    width, height = png_size(data)
    assert width >= 1000 and height >= 500 and len(data) > 20_000

    done = await voxd_show("CA" + "0" * 32, "--directory", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.decode() == f"voxd: no record of CA{'0' * 32} in {tmp_path}\n"
    done = await voxd_show("../" + report.call_sid, "--directory", str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith(b"voxd: not a CallSid")


async def test_voxd_show_finds_the_directory_in_the_config(start_voxd, tmp_path):
    _, report = await echo_call(start_voxd, tmp_path)
    await record_of(tmp_path, report.call_sid)
    config = tmp_path / "voxd.toml"
    # a config whose secrets are not at hand (signatures on, no auth token): show needs none
    config.write_text(f'[recording]\nenabled = true\ndirectory = "{tmp_path}"\n'
                      '[twilio]\nvalidate_signatures = true\n')
    done = await voxd_show(report.call_sid, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert json.dumps(report.call_sid)[1:-1] in done.stdout.decode()
    elsewhere = tmp_path / "empty.toml"
    elsewhere.write_text(f'[recording]\ndirectory = "{tmp_path / "none"}"\n')
    done = await voxd_show(report.call_sid, "--config", str(elsewhere))
    assert done.returncode == 1
    assert done.stderr.decode() == (f"voxd: no record of {report.call_sid} in "
                                    f"{tmp_path / 'none'} (recording.enabled is false?)\n")

"""Call recordings: the file holds what the caller said and heard, slot for slot, and a failing
disk stops the recording, never the call."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

import numpy as np
import pytest
import soundfile as sf
import trio

from voxd.audio.g711 import ulaw_decode, ulaw_encode
from voxd.call import recording
from voxd.call.recording import (
    BATCH_SLOTS,
    FRAME_BYTES,
    CallRecorder,
    RecordingRefused,
    RecordingWriter,
    sweep,
)
from voxd.observability.metrics import REGISTRY

SID = "CA" + "0123456789abcdef" * 2
SILENCE = b"\xff" * FRAME_BYTES
DAY = 86400.0


@pytest.fixture
def writer():
    """A writer thread of the test's own, stopped (after writing what is queued) at the end."""
    w = RecordingWriter()
    yield w
    w.stop(10)


def voice(seconds: float, seed: int, f0: float) -> list[bytes]:
    """Speech-like mu-law frames: a few harmonics under a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 8000)) / 8000
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 0.05, t.size)
    codes = ulaw_encode((x / np.max(np.abs(x)) * 12000).astype(np.int16)).tobytes()
    return [codes[i:i + FRAME_BYTES] for i in range(0, len(codes), FRAME_BYTES)]


def pcm(frames: list[bytes]) -> np.ndarray:
    return ulaw_decode(np.frombuffer(b"".join(frames), np.uint8))


def errors_counted() -> float:
    return REGISTRY.get_sample_value("voxd_recording_errors_total") or 0.0


def stop_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "voxd.call.recording" and "stopped" in r.getMessage()]


@pytest.mark.parametrize("fmt", ["wav", "flac", "opus"])
async def test_the_file_holds_both_channels_slot_for_slot(tmp_path, writer, fmt):
    said = voice(3.5, seed=1, f0=140)  # 175 slots: several batches and a partial one
    reply = voice(2.0, seed=2, f0=220)  # plays in slots 30..129
    recorder = CallRecorder(tmp_path, SID, fmt, writer=writer)
    for slot, frame in enumerate(said):
        recorder.caller(frame)
        ahead = slot + 5  # the call learns of a frame shortly before it plays
        if 30 <= ahead < 130:
            recorder.heard(reply[ahead - 30], ahead)
    assert await recorder.aclose() == tmp_path / f"{SID}.{fmt}"

    data, rate = sf.read(tmp_path / f"{SID}.{fmt}", dtype="int16")
    assert rate == 8000 and data.shape == (len(said) * FRAME_BYTES, 2)
    left = pcm(said)
    right = pcm([SILENCE] * 30 + reply + [SILENCE] * 45)
    if fmt == "opus":  # lossy: the same sound, not the same samples
        for got, want in ((data[:, 0], left), (data[:, 1], right)):
            assert np.corrcoef(got.astype(float), want.astype(float))[0, 1] > 0.9
        assert np.abs(data[:30 * FRAME_BYTES - 400, 1]).max() < 300  # silence stays silent
    else:
        assert np.array_equal(data[:, 0], left)
        assert np.array_equal(data[:, 1], right)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SID}.{fmt}"]  # no .part left


async def test_a_clear_takes_back_what_had_not_played(tmp_path, writer):
    a, b = voice(1.0, seed=3, f0=200), voice(0.4, seed=4, f0=300)
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(40):
        recorder.caller(SILENCE)
    for i in range(50):  # an answer queued ahead for slots 50..99
        recorder.heard(a[i], 50 + i)
    for _ in range(20):
        recorder.caller(SILENCE)  # caller slots 40..59 (50..59 played)
    assert recorder.slots == 60
    assert recorder.unheard(60) == 40  # barge-in at slot 60: 60..99 never played
    recorder.heard(a[0], 59)  # a slot already taken: dropped
    for i in range(20):  # the next answer starts at slot 70
        recorder.heard(b[i], 70 + i)
    recorder.heard(a[0], 75)  # earlier than the last slot accepted: dropped
    for _ in range(40):
        recorder.caller(SILENCE)
    recorder.heard(a[0], 99)  # already handed to the writer: dropped
    assert await recorder.aclose() is not None

    data, _ = sf.read(tmp_path / f"{SID}.wav", dtype="int16")
    expected = [SILENCE] * 50 + a[:10] + [SILENCE] * 10 + b[:20] + [SILENCE] * 10
    assert np.array_equal(data[:, 1], pcm(expected))
    assert not data[:, 0].any()


async def test_heard_frames_beyond_the_callers_timeline_are_not_written(tmp_path, writer):
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    frame = voice(0.02, seed=5, f0=200)[0]
    for slot in range(10):
        recorder.caller(SILENCE)
        recorder.heard(frame, slot + 3)
    assert await recorder.aclose() is not None
    data, _ = sf.read(tmp_path / f"{SID}.wav", dtype="int16")
    assert np.array_equal(data[:, 1], pcm([SILENCE] * 3 + [frame] * 7))


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
async def test_only_voxd_may_read_a_recording(tmp_path, writer, umask):
    old = os.umask(umask)
    try:
        recorder = CallRecorder(tmp_path / "rec", SID, "flac", writer=writer)
        for _ in range(BATCH_SLOTS + 7):
            recorder.caller(SILENCE)
        path = await recorder.aclose()
    finally:
        os.umask(old)
    assert path is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0  # made by voxd: 0700


async def test_many_calls_share_one_writer(tmp_path, writer):
    sids = [f"CA{n:032x}" for n in range(1, 6)]
    recorders = [CallRecorder(tmp_path, sid, "wav", writer=writer) for sid in sids]
    said = voice(1.5, seed=6, f0=150)
    for frame in said:
        for recorder in recorders:
            recorder.caller(frame)
    paths = [await recorder.aclose() for recorder in recorders]
    assert paths == [tmp_path / f"{sid}.wav" for sid in sids]
    for path in paths:
        assert np.array_equal(sf.read(path, dtype="int16")[0][:, 0], pcm(said))


async def test_a_cancelled_close_still_completes_the_file(tmp_path, writer):
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(BATCH_SLOTS + 10):
        recorder.caller(SILENCE)
    with trio.CancelScope() as scope:
        scope.cancel()  # the call's nursery is going away
        await recorder.aclose()
    assert scope.cancelled_caught
    await trio.to_thread.run_sync(writer.stop, 10)
    assert sf.info(tmp_path / f"{SID}.wav").frames == (BATCH_SLOTS + 10) * FRAME_BYTES


async def test_the_process_writer_is_used_by_default(tmp_path):
    recorder = CallRecorder(tmp_path, SID, "flac")
    for _ in range(BATCH_SLOTS):
        recorder.caller(SILENCE)
    recorder.close()  # the sync form: hands off, returns at once
    path = await CallRecorder(tmp_path, "CA" + "f" * 32, "flac").aclose()
    assert path is not None  # same thread, queued behind the first: both are done
    assert sf.info(tmp_path / f"{SID}.flac").frames == BATCH_SLOTS * FRAME_BYTES


async def test_a_full_disk_stops_the_recording_once_not_the_call(
        tmp_path, writer, monkeypatch, caplog):
    failed = threading.Event()

    def disk_full(self, data):
        failed.set()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sf.SoundFile, "write", disk_full)
    before = errors_counted()
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(BATCH_SLOTS):
        recorder.caller(SILENCE)  # the first batch goes to the writer, which fails
    assert await trio.to_thread.run_sync(failed.wait, 10)
    for _ in range(20 * BATCH_SLOTS):  # the call goes on: feeding returns, does nothing
        recorder.caller(SILENCE)
        recorder.heard(SILENCE, recorder.slots)
    assert not recorder.recording
    assert await recorder.aclose() is None

    await trio.to_thread.run_sync(writer.stop, 10)  # let it finish cleaning up
    lines = stop_lines(caplog)
    assert len(lines) == 1 and SID in lines[0] and "disk full" in lines[0]
    assert errors_counted() == before + 1
    assert recorder.problem is not None and "disk full" in recorder.problem
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


async def test_libsndfile_failing_on_a_full_disk_says_so(tmp_path, writer, monkeypatch, caplog):
    real_open = os.open

    def full_disk(path, flags, mode=0o777, **kwargs):  # every write(2) fails with ENOSPC
        if str(path).startswith(str(tmp_path)):
            return real_open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(recording.os, "open", full_disk)
    monkeypatch.setattr(recording.os, "fchmod", lambda fd, mode: None)
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(3 * BATCH_SLOTS):
        recorder.caller(SILENCE)
    assert await recorder.aclose() is None
    await trio.to_thread.run_sync(writer.stop, 10)
    lines = stop_lines(caplog)
    assert len(lines) == 1 and "disk full" in lines[0], lines


async def test_an_unwritable_directory_stops_the_recording(
        tmp_path, writer, monkeypatch, caplog):
    real_open = os.open

    def no_permission(path, *args, **kwargs):  # as for a non-root voxd (tests run as root)
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(recording.os, "open", no_permission)
    before = errors_counted()
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(BATCH_SLOTS + 1):
        recorder.caller(SILENCE)
    assert await recorder.aclose() is None
    assert errors_counted() == before + 1
    assert "permission denied" in stop_lines(caplog)[0]


async def test_a_slow_disk_bounds_the_backlog_and_never_blocks_feeding(
        tmp_path, writer, monkeypatch, caplog):
    release, blocked = threading.Event(), threading.Event()
    write = sf.SoundFile.write

    def slow(self, data):
        blocked.set()
        release.wait(30)
        write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", slow)
    before = errors_counted()
    recorder = CallRecorder(tmp_path, SID, "wav", max_backlog_seconds=2.0, writer=writer)
    try:
        for _ in range(BATCH_SLOTS):
            recorder.caller(SILENCE)
        assert await trio.to_thread.run_sync(blocked.wait, 10)  # the writer is stuck
        for _ in range(BATCH_SLOTS):  # 2 s waiting: at the bound, still recording
            recorder.caller(SILENCE)
        assert recorder.recording
        for _ in range(BATCH_SLOTS):  # 3 s: over it
            recorder.caller(SILENCE)
        assert not recorder.recording
        for _ in range(10 * BATCH_SLOTS):  # and the call goes on, the writer still stuck
            recorder.caller(SILENCE)
        assert not release.is_set()
    finally:
        release.set()
    assert await recorder.aclose() is None
    lines = stop_lines(caplog)
    assert len(lines) == 1 and SID in lines[0] and "writer falling behind" in lines[0]
    assert errors_counted() == before + 1
    await trio.to_thread.run_sync(writer.stop, 10)
    assert list(tmp_path.iterdir()) == []


async def test_heard_audio_piling_up_ahead_is_bounded_too(tmp_path, writer, caplog):
    recorder = CallRecorder(tmp_path, SID, "wav", max_backlog_seconds=1.0, writer=writer)
    for slot in range(60):  # no caller frames arrive: nothing is handed off
        recorder.heard(SILENCE, slot)
    assert not recorder.recording
    assert "assistant audio" in stop_lines(caplog)[0]


async def test_a_recording_with_no_audio_is_an_empty_file(tmp_path, writer):
    path = await CallRecorder(tmp_path, SID, "wav", writer=writer).aclose()
    assert path is not None and sf.info(path).frames == 0


@pytest.mark.parametrize("sid", [
    "CA123", "CA" + "0" * 31, "CA" + "0" * 33, "CA" + "ABCDEF01" * 4, "CA" + "g" * 32,
    "../" + SID, SID + "/x", "MZ" + "0" * 32, "", "CA" + "0" * 31 + "\n",
])
def test_a_malformed_call_sid_is_refused(tmp_path, sid):
    with pytest.raises(RecordingRefused, match="not a CallSid"):
        CallRecorder(tmp_path, sid, "wav")


def test_an_unknown_format_or_bound_is_refused(tmp_path):
    with pytest.raises(RecordingRefused, match="format"):
        CallRecorder(tmp_path, SID, "mp3")  # type: ignore[arg-type]
    with pytest.raises(RecordingRefused, match="max_backlog_seconds"):
        CallRecorder(tmp_path, SID, "wav", max_backlog_seconds=0)


def test_sweep_deletes_old_recordings_and_their_records(tmp_path, monkeypatch, caplog):
    now = 1_800_000_000.0
    sid = [f"CA{n:032x}" for n in range(6)]

    def make(name: str, age_days: float) -> None:
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (now - age_days * DAY, now - age_days * DAY))

    make(f"{sid[0]}.wav", 40)
    make(f"{sid[0]}.jsonl", 29)  # a companion written a little later goes with it
    make(f"{sid[1]}.opus", 31)
    make(f"{sid[2]}.flac", 10)  # young: kept
    make(f"{sid[2]}.jsonl", 10)
    make(f"{sid[3]}.jsonl", 45)  # a record without audio, old
    make(f".{sid[4]}.1a2b3c4d.part", 2)  # left by a process that died
    make(f".{sid[5]}.1a2b3c4d.part", 0.01)  # a call being recorded now
    make("notes.wav", 400)  # not voxd's: never touched
    make(f"{sid[0]}.wav.bak", 400)
    (tmp_path / f"{sid[1]}.wav").mkdir()
    assert sweep(tmp_path, 30, now) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f"{sid[1]}.wav", f"{sid[2]}.flac", f"{sid[2]}.jsonl", f".{sid[5]}.1a2b3c4d.part",
        "notes.wav", f"{sid[0]}.wav.bak"])

    assert sweep(tmp_path / "nothing-recorded-yet", 30, now) == 0
    make(f"{sid[2]}.wav", 90)

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(recording.os, "unlink", refuse)
    with caplog.at_level(logging.WARNING, logger="voxd.call.recording"):
        assert sweep(tmp_path, 30, now) == 0
    assert any("cannot delete" in r.getMessage() and sid[2] in r.getMessage()
               for r in caplog.records)


# -- the call's record, written next to the audio ----------------------------------------------

RECORD = b'{"event":"start","t":0.0,"call_sid":"CA","stream_sid":"MZ"}\n'


@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_the_record_lands_next_to_the_audio_for_voxd_alone(tmp_path, writer, umask):
    old = os.umask(umask)
    try:
        recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
        for _ in range(BATCH_SLOTS + 3):
            recorder.caller(SILENCE)
        assert await recorder.aclose(RECORD) == tmp_path / f"{SID}.wav"
    finally:
        os.umask(old)
    path = tmp_path / f"{SID}.jsonl"
    assert path.read_bytes() == RECORD  # written by the time aclose returns
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SID}.jsonl", f"{SID}.wav"]
    recorder.close(b"again")  # once only
    await trio.to_thread.run_sync(writer.stop, 10)
    assert path.read_bytes() == RECORD


async def test_the_record_is_written_when_the_audio_stopped_early(tmp_path, writer, caplog):
    recorder = CallRecorder(tmp_path, SID, "wav", max_backlog_seconds=1.0, writer=writer)
    for slot in range(60):  # the audio stops: assistant audio piling up ahead
        recorder.heard(SILENCE, slot)
    assert not recorder.recording
    assert await recorder.aclose(RECORD) is None
    assert [p.name for p in tmp_path.iterdir()] == [f"{SID}.jsonl"]


async def test_a_failing_disk_counts_once_for_audio_and_record(
        tmp_path, writer, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    real_open = os.open

    def full(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(recording.os, "open", full)
    before = errors_counted()
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    for _ in range(BATCH_SLOTS + 1):
        recorder.caller(SILENCE)
    assert await recorder.aclose(RECORD) is None
    assert errors_counted() == before + 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    assert any("record of call" in r.getMessage() and "disk full" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)
    assert list(tmp_path.iterdir()) == []


async def test_a_record_that_cannot_be_written_alone_is_reported(
        tmp_path, writer, monkeypatch, caplog):
    real_replace = os.replace

    def no_jsonl(src, dst, *args, **kwargs):
        if str(dst).endswith(".jsonl"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(recording.os, "replace", no_jsonl)
    before = errors_counted()
    recorder = CallRecorder(tmp_path, SID, "wav", writer=writer)
    assert await recorder.aclose(RECORD) == tmp_path / f"{SID}.wav"  # the audio is fine
    assert errors_counted() == before + 1
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith(f"record of call {SID} not written: I/O error")
    assert [p.name for p in tmp_path.iterdir()] == [f"{SID}.wav"]  # no temporary file left

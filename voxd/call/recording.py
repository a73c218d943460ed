"""Call recordings: one stereo file per call, written off the event loop.

Theory of operation
-------------------
A `CallRecorder` belongs to one call. The call feeds it two channels, both indexed by 20 ms
*slots* counted from the start of the media stream:

- `caller(frame)`: the next caller frame; the n-th call fills slot n, so the caller's frames
  *are* the recording's timeline (a frame Twilio never sent is a slot that never happens; the
  call feeds silence for a gap it wants kept).
- `heard(frame, slot)`: an assistant frame that plays to the caller in `slot` (the call computes
  the slot from Twilio's playback position). Slots nobody fills are silence. Slots only move
  forward: a frame for a slot at or before the last one accepted, or for a slot already handed
  to the writer, is dropped.
- `unheard(from_slot)`: a barge-in's `clear` means frames queued for `from_slot` and later
  never played: they are removed, and those slots may be filled again.

Heard frames wait in the recorder until the caller's timeline passes their slot, so `unheard`
can still take them back; frames whose slot lies beyond the last caller frame when the call
ends are not written (the recording is as long as the caller's side).

Hand-off. Feeding a frame is a list or deque append and a length check: no lock, no numpy, no
I/O. Every `BATCH_SLOTS` caller frames (one second) the recorder hands the batch to the
process's `RecordingWriter` (one `SimpleQueue.put`). The writer thread decodes mu-law, lays
out the two channels and writes them with libsndfile (`soundfile`), whose calls run without
the GIL. One thread per process, not per call: a batch is one second of audio, a few
microseconds of work for WAV, so one thread keeps up with hundreds of calls; a thread per call
would cost a stack and a wake-up each for nothing, and every call's recording goes to the same
disk anyway, so a slow disk is slow for all of them alike.

Bounds and failures. The queue is bounded per call, in audio: a call whose audio handed to the
writer but not yet written, plus a new batch, would exceed `max_backlog_seconds` (or whose
heard frames waiting for their slot would) stops recording. So does a write that fails (disk
full, I/O error, permission). Either way: one WARNING line naming the call and the problem,
`voxd_recording_errors_total` counted once, the partial file deleted (a recording is complete
or absent), and every later `caller`/`heard` call returns at once doing nothing. The call
itself never notices: no method here raises once the recorder is built.

Files. `<directory>/<CallSid>.<ext>`: stereo, 8 kHz, left = caller, right = what the caller
heard; `wav` is PCM16, `flac` is FLAC (16 bit), `opus` is Ogg/Opus (libsndfile 1.2 encodes
8 kHz Opus directly, so nothing is resampled). It is written under a temporary hidden name
(`.<CallSid>.<random>.part`, created 0600 whatever the umask) and renamed into place once
complete. `sweep` removes recordings and their `.jsonl` companions past their retention.

The call's record. `close(record)` also hands the writer the call's record (`voxd.call_record`,
JSON Lines, serialised on the event loop: a few kB, once per call), which it writes after the
audio as `<CallSid>.jsonl`, the same way (hidden temporary name, 0600, fsync, rename). It is
written even when the audio stopped early (a slow writer or a full disk may have recovered;
the timeline is still worth having). A call's recording, audio and record, counts one
failure at most: a record that cannot be written is one WARNING and one
`voxd_recording_errors_total` unless the audio's failure was reported already (then one INFO
line).

Costs, measured on the project's 2-core machine (Python 3.11, libsndfile 1.2.2):
- on the event loop, per 20 ms frame, with timeit (best of 7 runs of 50,000 frames, the
  once-a-second hand-off to a live writer thread included): `caller()` 0.09 us, `heard()`
  0.11 us, one of each 0.26 us; the budget is 2 us.
- in the writer thread, CPU per second of call audio: WAV 0.17 ms, FLAC 0.45 ms, Opus 13-15 ms
  (libopus at its default complexity: libsndfile's compression level, measured, changes the
  bitrate, not the CPU cost). So one writer thread keeps up with over a thousand WAV or FLAC
  calls but only ~65 Opus calls: past that, their recordings stop as "writer falling behind"
  while the calls go on.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import logging
import os
import queue
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import soundfile as sf
import trio
from prometheus_client import Counter

from voxd.audio.g711 import DECODE_TABLE, ULAW_SILENCE
from voxd.audio.line import FRAME_BYTES, FRAME_SECONDS, SAMPLE_RATE
from voxd.errors import VoxdError
from voxd.observability.metrics import REGISTRY
from voxd.twilio.stream_token import CALL_SID

__all__ = [
    "AVAILABLE",
    "BATCH_SLOTS",
    "FORMATS",
    "RECORDING_ERRORS",
    "CallRecorder",
    "RecordingFormat",
    "RecordingRefused",
    "RecordingWriter",
    "sweep",
]

log = logging.getLogger(__name__)

RecordingFormat = Literal["wav", "flac", "opus"]
FORMATS: Final[dict[str, tuple[str, str]]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "opus": ("OGG", "OPUS"),
}
"""recording.format -> (libsndfile major format, subtype); the key is also the file's suffix."""
AVAILABLE: Final = frozenset(fmt for fmt, (major, subtype) in FORMATS.items()
                             if sf.check_format(major, subtype))
"""The formats the installed libsndfile can write (Opus needs libsndfile >= 1.0.29; the
soundfile wheels bundle 1.2): check `recording.format` against it when reading the config."""

BATCH_SLOTS: Final = 50
"""Caller frames per hand-off to the writer (one second)."""
_SILENCE_FRAME: Final = bytes([ULAW_SILENCE]) * FRAME_BYTES
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_STALE_PART_SECONDS: Final = 86400.0
"""A temporary file untouched this long belongs to no live call (its process died): swept."""
_RECORDING_NAME: Final = re.compile(r"(CA[0-9a-f]{32})\.(wav|flac|opus|jsonl)")
_PART_NAME: Final = re.compile(r"\.CA[0-9a-f]{32}\.[0-9a-f]+\.part")

RECORDING_ERRORS = Counter(
    "voxd_recording_errors_total",
    "Call recordings stopped by a slow or failing disk (the calls went on)",
    registry=REGISTRY,
)


class RecordingRefused(VoxdError, ValueError):
    """A recorder cannot be built as asked: malformed CallSid, unknown format, bad bound."""


# --- the writer thread's side ---------------------------------------------------------------

_OPEN, _FAILED, _DONE = "open", "failed", "done"


class _Track:
    """One recording as the writer thread sees it. The file handles are the writer thread's
    alone; `state` changes under `_lock` (the first failure wins: one log line, one count);
    `written` is written by the writer thread only and read by the recorder."""

    def __init__(self, directory: Path, call_sid: str, fmt: str) -> None:
        self.directory = directory
        self.call_sid = call_sid
        self.fmt = fmt
        self.path = directory / f"{call_sid}.{fmt}"
        self.part = directory / f".{call_sid}.{secrets.token_hex(4)}.part"
        self.state = _OPEN
        self.problem: str | None = None
        self.written = 0  # caller slots written to the file
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.sound: sf.SoundFile | None = None  # open while being written
        self._opening = False

    def fail(self, problem: str) -> bool:
        """Stop this recording for `problem`; True for the first failure, which is reported."""
        with self._lock:
            if self.state != _OPEN:
                return False
            self.state = _FAILED
            self.problem = problem
        log.warning("recording of call %s stopped: %s", self.call_sid, problem)
        RECORDING_ERRORS.inc()
        return True

    # Everything below runs in the writer thread only.

    def _open(self) -> sf.SoundFile:
        self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = fd = os.open(self.part, flags, _FILE_MODE)
        os.fchmod(fd, _FILE_MODE)  # the umask may have taken bits away; never adds any
        major, subtype = FORMATS[self.fmt]
        self._opening = True  # a failure now is told by libsndfile's global error
        self.sound = sf.SoundFile(fd, "w", samplerate=SAMPLE_RATE, channels=2, format=major,
                                  subtype=subtype, closefd=False)
        self._opening = False
        return self.sound

    def describe(self, exc: BaseException) -> str:
        """What went wrong with this file, in words an operator acts on."""
        handle: object = None  # where libsndfile keeps the system error its exception loses
        with contextlib.suppress(Exception):  # soundfile's private handle: best effort
            if self.sound is not None and self.sound._file is not None:
                handle = self.sound._file
            elif self._opening:
                handle = sf._ffi.NULL
        return _describe(exc, handle)

    def write(self, start: int, caller: list[bytes], heard: list[tuple[int, bytes]]) -> None:
        """Write caller slots start.. (one per frame) with the heard frames in their slots."""
        n = len(caller)
        left = b"".join(caller)
        if len(left) != n * FRAME_BYTES:
            left = b"".join(_fit(frame) for frame in caller)
        right = bytearray(_SILENCE_FRAME * n)
        for slot, frame in heard:
            at = (slot - start) * FRAME_BYTES
            right[at:at + FRAME_BYTES] = _fit(frame)
        stereo = np.empty((n * FRAME_BYTES, 2), np.int16)
        stereo[:, 0] = DECODE_TABLE[np.frombuffer(left, np.uint8)]
        stereo[:, 1] = DECODE_TABLE[np.frombuffer(right, np.uint8)]
        sound = self.sound if self.sound is not None else self._open()
        sound.write(stereo)
        self.written += n

    def finish(self) -> Path:
        """Complete the file and rename it into place."""
        sound = self.sound if self.sound is not None else self._open()
        sound.close()
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.part, self.path)
        with self._lock:
            if self.state == _OPEN:
                self.state = _DONE
        return self.path

    def write_record(self, data: bytes) -> Path | None:
        """Write the call's record next to the audio (`<CallSid>.jsonl`) and rename it into
        place; its path, or None when it failed (reported here: see the module docstring)."""
        path = self.directory / f"{self.call_sid}.jsonl"
        part = self.directory / f".{self.call_sid}.{secrets.token_hex(4)}.part"
        fd: int | None = None
        created = False
        try:
            self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(part, flags, _FILE_MODE)
            created = True
            os.fchmod(fd, _FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(part, path)
            return path
        except OSError as exc:
            problem = _describe(exc)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if created:
                with contextlib.suppress(OSError):  # else `sweep` removes it a day later
                    os.unlink(part)
            if self.state == _FAILED:  # the call's recording failure was reported already
                log.info("record of call %s not written either: %s", self.call_sid, problem)
            else:
                log.warning("record of call %s not written: %s", self.call_sid, problem)
                RECORDING_ERRORS.inc()
            return None

    def discard(self) -> None:
        """Close and delete the partial file (after a failure); never raises."""
        sound, self.sound = self.sound, None
        fd, self._fd = self._fd, None
        self._opening = False
        if sound is not None:
            with contextlib.suppress(Exception):  # the failure was reported already
                sound.close()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            try:
                os.unlink(self.part)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("recording of call %s: cannot remove %s: %s",
                            self.call_sid, self.part, _describe(exc))


def _fit(frame: bytes) -> bytes:
    """`frame` cut or padded with silence to one slot."""
    if len(frame) == FRAME_BYTES:
        return frame
    return frame[:FRAME_BYTES].ljust(FRAME_BYTES, bytes([ULAW_SILENCE]))


_WORDS: Final = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def _describe(exc: BaseException, handle: object = None) -> str:
    """What went wrong, in words an operator acts on (`handle`: libsndfile's SNDFILE* that
    failed, or NULL for a failed open, whose message names the system error)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        words = _WORDS.get(exc.errno)
        detail = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        return f"{words} ({detail})" if words else detail
    if isinstance(exc, sf.LibsndfileError):
        detail = exc.error_string  # for a failed write(2) just "System error."
        if handle is not None:
            with contextlib.suppress(Exception):  # soundfile's private API: best effort
                detail = sf._ffi.string(sf._snd.sf_strerror(handle)).decode("utf-8", "replace")
        for code, words in _WORDS.items():
            if os.strerror(code) in detail:
                return f"{words} (libsndfile: {detail})"
        return f"libsndfile: {detail}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class _Batch:
    track: _Track
    start: int
    caller: list[bytes]
    heard: list[tuple[int, bytes]]


@dataclass(slots=True)
class _Finish:
    track: _Track
    notify: Callable[[Path | None], None] | None
    record: bytes | None = None
    """The call's record, written after the audio (`<CallSid>.jsonl`)."""


class RecordingWriter:
    """The thread that writes every recording of this process, fed through one queue.

    Started on first use (again in a forked child, which inherits no threads). It is a daemon
    thread, so a stuck disk never holds the process up at exit; the process's own writer is
    given 5 s at exit to write what is queued. A recording still open then stays a temporary
    file, which `sweep` removes a day later. `stop` ends the thread (tests; shutdown)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Batch | _Finish | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()

    def submit(self, item: _Batch | _Finish) -> None:
        """Queue `item` for the writer thread; never blocks (the bound is the recorder's)."""
        if self._pid != os.getpid() or self._thread is None:
            self._start()
        self._queue.put(item)

    def stop(self, timeout: float | None = None) -> None:
        """Write what is queued, then end the thread (waits up to `timeout` seconds)."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        self._queue.put(None)
        thread.join(timeout)
        self._thread = None

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            if self._pid != os.getpid():  # a forked child: the parent's queue is not ours
                self._queue = queue.SimpleQueue()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="voxd-recording-writer",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._handle(item)
            except Exception:  # a bug here must not end every call's recording
                log.exception("recording writer: unexpected error (call %s)",
                              item.track.call_sid)

    @staticmethod
    def _handle(item: _Batch | _Finish) -> None:
        track = item.track
        if isinstance(item, _Batch):
            if track.state != _OPEN:
                track.discard()
                return
            try:
                track.write(item.start, item.caller, item.heard)
            except Exception as exc:  # any failure stops this recording only
                track.fail(track.describe(exc))
                track.discard()
            return
        result: Path | None = None
        if track.state == _OPEN:
            try:
                result = track.finish()
            except Exception as exc:
                track.fail(track.describe(exc))
        if result is None:
            track.discard()
        if item.record is not None:
            track.write_record(item.record)
        if item.notify is not None:
            item.notify(result)


_process_writer = RecordingWriter()
atexit.register(_process_writer.stop, 5.0)  # an orderly exit writes what is queued


# --- the call's side --------------------------------------------------------------------------

class CallRecorder:
    """One call's recording: feed it frames from the call's tasks, close it when the call ends.

    Not thread-safe: one trio run (the call's) feeds it. Building it does no I/O; the file is
    created by the writer thread with the first batch."""

    def __init__(
        self,
        directory: Path,
        call_sid: str,
        fmt: RecordingFormat,
        *,
        max_backlog_seconds: float = 10.0,
        writer: RecordingWriter | None = None,
    ) -> None:
        if not isinstance(call_sid, str) or not CALL_SID.fullmatch(call_sid):
            raise RecordingRefused(f"not a CallSid: {call_sid!r} (CA and 32 hex digits)")
        if fmt not in AVAILABLE:
            raise RecordingRefused(f"recording format {fmt!r} is not one this libsndfile "
                                   f"writes ({', '.join(sorted(AVAILABLE))})")
        if not max_backlog_seconds > 0:
            raise RecordingRefused(f"max_backlog_seconds must be positive, got "
                                   f"{max_backlog_seconds!r}")
        self.call_sid = call_sid
        self.path = Path(directory) / f"{call_sid}.{fmt}"
        """Where the recording will be once complete."""
        self._track = _Track(Path(directory), call_sid, fmt)
        self._writer = writer if writer is not None else _process_writer
        self._limit = max(1, round(max_backlog_seconds / FRAME_SECONDS))
        self._batch = max(1, min(BATCH_SLOTS, self._limit // 2))
        self._caller: list[bytes] = []
        self._heard: collections.deque[tuple[int, bytes]] = collections.deque()
        self._flushed = 0  # caller slots handed to the writer
        self._heard_floor = -1  # heard() accepts only slots above this
        self._stopped = False  # closed or failed: feeding does nothing
        self._closed = False  # close() was called

    @property
    def slots(self) -> int:
        """Caller frames fed so far: the slot the next caller frame fills."""
        return self._flushed + len(self._caller)

    @property
    def recording(self) -> bool:
        """Frames fed now still go into the file (not closed, not stopped by a failure)."""
        return not self._stopped and self._track.state == _OPEN

    @property
    def problem(self) -> str | None:
        """Why the recording stopped early, if it did."""
        return self._track.problem

    def caller(self, frame: bytes) -> None:
        """The caller's next 20 ms mu-law frame (fills the next slot)."""
        if self._stopped:
            return
        frames = self._caller
        frames.append(frame)
        if len(frames) >= self._batch:
            self._hand_off()

    def heard(self, frame: bytes, slot: int) -> None:
        """A 20 ms mu-law frame of the assistant that plays to the caller in `slot`; dropped if
        `slot` is not after the last heard slot accepted (nor after the written part)."""
        if slot <= self._heard_floor or self._stopped:
            return
        self._heard_floor = slot
        pending = self._heard
        pending.append((slot, frame))
        if len(pending) > self._limit:
            self._stop(f"more than {self._limit * FRAME_SECONDS:g} s of assistant audio "
                       f"waiting for its slot")

    def unheard(self, from_slot: int) -> int:
        """Take back the frames given for `from_slot` and later (a `clear` kept them from
        playing); those slots may be filled again. Returns how many were removed. Slots already
        handed to the writer stay as written."""
        pending = self._heard
        removed = 0
        while pending and pending[-1][0] >= from_slot:
            pending.pop()
            removed += 1
        self._heard_floor = max(min(self._heard_floor, from_slot - 1), self._flushed - 1)
        return removed

    def close(self, record: bytes | None = None) -> None:
        """Hand the rest to the writer and have it finish the file, and write the call's
        `record` (JSON Lines) next to it, even if the audio stopped early; returns at once.
        Call it once: later calls do nothing."""
        self._close(None, record)

    async def aclose(self, record: bytes | None = None) -> Path | None:
        """`close`, then wait for the writer (never blocking the event loop; the record, if
        any, written too): the recording's path once it is complete and in place, or None if
        it stopped early. The finish is handed off before the first checkpoint, so bounding
        the wait (`trio.move_on_after`) or cancelling it leaves the file to be completed all
        the same."""
        if self._closed or (self._stopped and record is None):
            return None
        done = trio.Event()
        result: list[Path | None] = [None]
        token = trio.lowlevel.current_trio_token()

        def notify(path: Path | None) -> None:  # runs in the writer thread
            result[0] = path
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        if not self._close(notify, record):
            return None
        await done.wait()
        return result[0]

    def _close(self, notify: Callable[[Path | None], None] | None,
               record: bytes | None = None) -> bool:
        """Hand off the rest and the finish (with the record); False if there was nothing to
        hand off: closed already, or the recording had stopped and there is no record."""
        if self._closed:
            return False
        self._closed = True
        if not self._stopped and self._caller:
            self._hand_off()
        if self._stopped and record is None:  # stopped, or the last hand-off found it failed
            return False
        self._stopped = True
        self._heard.clear()  # beyond the caller's timeline: not recorded
        self._writer.submit(_Finish(self._track, notify, record))
        return True

    def _hand_off(self) -> None:
        """Give the writer the caller frames fed so far and the heard frames of their slots."""
        frames, self._caller = self._caller, []
        start = self._flushed
        end = self._flushed = start + len(frames)
        pending = self._heard
        heard = []
        while pending and pending[0][0] < end:
            heard.append(pending.popleft())
        if self._heard_floor < end - 1:
            self._heard_floor = end - 1
        track = self._track
        if track.state != _OPEN:  # the writer failed and said so; it discards the rest
            self._stopped = True
            self._heard.clear()
            return
        if self._flushed - track.written > self._limit:
            self._stop(f"writer falling behind (slow disk or encoder): more than "
                       f"{self._limit * FRAME_SECONDS:g} s of audio waiting to be written")
            return
        self._writer.submit(_Batch(track, start, frames, heard))

    def _stop(self, problem: str) -> None:
        """Stop recording for `problem`: reported once, the partial file removed."""
        self._stopped = True
        self._caller = []
        self._heard.clear()
        self._track.fail(problem)
        self._writer.submit(_Finish(self._track, None))  # the writer discards the file


# --- retention --------------------------------------------------------------------------------

def sweep(directory: Path, keep_days: float, now: float) -> int:
    """Delete recordings (`<CallSid>.wav|flac|opus`) and their `<CallSid>.jsonl` companions
    last written more than `keep_days` days before `now` (seconds since the epoch), and
    temporary files left by a process that died mid-call (a day old). Only names voxd writes
    are touched. Returns how many files were deleted; problems are logged, never raised. Does
    disk I/O: run it in a thread (`trio.to_thread.run_sync`)."""
    cutoff = now - keep_days * 86400.0
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("recording retention: cannot list %s: %s", directory, _describe(exc))
        return 0
    expired: set[str] = set()  # CallSids whose recording is past retention
    victims: list[os.DirEntry[str]] = []
    companions: dict[str, list[os.DirEntry[str]]] = {}
    for entry in entries:
        recording = _RECORDING_NAME.fullmatch(entry.name)
        part = recording is None and _PART_NAME.fullmatch(entry.name) is not None
        if recording is None and not part:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError as exc:
            log.warning("recording retention: cannot check %s: %s", entry.path, _describe(exc))
            continue
        if part:
            if mtime < now - _STALE_PART_SECONDS:  # written every second while in use
                victims.append(entry)
            continue
        assert recording is not None
        if mtime < cutoff:
            victims.append(entry)
            if recording[2] != "jsonl":
                expired.add(recording[1])
        elif recording[2] == "jsonl":
            companions.setdefault(recording[1], []).append(entry)
    for call_sid in expired:
        victims += companions.get(call_sid, ())
    for entry in victims:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("recording retention: cannot delete %s: %s", entry.path, _describe(exc))
            continue
        removed += 1
    return removed

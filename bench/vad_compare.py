"""Barge-in VAD choice, measured: voxd's energy detector vs webrtcvad, per 20 ms mu-law frame.

Run: .venv/bin/python bench/vad_compare.py               (about 10 s; prints tables)
     .venv/bin/python bench/vad_compare.py --regen-data  (rewrite bench/data/utt_*.wav)

Needs webrtcvad-wheels in the venv for the W* rows (`.venv/bin/pip install webrtcvad-wheels`; a
measurement tool, not a voxd dependency; without it those rows are skipped). Speech:
voxd/data/hello.wav (cut at its pauses) plus the short barge-in phrases of UTTERANCES in
bench/data/utt_*.wav (espeak-ng 1.51, 5 languages, 11 voices, -s 130..180, resampled to 8 kHz
with soxr, stored as G.711 mu-law WAV: ~170 kB). If those files are missing the script makes
them in a temp dir, which then needs /usr/bin/espeak-ng.

The detectors see what voxd sees: G.711 mu-law 8 kHz in 160-byte frames, energy from
voxd.audio.vad.frame_energy_dbfs_ulaw, voxd's SpeechDetector state machine (threshold -40 dBFS,
hangover 300 ms) turning per-frame verdicts into STARTED. Candidates:
  E60..E140  energy > -40 dBFS for min_speech_ms 60/80/100/120/140 ms (80 = voxd's default,
             chosen from these numbers)
  W1/W2/W3   webrtcvad mode 1/2/3 on the decoded s16 frame (voxd.audio.g711), voiced for 5
             consecutive frames (100 ms)
  W2+E       webrtcvad mode 2 AND energy > -40 dBFS, 5 consecutive frames
Levels: caller speech at an active level of -26 dBFS (ITU nominal -26 dBov; "quiet" = -36),
the assistant (whose echo comes back) at -20 dBFS. True speech start = first sample of the first
10 ms window of the clean, normalised utterance above -50 dBFS (sample-accurate). STARTED is
due at the end of the frame that produced it, so onset delay = end of that frame - true start;
network and jitter-buffer delay come on top. Each (utterance, condition) runs with several
seeded sub-frame offsets after 0.8-1.2 s of lead-in (noise, echo or just the line's floor).
Every caller stream, speech or noise, carries a -70 dBFS white noise floor (a real line is never
digitally silent, and webrtcvad misbehaves on exact zeros followed by faint noise).

Echo rows: the caller's line carries only the assistant's own speech, attenuated by the echo
return loss (ERL) and 6 frames (120 ms) late. voxd's echo gate (voxd/call/session.py _inbound)
makes a caller frame silence when its energy < reference - echo_margin_db (15 dB). Two
references: "aligned" = the level of the unattenuated assistant frame that made this echo (the
frame 6 earlier); "voxd" = Playback.echo_level replayed (peak hold of the frames as they are
sent, up to 200 ms ahead of playout, decaying ECHO_DECAY_DB_PER_SECOND), read when the caller
frame arrives. W* rows get the same gate: voiced AND not gated (webrtcvad still sees every frame).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

from voxd.audio.g711 import DECODE_TABLE, ulaw_encode, ulaw_to_pcm16
from voxd.audio.vad import ENERGY_FLOOR_DBFS, SpeechDetector, SpeechEdge, frame_energy_dbfs_ulaw
from voxd.call.playback import ECHO_DECAY_DB_PER_SECOND

try:
    import webrtcvad
except ImportError:  # pragma: no cover - measurement tool, optional
    webrtcvad = None

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
HELLO = ROOT / "voxd" / "data" / "hello.wav"

SR = 8000
FRAME = 160  # samples per 20 ms frame
FRAME_MS = 20
FS = 32768.0
THRESHOLD_DBFS = -40.0
HANGOVER_MS = 300
ECHO_MARGIN_DB = 15.0
ECHO_DELAY_FRAMES = 6
PLAYBACK_LEAD_MS = 200
CALLER_LEVEL_DBFS = -26.0
ASSISTANT_LEVEL_DBFS = -20.0
ONSET_WINDOW = 80  # 10 ms
ONSET_DBFS = -50.0
DETECT_WITHIN_MS = 1000
OFFSETS_PER_TRIAL = 8
NOISE_SECONDS = 60
COST_FRAMES = 30000
TARGET_P95_MS = 150.0
SEED = 20240611

# (voice, words per minute, text): barge-in style phrases with different first phonemes
UTTERANCES: list[tuple[str, int, str]] = [
    ("en-us", 150, "Wait, stop."),
    ("en-gb", 170, "Hold on a second."),
    ("en-us+f3", 140, "Sorry, one thing."),
    ("en-gb+m3", 180, "No, that's wrong."),
    ("de", 150, "Moment mal."),
    ("de+f2", 130, "Halt, warten."),
    ("fr-fr", 160, "Attendez, non."),
    ("fr-fr+f4", 175, "Pardon, une question."),
    ("en-us", 180, "Excuse me?"),
    ("en-us+m7", 130, "Yes, fine."),
    ("en-gb+f2", 155, "Hello? Hello?"),
    ("en-us", 165, "Fine, thanks."),
    ("es", 150, "Perdón, espere."),
    ("en-us+f4", 145, "Okay, but why?"),
    ("de+m3", 170, "Kann ich fragen?"),
    ("en-gb", 135, "Thanks, bye."),
]

Float = npt.NDArray[np.float64]


# -- speech material ---------------------------------------------------------------------------


def read_wav(path: Path) -> Float:
    """Mono 8 kHz WAV, 16-bit PCM or G.711 mu-law (format 7), as float samples."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    fmt, body, pos = None, None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        chunk = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = (int.from_bytes(chunk[0:2], "little"), int.from_bytes(chunk[2:4], "little"),
                   int.from_bytes(chunk[4:8], "little"), int.from_bytes(chunk[14:16], "little"))
        elif cid == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt == (1, 1, SR, 16) and body is not None:
        return np.frombuffer(body, "<i2").astype(np.float64)
    if fmt == (7, 1, SR, 8) and body is not None:
        return from_ulaw(body)
    raise ValueError(f"{path}: want mono {SR} Hz 16-bit PCM or mu-law, got {fmt}")


def write_ulaw_wav(path: Path, x: Float) -> None:
    """Mono 8 kHz G.711 mu-law WAV (what voxd receives anyway; half the size of PCM)."""
    body = to_ulaw(x)
    fmt = ((7).to_bytes(2, "little") + (1).to_bytes(2, "little") + SR.to_bytes(4, "little")
           + SR.to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
           + (0).to_bytes(2, "little"))
    chunks = (b"fmt " + len(fmt).to_bytes(4, "little") + fmt
              + b"fact" + (4).to_bytes(4, "little") + len(body).to_bytes(4, "little")
              + b"data" + len(body).to_bytes(4, "little") + body + b"\0" * (len(body) & 1))
    path.write_bytes(b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks)


def synthesize(voice: str, wpm: int, text: str) -> Float:
    """espeak-ng -> 8 kHz float, trimmed to the speech with 50 ms either side."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "u.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text],
                       check=True)
        with wave.open(str(raw), "rb") as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    y = soxr.resample(x, rate, SR, quality="VHQ")
    loud = np.flatnonzero(np.abs(y) > 30)
    pad = np.zeros(400)
    return np.concatenate((pad, y[int(loud[0]):int(loud[-1]) + 1], pad))


def utterance_files(regen: bool) -> list[Path]:
    names = [f"utt_{i:02d}.wav" for i in range(len(UTTERANCES))]
    if not regen and all((DATA / n).exists() for n in names):
        return [DATA / n for n in names]
    if regen:
        out = DATA
    else:
        out = Path(tempfile.mkdtemp(prefix="vad_compare_"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for n, (voice, wpm, text) in zip(names, UTTERANCES, strict=True):
        write_ulaw_wav(out / n, synthesize(voice, wpm, text))
    return [out / n for n in names]


def frame_ms2(x: Float) -> Float:
    n = len(x) // FRAME * FRAME
    return (x[:n].reshape(-1, FRAME) ** 2).mean(axis=1)


def active_level_db(x: Float) -> float:
    """Active speech level (dBFS), a P.56-like iteration over 20 ms frames."""
    ms = frame_ms2(x)
    ms = ms[ms > 0]
    level = ms.mean()
    for _ in range(8):
        act = ms[ms > level * 10 ** (-15.9 / 10)]
        level = act.mean()
    return 10 * np.log10(level / FS**2)


def normalise(x: Float, level_db: float) -> Float:
    return x * 10 ** ((level_db - active_level_db(x)) / 20)


def onset_sample(x: Float) -> int:
    """First sample of the first 10 ms window above ONSET_DBFS."""
    c = np.concatenate(([0.0], np.cumsum(x * x)))
    ms = (c[ONSET_WINDOW:] - c[:-ONSET_WINDOW]) / ONSET_WINDOW
    idx = np.flatnonzero(ms > FS**2 * 10 ** (ONSET_DBFS / 10))
    if len(idx) == 0:
        raise ValueError("no speech found")
    return int(idx[0])


def split_at_pauses(x: Float, pause_ms: int = 400) -> list[Float]:
    """Cut a recording into utterances separated by >= pause_ms below -60 dBFS."""
    e = frame_ms2(x)
    quiet = e < FS**2 * 1e-6
    pieces, start, run = [], None, 0
    need = pause_ms // FRAME_MS
    for i, q in enumerate(quiet):
        if not q:
            if start is None:
                start = i
            run = 0
        elif start is not None:
            run += 1
            if run >= need:
                pieces.append((start, i - run + 1))
                start, run = None, 0
    if start is not None:
        pieces.append((start, len(quiet)))
    return [x[max(0, a - 3) * FRAME:(b + 3) * FRAME] for a, b in pieces]


@dataclass
class Utterance:
    name: str
    x: Float  # normalised to CALLER_LEVEL_DBFS
    onset: int


def load_speech(regen: bool) -> tuple[list[Utterance], list[Path]]:
    utts = []
    for k, piece in enumerate(split_at_pauses(read_wav(HELLO))):
        y = normalise(piece, CALLER_LEVEL_DBFS)
        utts.append(Utterance(f"hello.wav#{k}", y, onset_sample(y)))
    files = utterance_files(regen)
    for path, (voice, wpm, text) in zip(files, UTTERANCES, strict=True):
        y = normalise(read_wav(path), CALLER_LEVEL_DBFS)
        utts.append(Utterance(f"{voice}/{wpm}: {text}", y, onset_sample(y)))
    return utts, files


# -- noise and mu-law ----------------------------------------------------------------------------


def to_ulaw(x: Float) -> bytes:
    return ulaw_encode(np.clip(np.round(x), -32768, 32767).astype(np.int16)).tobytes()


def from_ulaw(b: bytes) -> Float:
    return DECODE_TABLE.take(np.frombuffer(b, np.uint8)).astype(np.float64)


def at_rms(x: Float, level_db: float) -> Float:
    return x * (FS * 10 ** (level_db / 20) / np.sqrt(np.mean(x * x)))


def white(rng: np.random.Generator, n: int, level_db: float) -> Float:
    return at_rms(rng.standard_normal(n), level_db)


def pink(rng: np.random.Generator, n: int, level_db: float) -> Float:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    shape = np.zeros_like(f)
    shape[1:] = 1 / np.sqrt(f[1:])
    return at_rms(np.fft.irfft(spec * shape, n), level_db)


def bandpass_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> Float:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, n)


def hum(rng: np.random.Generator, n: int, level_db: float) -> Float:
    t = np.arange(n) / SR
    amps = [1.0, 0.4, 0.7, 0.2, 0.5, 0.15, 0.3, 0.1, 0.2]  # odd harmonics strongest
    x = sum(a * np.sin(2 * np.pi * 50 * (h + 1) * t + rng.uniform(0, 2 * np.pi))
            for h, a in enumerate(amps))
    return at_rms(np.asarray(x), level_db)


def clicks(rng: np.random.Generator, n: int, dur_ms: int) -> tuple[Float, list[tuple[int, int]]]:
    """One full-scale click (random-sign samples) at a random point in every second."""
    x = np.zeros(n)
    m = dur_ms * SR // 1000
    events = []
    for sec in range(1, n // SR):  # none in the first (warm-up) second
        p = sec * SR + int(rng.integers(0, SR - m))
        x[p:p + m] = rng.choice([-32767.0, 32767.0], m)
        events.append((p, m))
    return x, events


def coughs(rng: np.random.Generator, n: int) -> tuple[Float, list[tuple[int, int]]]:
    """150-250 ms bursts of 200-3000 Hz noise at -20 dBFS, 5 ms attack, 30 ms release."""
    x = np.zeros(n)
    events = []
    p = int(1.5 * SR)
    while True:
        m = int(rng.uniform(0.150, 0.250) * SR)
        if p + m >= n:
            break
        burst = at_rms(bandpass_noise(rng, m, 200, 3000), -20.0)
        env = np.ones(m)
        a, r = 40, 240
        env[:a] = np.linspace(0, 1, a)
        env[-r:] = np.linspace(1, 0, r)
        x[p:p + m] = burst * env
        events.append((p, m))
        p += m + int(rng.uniform(2.0, 3.5) * SR)
    return x, events


def keyboard(rng: np.random.Generator, n: int) -> Float:
    """Typing: bursts of 5-25 keystrokes 90-250 ms apart, each a press tick and a quieter
    release tick 40-90 ms later; ticks are 4 ms of decaying 1-3.8 kHz noise, -6 dBFS peak."""
    x = np.zeros(n)
    t = np.arange(32) / SR
    p = int(rng.uniform(1.2, 2.0) * SR)
    while p < n - 2 * SR:
        for _ in range(int(rng.integers(5, 26))):
            if p >= n - SR:
                break
            for delay, gain in ((0, 0.5), (rng.uniform(0.040, 0.090), 0.25)):
                q = p + int(delay * SR)
                tick = bandpass_noise(rng, 32, 1000, 3800)
                tick = tick / np.max(np.abs(tick)) * np.exp(-t / 0.0008) * gain * FS
                x[q:q + 32] += tick
            p += int(rng.uniform(0.090, 0.250) * SR)
        p += int(rng.uniform(0.5, 3.0) * SR)
    return x


# -- echo ----------------------------------------------------------------------------------------


@dataclass
class AssistantStream:
    """The assistant's speech as sent (mu-law) and what comes back on the caller's line."""

    ulaw: bytes
    levels: list[float]  # energy of each sent (unattenuated) frame

    def echo(self, erl_db: float) -> Float:
        """The caller-side echo, ERL dB down and ECHO_DELAY_FRAMES late (float samples)."""
        x = from_ulaw(self.ulaw) * 10 ** (-erl_db / 20)
        return np.concatenate((np.zeros(ECHO_DELAY_FRAMES * FRAME), x))[:len(x)]

    def gate_aligned(self) -> list[float]:
        """Per caller frame: level of the assistant frame that made its echo, minus the margin."""
        lv = [ENERGY_FLOOR_DBFS] * ECHO_DELAY_FRAMES + self.levels
        return [v - ECHO_MARGIN_DB for v in lv[:len(self.levels)]]

    def gate_voxd(self) -> list[float]:
        """Per caller frame: Playback.echo_level(now) - margin, replaying voxd's bookkeeping.

        Assistant frame j plays during [20j, 20j+20) ms; Playback lets its level join the
        echo reference once it starts playing (frames sent ahead by the lead do not count yet)
        and references it to its play end (20j+20). Caller frame k (carrying the echo of frame
        k-6) is handled when it has fully arrived, at 20k+20 ms.
        """
        decay = ECHO_DECAY_DB_PER_SECOND / 1000.0  # dB per ms
        ref, ref_at = ENERGY_FLOOR_DBFS, 0.0
        sent = 0
        n = len(self.levels)
        gates = []
        for k in range(n):
            now = 20.0 * k + 20.0
            while sent < n and 20.0 * sent <= now:  # frame `sent` has started playing
                end = 20.0 * sent + 20.0
                if self.levels[sent] >= ref - max(0.0, end - ref_at) * decay:
                    ref, ref_at = self.levels[sent], end
                sent += 1
            gates.append(ref - max(0.0, now - ref_at) * decay - ECHO_MARGIN_DB)
        return gates


def assistant_stream(rng: np.random.Generator, utts: Sequence[Utterance],
                     seconds: float) -> AssistantStream:
    parts: list[Float] = []
    total = 0
    while total < seconds * SR:
        for i in rng.permutation(len(utts)):
            gap = np.zeros(int(rng.uniform(0.15, 0.5) * SR))
            y = normalise(utts[i].x, ASSISTANT_LEVEL_DBFS)
            parts += [gap, y]
            total += len(gap) + len(y)
    x = np.concatenate(parts)[: int(seconds * SR)]
    ulaw = to_ulaw(x)
    levels = [frame_energy_dbfs_ulaw(ulaw[i:i + FRAME]) for i in range(0, len(ulaw), FRAME)]
    return AssistantStream(ulaw, levels)


# -- detectors -----------------------------------------------------------------------------------


LINE_FLOOR_DBFS = -70.0  # every caller stream carries white noise this loud: no line is silent
_FLOOR_RNG = np.random.default_rng(SEED + 1)


@dataclass
class Stream:
    """One stretch of caller audio as voxd receives it, with its echo gate per frame."""

    frames: list[bytes]
    energy: list[float]
    gate: list[float] | None = None
    _pcm: list[bytes] | None = field(default=None, repr=False)
    _vad: dict[int, list[bool]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, x: Float, gate: list[float] | None = None) -> Stream:
        """Caller audio x, plus the line's own noise floor, as voxd receives it."""
        b = to_ulaw(x + _FLOOR_RNG.standard_normal(len(x)) * FS * 10 ** (LINE_FLOOR_DBFS / 20))
        frames = [b[i:i + FRAME] for i in range(0, len(b) - FRAME + 1, FRAME)]
        return cls(frames, [frame_energy_dbfs_ulaw(f) for f in frames],
                   None if gate is None else gate[:len(frames)])

    def passed(self) -> list[bool]:
        """Per frame: True unless voxd's echo gate turns it into silence."""
        if self.gate is None:
            return [True] * len(self.frames)
        return [e >= g for e, g in zip(self.energy, self.gate, strict=True)]

    def loud(self) -> list[bool]:
        return [e > THRESHOLD_DBFS for e in self.energy]

    def vad(self, mode: int) -> list[bool]:
        """webrtcvad's verdict on every frame, one fresh Vad fed the whole stream in order."""
        if mode not in self._vad:
            if self._pcm is None:
                self._pcm = [ulaw_to_pcm16(f) for f in self.frames]
            is_speech = webrtcvad.Vad(mode).is_speech
            self._vad[mode] = [is_speech(p, SR) for p in self._pcm]
        return self._vad[mode]


@dataclass
class Detector:
    name: str
    desc: str
    voiced: Callable[[Stream], list[bool]]  # per-frame verdict, before the echo gate
    min_speech_ms: int
    make_step: Callable[[], Callable[[bytes], object]]  # one frame of the work, for timing

    def feed(self, s: Stream) -> list[float]:
        """What SpeechDetector.update gets: 0 dBFS for a voiced frame the gate lets through."""
        return [0.0 if v and ok else ENERGY_FLOOR_DBFS
                for v, ok in zip(self.voiced(s), s.passed(), strict=True)]


def energy_detector(min_ms: int, note: str = "") -> Detector:
    def make_step() -> Callable[[bytes], object]:
        update = SpeechDetector(THRESHOLD_DBFS, min_ms, HANGOVER_MS).update
        energy = frame_energy_dbfs_ulaw

        def step(frame: bytes) -> object:
            return update(energy(frame))
        return step

    return Detector(f"E{min_ms}", f"energy > {THRESHOLD_DBFS:g} dBFS for {min_ms} ms{note}",
                    Stream.loud, min_ms, make_step)


def webrtc_detector(mode: int, with_energy: bool = False) -> Detector:
    def voiced(s: Stream) -> list[bool]:
        if with_energy:
            return [v and e for v, e in zip(s.vad(mode), s.loud(), strict=True)]
        return s.vad(mode)

    def make_step() -> Callable[[bytes], object]:
        update = SpeechDetector(THRESHOLD_DBFS, 100, HANGOVER_MS).update
        is_speech, decode, energy = webrtcvad.Vad(mode).is_speech, ulaw_to_pcm16, \
            frame_energy_dbfs_ulaw
        floor, thr = ENERGY_FLOOR_DBFS, THRESHOLD_DBFS

        def step(frame: bytes) -> object:
            return update(0.0 if is_speech(decode(frame), SR) else floor)

        def step_e(frame: bytes) -> object:
            e = energy(frame)  # voxd needs it anyway, for the echo gate
            return update(0.0 if is_speech(decode(frame), SR) and e > thr else floor)
        return step_e if with_energy else step

    if with_energy:
        return Detector(f"W{mode}+E", f"webrtcvad mode {mode} AND energy > {THRESHOLD_DBFS:g} "
                        "dBFS, for 100 ms (5 frames)", voiced, 100, make_step)
    return Detector(f"W{mode}", f"webrtcvad mode {mode} voiced for 100 ms (5 frames)", voiced,
                    100, make_step)


def run(det: Detector, s: Stream) -> tuple[list[int], list[bool]]:
    """Frames at which STARTED fired, and whether the detector was in speech after each frame."""
    sd = SpeechDetector(THRESHOLD_DBFS, det.min_speech_ms, HANGOVER_MS)
    update = sd.update
    starts, states = [], []
    for i, v in enumerate(det.feed(s)):
        if update(v) is SpeechEdge.STARTED:
            starts.append(i)
        states.append(sd.in_speech)
    return starts, states


# -- onset trials --------------------------------------------------------------------------------


@dataclass
class Trial:
    condition: str
    utt: str
    stream: Stream
    onset: int  # true speech start, samples from stream start


@dataclass
class Outcome:
    delays: list[float] = field(default_factory=list)
    misses: int = 0
    early: int = 0  # already in speech (set off by noise/echo) when the caller started
    early_utts: list[str] = field(default_factory=list)
    by_utt: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: Outcome) -> None:
        self.delays += other.delays
        self.misses += other.misses
        self.early += other.early


CONDITIONS = {  # name -> short column label
    "clean, -26 dBFS": "clean",
    "quiet, -36 dBFS": "quiet",
    "white noise 20 dB SNR": "white20",
    "white noise 10 dB SNR": "white10",
    "pink noise 20 dB SNR": "pink20",
    "pink noise 10 dB SNR": "pink10",
    "over assistant echo ERL 20 dB, voxd gate": "echo20",
}
NOMINAL = ("clean", "white20", "pink20")


def make_trials(rng: np.random.Generator, utts: Sequence[Utterance],
                echo: AssistantStream) -> list[Trial]:
    echo20 = echo.echo(20.0)
    echo_gate = echo.gate_voxd()
    talking = np.flatnonzero(np.asarray(echo_gate) > ASSISTANT_LEVEL_DBFS - ECHO_MARGIN_DB - 10)
    trials = []
    for short in CONDITIONS.values():
        gain = 10 ** (-10 / 20) if short == "quiet" else 1.0
        for u in utts:
            for _ in range(OFFSETS_PER_TRIAL):
                lead = int(rng.uniform(0.8, 1.2) * SR)
                n = (lead + len(u.x) + SR) // FRAME * FRAME
                x = np.zeros(n)
                x[lead:lead + len(u.x)] = u.x * gain
                onset = lead + u.onset
                gate = None
                if short.startswith(("white", "pink")):
                    level = CALLER_LEVEL_DBFS - float(short[-2:])
                    x += (white if short.startswith("white") else pink)(rng, n, level)
                elif short == "echo20":
                    # line up the echo so that the assistant is talking when the caller starts
                    f0 = onset // FRAME
                    pick = talking[(talking >= f0) & (talking < len(echo_gate) - n // FRAME + f0)]
                    s0 = int(rng.choice(pick)) - f0
                    x += echo20[s0 * FRAME:s0 * FRAME + n]
                    gate = echo_gate[s0:s0 + n // FRAME]
                trials.append(Trial(short, u.name, Stream.of(x, gate), onset))
    return trials


def score(det: Detector, trials: Sequence[Trial]) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for t in trials:
        o = out.setdefault(t.condition, Outcome())
        starts, states = run(det, t.stream)
        first = t.onset // FRAME  # the frame holding the first speech sample
        if first > 0 and states[first - 1]:
            o.early += 1
            o.early_utts.append(t.utt)
            continue
        late = [(i + 1) * FRAME - t.onset for i in starts if i >= first]
        if late and late[0] <= DETECT_WITHIN_MS * SR // 1000:
            o.delays.append(late[0] * 1000 / SR)
            o.by_utt.setdefault(t.utt, []).append(late[0] * 1000 / SR)
        else:
            o.misses += 1
    return out


# -- noise-only rows -----------------------------------------------------------------------------

WARMUP_FRAMES = 50  # the first second of every noise sample is not counted (webrtcvad adapts)


@dataclass
class NoiseRow:
    name: str
    group: str  # "stationary", "click", "cough", "echo", "echo-ungated"
    stream: Stream
    events: list[tuple[int, int]] | None = None


def make_noise_rows(rng: np.random.Generator, echo: AssistantStream) -> list[NoiseRow]:
    n = NOISE_SECONDS * SR
    rows = [NoiseRow(f"white {lv} dBFS", "stationary", Stream.of(white(rng, n, lv)))
            for lv in (-50, -40, -35)]
    rows += [NoiseRow(f"pink {lv} dBFS", "stationary", Stream.of(pink(rng, n, lv)))
             for lv in (-50, -40, -35)]
    rows += [NoiseRow(f"hum 50 Hz+harmonics {lv} dBFS", "stationary", Stream.of(hum(rng, n, lv)))
             for lv in (-45, -35)]
    for ms in (5, 20):
        x, ev = clicks(rng, n, ms)
        rows.append(NoiseRow(f"click {ms} ms full-scale, 1/s", "click", Stream.of(x), ev))
    rows.append(NoiseRow("keyboard ticks", "click", Stream.of(keyboard(rng, n))))
    x, ev = coughs(rng, n)
    rows.append(NoiseRow(f"{len(ev)} coughs 150-250 ms -20 dBFS", "cough", Stream.of(x), ev))
    aligned, voxd = echo.gate_aligned(), echo.gate_voxd()
    for erl in (15, 20, 25):
        e = echo.echo(erl)
        rows.append(NoiseRow(f"echo ERL {erl} dB, aligned gate", "echo", Stream.of(e, aligned)))
        rows.append(NoiseRow(f"echo ERL {erl} dB, voxd gate", "echo", Stream.of(e, voxd)))
    for erl in (15, 25):
        rows.append(NoiseRow(f"echo ERL {erl} dB, NO gate", "echo-ungated",
                             Stream.of(echo.echo(erl))))
    return rows


# -- cost ----------------------------------------------------------------------------------------


def timer_overhead_ns(n: int) -> float:
    pc = time.perf_counter_ns
    d = [0] * n
    for i in range(n):
        t0 = pc()
        d[i] = pc() - t0
    return statistics.median(d)


def time_per_frame(step: Callable[[bytes], object], frames: Sequence[bytes]) -> tuple[float, float]:
    """(median, mean) ns per call of step over frames, timed one frame at a time."""
    pc = time.perf_counter_ns
    for f in frames[:2000]:
        step(f)
    d = [0] * len(frames)
    gc.disable()
    try:
        for i, f in enumerate(frames):
            t0 = pc()
            step(f)
            d[i] = pc() - t0
    finally:
        gc.enable()
    return statistics.median(d), statistics.fmean(d)


# -- report --------------------------------------------------------------------------------------


def pct(v: Sequence[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


def fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if v != v else (f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}")
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], first: int, width: int = 8,
          indent: int = 2) -> None:
    pad = " " * indent
    print(pad + f"{header[0]:<{first}}" + "".join(f"{fmt(h):>{width}}" for h in header[1:]))
    for r in rows:
        print(pad + f"{fmt(r[0]):<{first}}" + "".join(f"{fmt(v):>{width}}" for v in r[1:]))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--regen-data", action="store_true",
                    help="re-synthesize bench/data/utt_*.wav with espeak-ng")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    rng = np.random.default_rng(SEED)

    utts, files = load_speech(args.regen_data)
    echo = assistant_stream(rng, utts, NOISE_SECONDS + 2)
    dets = [energy_detector(100), energy_detector(60), energy_detector(80, " (voxd default)"),
            energy_detector(120), energy_detector(140)]
    if webrtcvad is not None:
        dets += [webrtc_detector(m) for m in (1, 2, 3)]
        dets.append(webrtc_detector(2, with_energy=True))
    else:
        print("webrtcvad not installed: webrtcvad rows skipped "
              "(.venv/bin/pip install webrtcvad-wheels)\n")
    names = [d.name for d in dets]
    by_name = {d.name: d for d in dets}

    print("Barge-in VAD comparison, per 20 ms G.711 mu-law 8 kHz frame as voxd receives it")
    kb = sum(p.stat().st_size for p in files) / 1000
    print(f"speech: {len(utts)} utterances ({len(utts) - len(UTTERANCES)} from hello.wav, "
          f"{len(UTTERANCES)} espeak-ng in {files[0].parent}, {kb:.0f} kB); caller at "
          f"{CALLER_LEVEL_DBFS:g} dBFS active level, assistant at {ASSISTANT_LEVEL_DBFS:g} dBFS")
    print(f"every candidate: SpeechDetector(threshold {THRESHOLD_DBFS:g}, hangover {HANGOVER_MS} "
          f"ms) over per-frame verdicts; echo gate margin {ECHO_MARGIN_DB:g} dB, echo delay "
          f"{ECHO_DELAY_FRAMES * FRAME_MS} ms")
    for d in dets:
        print(f"  {d.name:<5} {d.desc}")
    print()

    # 1. onsets
    trials = make_trials(rng, utts, echo)
    results = {d.name: score(d, trials) for d in dets}
    conds = list(CONDITIONS.values())
    pooled: dict[str, Outcome] = {}
    nominal: dict[str, Outcome] = {}
    for n in names:
        pooled[n], nominal[n] = Outcome(), Outcome()
        for c, o in results[n].items():
            pooled[n].add(o)
            if c in NOMINAL:
                nominal[n].add(o)
    print(f"1. Onset delay, true speech start -> STARTED, ms ({len(utts)} utterances x "
          f"{OFFSETS_PER_TRIAL} sub-frame offsets = {len(trials) // len(conds)} onsets per "
          f"condition, {len(conds)} conditions)")
    rows = []
    for n in names:
        a, b = pooled[n], nominal[n]
        rows.append([n, pct(a.delays, 50), pct(a.delays, 95), max(a.delays, default=float("nan")),
                     len(a.delays), a.misses, a.early, pct(b.delays, 50), pct(b.delays, 95),
                     b.misses + b.early])
    print(f"{'':20}{'all conditions':^46}  {'nominal: ' + '+'.join(NOMINAL):^25}")
    table(["", "p50", "p95", "max", "found", "missed", "early", "p50", "p95", "m+e"], rows, 8)
    print("  missed = no STARTED within 1 s of the onset; early = already in speech (set off by "
          "the noise\n  or echo) when the caller started, so there is no onset delay to measure")
    print()
    print("  per condition, p50/p95 ms")
    for k, v in CONDITIONS.items():
        print(f"    {v:<8} {k}")
    rows = []
    for n in names:
        row: list[object] = [n]
        for c in conds:
            o = results[n][c]
            row.append(f"{pct(o.delays, 50):.0f}/{pct(o.delays, 95):.0f}" if o.delays else "-")
        rows.append(row)
    table(["", *conds], rows, 6, 10)
    print("  missed+early per condition (out of "
          f"{len(trials) // len(conds)}), where not 0:")
    for n in names:
        bad = [f"{c} {results[n][c].misses}m+{results[n][c].early}e" for c in conds
               if results[n][c].misses or results[n][c].early]
        if bad:
            print(f"    {n:<5} " + ", ".join(bad))
    for c in ("clean", "quiet"):
        for n in names:
            if results[n][c].early_utts:
                which = sorted(set(results[n][c].early_utts))
                print(f"    {n} 'early' on {c} speech (no noise at all): triggered before the "
                      f"-50 dBFS onset mark, by the quiet start of: {'; '.join(which)}")
    print()
    print("  clean speech, median onset delay per utterance "
          f"(ms; {OFFSETS_PER_TRIAL} offsets each)")
    rows = []
    for u in utts:
        rows.append([u.name[:40], *(statistics.median(results[n]["clean"].by_utt[u.name])
                                    if u.name in results[n]["clean"].by_utt else float("nan")
                                    for n in names)])
    table(["utterance (voice/wpm: text)", *names], rows, 41, 6)
    print()

    # 2. noise only
    noise_rows = make_noise_rows(rng, echo)
    fs: dict[tuple[str, str], float] = {}
    occ: dict[tuple[str, str], float] = {}
    startup: dict[str, list[str]] = {n: [] for n in names}
    cough_hits: dict[str, list[tuple[int, bool]]] = {}
    for r in noise_rows:
        minutes = (len(r.stream.frames) - WARMUP_FRAMES) * FRAME_MS / 60000
        for d in dets:
            starts, states = run(d, r.stream)
            counted = [i for i in starts if i >= WARMUP_FRAMES]
            if len(counted) < len(starts):
                startup[d.name].append(r.name)
            fs[r.name, d.name] = len(counted) / minutes
            occ[r.name, d.name] = 100.0 * sum(states[WARMUP_FRAMES:]) / (
                len(states) - WARMUP_FRAMES)
            if r.group == "cough" and r.events:
                hit = []
                for p, m in r.events:
                    lo, hi = p // FRAME, (p + m) // FRAME + HANGOVER_MS // FRAME_MS
                    hit.append((m * 1000 // SR, any(lo <= i <= hi for i in counted)))
                cough_hits[d.name] = hit
    print(f"2. Noise only ({NOISE_SECONDS} s each; the first second is warm-up, not counted)")
    print("  false starts per minute")
    table(["sample", *names], [[r.name, *(fs[r.name, n] for n in names)] for r in noise_rows],
          34, 7)
    print()
    print("  % of time in 'speech' (stuck in speech = one STARTED, then no barge-in detectable)")
    table(["sample", *names],
          [[r.name, *(occ[r.name, n] for n in names)] for r in noise_rows
           if any(occ[r.name, n] >= 0.5 for n in names)], 34, 7)
    print()
    if cough_hits:
        print("  coughs that set off STARTED, by cough length")
        rows = []
        for lo, hi in [(150, 175), (175, 200), (200, 225), (225, 251)]:
            row: list[object] = [f"{lo}-{min(hi, 250)} ms"]
            for n in names:
                sel = [h for ms, h in cough_hits[n] if lo <= ms < hi]
                row.append(f"{sum(sel)}/{len(sel)}")
            rows.append(row)
        table(["cough length", *names], rows, 34, 7)
        print()
    print("  STARTED within the uncounted first second of a fresh detector, samples out of "
          f"{len(noise_rows)}: " + ", ".join(f"{n} {len(startup[n])}" for n in names))
    al, vx = np.asarray(echo.gate_aligned()), np.asarray(echo.gate_voxd())
    talk = al > ASSISTANT_LEVEL_DBFS - ECHO_MARGIN_DB - 10
    below = (vx < al - 0.5) & talk
    print(f"  echo gate check: while the assistant talks, voxd's echo_level reference is below the "
          f"level of the frame whose echo is arriving on {100 * below.sum() / talk.sum():.0f}% "
          f"of frames, by up to {np.max(al - vx, where=talk, initial=0):.1f} dB "
          f"(lead {PLAYBACK_LEAD_MS} ms + echo delay {ECHO_DELAY_FRAMES * FRAME_MS} ms)")
    print()

    # 3. cost
    cost_frames = [f for t in trials for f in t.stream.frames][:COST_FRAMES]
    rng.shuffle(cost_frames)  # mix speech, silence, noise
    overhead = timer_overhead_ns(20000)
    cost: dict[str, tuple[float, float]] = {}
    parts: list[tuple[str, Callable[[], Callable[[bytes], object]]]] = [
        ("frame_energy_dbfs_ulaw only", lambda: frame_energy_dbfs_ulaw),
        ("ulaw_to_pcm16 (decode) only", lambda: ulaw_to_pcm16)]
    if webrtcvad is not None:
        pcm = {f: ulaw_to_pcm16(f) for f in cost_frames}

        def vad_only() -> Callable[[bytes], object]:
            v = webrtcvad.Vad(2).is_speech
            return lambda f: v(pcm[f], SR)
        parts.append(("webrtcvad is_speech only (mode 2)", vad_only))
    for label, make in parts:
        cost[label] = min(time_per_frame(make(), cost_frames) for _ in range(3))
    for d in dets:
        cost[d.name] = min(time_per_frame(d.make_step(), cost_frames) for _ in range(3))
    print(f"3. Cost per frame, us ({len(cost_frames)} frames, each timed with perf_counter_ns; "
          f"best of 3 runs; timer overhead ~{overhead / 1000:.2f} us included)")
    table(["path", "median", "mean"], [[k, v[0] / 1000, v[1] / 1000] for k, v in cost.items()],
          36)
    print("  E*: energy + state machine. W*: decode + webrtcvad + state machine. With the echo "
          "gate voxd\n  computes the frame energy anyway, so a deployed W* costs about what "
          "W2+E costs.")
    print()

    # 4. verdict
    med = {n: cost[n][0] / 1000 for n in names}
    if webrtcvad is not None:
        for n in names:
            if n.startswith("W") and "+E" not in n:
                med[n] += cost["frame_energy_dbfs_ulaw only"][0] / 1000  # as deployed
    Check = dict[str, tuple[bool, float, str]]  # name -> (fails, how badly, detail)

    def noise_check(sel: Callable[[NoiseRow], bool]) -> Check:
        out: Check = {}
        for n in names:
            hit = [r for r in noise_rows if sel(r) and fs[r.name, n] > 0]
            out[n] = (bool(hit), sum(fs[r.name, n] for r in hit),
                      ", ".join(f"{r.name}: {fs[r.name, n]:.1f}/min" for r in hit))
        return out

    def p95_check(o: dict[str, Outcome]) -> Check:
        return {n: (not pct(o[n].delays, 95) <= TARGET_P95_MS, pct(o[n].delays, 95),
                    f"p95 {pct(o[n].delays, 95):.0f} ms") for n in names}

    criteria: list[tuple[str, Check]] = [
        (f"onset p95 <= {TARGET_P95_MS:g} ms on nominal speech ({'+'.join(NOMINAL)})",
         p95_check(nominal)),
        (f"onset p95 <= {TARGET_P95_MS:g} ms over all conditions", p95_check(pooled)),
        ("nothing missed on clean speech",
         {n: (bool(results[n]["clean"].misses), results[n]["clean"].misses,
              f"{results[n]['clean'].misses} missed") for n in names}),
        ("no STARTED on clicks / keyboard ticks", noise_check(lambda r: r.group == "click")),
        ("no STARTED on echo ERL >= 20 dB behind the aligned gate",
         noise_check(lambda r: r.name in ("echo ERL 20 dB, aligned gate",
                                          "echo ERL 25 dB, aligned gate"))),
        ("no STARTED on echo ERL >= 20 dB behind voxd's gate",
         noise_check(lambda r: r.name in ("echo ERL 20 dB, voxd gate",
                                          "echo ERL 25 dB, voxd gate"))),
        ("no STARTED on echo ERL 15 dB (= the margin), either gate",
         noise_check(lambda r: r.group == "echo" and "ERL 15" in r.name)),
        ("no STARTED on coughs", noise_check(lambda r: r.group == "cough")),
    ]
    secondary: list[tuple[str, Check]] = [
        ("not stuck in 'speech' in stationary noise (white/pink/hum)",
         {n: (bool(bad := [r.name for r in noise_rows
                           if r.group == "stationary" and occ[r.name, n] > 50]), len(bad),
              ", ".join(bad)) for n in names}),
        ("speech found at 10 dB SNR",
         {n: (bool(lost := [f"{c}: {results[n][c].misses + results[n][c].early} of "
                            f"{len(trials) // len(conds)} lost" for c in ("white10", "pink10")
                            if results[n][c].misses + results[n][c].early]), len(lost),
              ", ".join(lost)) for n in names}),
        (f"quiet speech (-36 dBFS): p95 <= {TARGET_P95_MS:g} ms, nothing missed",
         {n: (not pct(results[n]["quiet"].delays, 95) <= TARGET_P95_MS
              or bool(results[n]["quiet"].misses), 0.0,
              f"p95 {pct(results[n]['quiet'].delays, 95):.0f} ms, "
              f"{results[n]['quiet'].misses} missed") for n in names}),
    ]
    print("4. Verdict (computed from the tables above)")
    print("  cost as deployed, median us/frame (W* plus the frame energy the echo gate needs): "
          + ", ".join(f"{n} {med[n]:.1f}" for n in names))
    deciding: list[tuple[str, Check]] = []
    for label, chk in criteria:
        bad = [n for n in names if chk[n][0]]
        if not bad:
            print(f"  - {label}: every candidate passes")
            continue
        detail = "; ".join(f"{n} ({chk[n][2]})" for n in bad)
        if len(bad) == len(names):
            print(f"  - {label}: EVERY candidate fails, so it does not separate them: {detail}")
        else:
            deciding.append((label, chk))
            good = [n for n in names if not chk[n][0]]
            print(f"  - {label}: passed by {', '.join(good)}; fails {detail}")

    def cheapest(cands: Sequence[str]) -> str:
        """Lowest cost; costs within 0.3 us count as equal, then the lower nominal p95."""
        low = min(med[n] for n in cands)
        return min((n for n in cands if med[n] <= low + 0.3),
                   key=lambda n: pct(nominal[n].delays, 95))

    ok = [n for n in names if not any(chk[n][0] for _, chk in deciding)]
    picks: list[str] = []
    if ok:
        best = cheapest(ok)
        picks.append(best)
        print(f"  => {best} ({by_name[best].desc}) is the cheapest candidate passing every "
              f"criterion that any candidate passes: {med[best]:.1f} us/frame, onset p50/p95 "
              f"{pct(nominal[best].delays, 50):.0f}/{pct(nominal[best].delays, 95):.0f} ms on "
              "nominal speech.")
    else:
        print("  => NO candidate meets every requirement that some candidate meets. "
              "Best candidate if one requirement is relaxed:")
        for label, chk in deciding:
            only = [n for n in names if chk[n][0]
                    and not any(c[n][0] for lb, c in deciding if lb != label)]
            if not only:
                continue
            best = min(only, key=lambda n: (chk[n][1], med[n]))
            picks.append(best)
            print(f"     relax '{label}': {best} ({chk[best][2]}; {med[best]:.1f} us/frame)")
            robust = [n for n in only if not any(c[n][0] for _, c in secondary[:2])]
            if robust and best not in robust:
                alt = min(robust, key=lambda n: (chk[n][1], med[n]))
                picks.append(alt)
                print(f"       best of those that also survive stationary noise and 10 dB SNR:"
                      f" {alt} ({chk[alt][2]}; {med[alt]:.1f} us/frame)")
        for n in names:
            failed = [lb for lb, chk in deciding if chk[n][0]]
            if len(failed) > 1:
                print(f"     {n} fails {len(failed)}: " + "; ".join(failed))
    for n in dict.fromkeys(picks):
        sec = [f"{label} ({chk[n][2]})" for label, chk in secondary if chk[n][0]]
        passed = [label for label, chk in secondary if not chk[n][0]]
        print(f"  {n}: " + ("; ".join(f"fails {x}" for x in sec) if sec else "")
              + ("; " if sec and passed else "") + ("passes: " + "; ".join(passed) if passed
                                                    else ""))
    print(f"\n(finished in {time.monotonic() - t_start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

"""Barge-in VAD choice, measured: voxd's energy detector vs webrtcvad, per 20 ms mu-law frame.

Run: .venv/bin/python bench/vad_compare.py            (about 30-60 s; prints tables)
     .venv/bin/python bench/vad_compare.py --regen-data  (rewrite bench/data/utt_*.wav)

Needs webrtcvad-wheels in the venv for the webrtcvad rows (`.venv/bin/pip install
webrtcvad-wheels`; a measurement tool only, not a voxd dependency; without it those rows are
skipped). Speech: voxd/data/hello.wav (split at its pauses) plus the short espeak-ng phrases in
bench/data/utt_*.wav (UTTERANCES below: 5 languages, 11 voices, -s 130..180, resampled to 8 kHz
16-bit with soxr). Those files are committed (~190 kB); if they are missing the script makes them
in a temp dir, which then needs /usr/bin/espeak-ng.

Everything the detectors see is what voxd sees: G.711 mu-law 8 kHz cut into 160-byte frames,
energy from voxd.audio.vad.frame_energy_dbfs_ulaw, voxd's SpeechDetector state machine
(threshold -40 dBFS, hangover 300 ms). Candidates:
  E60/E100/E120/E140  energy detector with min_speech_ms 60/100/120/140 (100 = voxd's default in
                      voxd/config.py, 120 = the sample voxd.toml)
  W1/W2/W3            webrtcvad mode 1/2/3 on the decoded s16 frame (voxd.audio.g711), its per-frame
                      verdicts fed to the same SpeechDetector with a 100 ms (5 frame) minimum
Levels: caller speech is normalised to an active level of -26 dBFS (ITU nominal, -26 dBov), the
assistant (whose echo comes back) to -20 dBFS. True speech start = first sample of the first
10 ms window of the clean, normalised utterance above -50 dBFS (sample-accurate). The STARTED
decision is due at the end of the frame that produced it, so onset delay = end of that frame -
true start; network and jitter-buffer delay come on top. Each (utterance, condition) is run with
several seeded sub-frame offsets and 0.8-1.2 s of lead-in (noise, echo or silence).

Echo rows: the caller line carries only the assistant's own speech, attenuated by the echo
return loss (ERL) and delayed 6 frames (120 ms). The echo gate (voxd/call/session.py _inbound)
turns a caller frame into silence when its energy < reference - echo_margin_db (15 dB). Two
references: "aligned" = the level of the unattenuated assistant frame that made this echo
(6 frames earlier), the brief's model; "voxd" = Playback.echo_level as the code computes it
(peak hold of the frames sent, 200 ms playback lead, decay ECHO_DECAY_DB_PER_SECOND), evaluated
when the caller frame arrives. webrtcvad rows get the same gate (voiced AND not gated).
"""

from __future__ import annotations

import argparse
import gc
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
OFFSETS_PER_TRIAL = 4
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
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SR:
            raise ValueError(f"{path}: want mono 16-bit {SR} Hz")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)


def write_wav(path: Path, x: Float) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes())


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
    out = DATA if regen else Path(tempfile.mkdtemp(prefix="vad_compare_"))
    out.mkdir(parents=True, exist_ok=True)
    for n, (voice, wpm, text) in zip(names, UTTERANCES, strict=True):
        write_wav(out / n, synthesize(voice, wpm, text))
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
    for sec in range(n // SR):
        p = sec * SR + int(rng.integers(0, SR - m))
        x[p:p + m] = rng.choice([-32767.0, 32767.0], m)
        events.append((p, m))
    return x, events


def coughs(rng: np.random.Generator, n: int) -> tuple[Float, list[tuple[int, int]]]:
    """150-250 ms bursts of 200-3000 Hz noise at -20 dBFS, 5 ms attack, 30 ms release."""
    x = np.zeros(n)
    events = []
    p = int(0.5 * SR)
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
    p = int(rng.uniform(0.2, 1.0) * SR)
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

        Assistant frame j plays during [20j, 20j+20) ms and is sent PLAYBACK_LEAD_MS ahead;
        Playback references its level to its play end (20j+20). Caller frame k (carrying the
        echo of frame k-6) is handled when it has fully arrived, at 20k+20 ms.
        """
        decay = ECHO_DECAY_DB_PER_SECOND / 1000.0  # dB per ms
        ref, ref_at = ENERGY_FLOOR_DBFS, 0.0
        sent = 0
        n = len(self.levels)
        gates = []
        for k in range(n):
            now = 20.0 * k + 20.0
            while sent < n and 20.0 * sent - PLAYBACK_LEAD_MS <= now:
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


@dataclass
class Stream:
    """One stretch of caller audio as voxd receives it, with its echo gate per frame."""

    frames: list[bytes]
    energy: list[float]
    gate: list[float] | None = None
    _pcm: list[bytes] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, x: Float, gate: list[float] | None = None) -> Stream:
        b = to_ulaw(x)
        frames = [b[i:i + FRAME] for i in range(0, len(b) - FRAME + 1, FRAME)]
        return cls(frames, [frame_energy_dbfs_ulaw(f) for f in frames],
                   None if gate is None else gate[:len(frames)])

    def passed(self) -> list[bool]:
        """Per frame: True unless the echo gate turns it into silence."""
        if self.gate is None:
            return [True] * len(self.frames)
        return [e >= g for e, g in zip(self.energy, self.gate, strict=True)]

    @property
    def pcm(self) -> list[bytes]:
        if self._pcm is None:
            self._pcm = [ulaw_to_pcm16(f) for f in self.frames]
        return self._pcm


@dataclass
class Detector:
    name: str
    desc: str
    # Stream -> per-frame values for a SpeechDetector (energy or 0/-100 verdicts), gate applied
    feed: Callable[[Stream], list[float]]
    min_speech_ms: int
    # one frame of voxd's work, for timing: frame -> None
    make_step: Callable[[], Callable[[bytes], object]]


def energy_detector(min_ms: int, note: str = "") -> Detector:
    def feed(s: Stream) -> list[float]:
        return [e if ok else ENERGY_FLOOR_DBFS for e, ok in zip(s.energy, s.passed(), strict=True)]

    def make_step() -> Callable[[bytes], object]:
        det = SpeechDetector(THRESHOLD_DBFS, min_ms, HANGOVER_MS)
        update, energy = det.update, frame_energy_dbfs_ulaw

        def step(frame: bytes) -> object:
            return update(energy(frame))
        return step

    return Detector(f"E{min_ms}", f"energy > {THRESHOLD_DBFS:g} dBFS, min_speech {min_ms} ms{note}",
                    feed, min_ms, make_step)


def webrtc_detector(mode: int) -> Detector:
    def feed(s: Stream) -> list[float]:
        vad = webrtcvad.Vad(mode)
        return [0.0 if ok and vad.is_speech(p, SR) else ENERGY_FLOOR_DBFS
                for p, ok in zip(s.pcm, s.passed(), strict=True)]

    def make_step() -> Callable[[bytes], object]:
        det = SpeechDetector(THRESHOLD_DBFS, 100, HANGOVER_MS)
        update, is_speech, decode = det.update, webrtcvad.Vad(mode).is_speech, ulaw_to_pcm16
        floor = ENERGY_FLOOR_DBFS

        def step(frame: bytes) -> object:
            return update(0.0 if is_speech(decode(frame), SR) else floor)
        return step

    return Detector(f"W{mode}", f"webrtcvad mode {mode}, 5 voiced frames (100 ms)", feed, 100,
                    make_step)


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
    early: int = 0  # already in speech (noise/echo) when the caller started
    missed_utts: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.delays) + self.misses + self.early


CONDITIONS = ["clean -26 dBFS", "quiet -36 dBFS", "white 20 dB SNR", "white 10 dB SNR",
              "pink 20 dB SNR", "pink 10 dB SNR", "over echo ERL 20, voxd gate"]


def make_trials(rng: np.random.Generator, utts: Sequence[Utterance],
                echo: AssistantStream) -> list[Trial]:
    echo20 = echo.echo(20.0)
    echo_gate = echo.gate_voxd()
    talking = np.flatnonzero(np.asarray(echo_gate) > ASSISTANT_LEVEL_DBFS - ECHO_MARGIN_DB - 10)
    trials = []
    for cond in CONDITIONS:
        gain = 10 ** (-10 / 20) if cond.startswith("quiet") else 1.0
        for u in utts:
            for _ in range(OFFSETS_PER_TRIAL):
                lead = int(rng.uniform(0.8, 1.2) * SR)
                n = (lead + len(u.x) + SR) // FRAME * FRAME
                x = np.zeros(n)
                x[lead:lead + len(u.x)] = u.x * gain
                onset = lead + u.onset
                gate = None
                kind, _, snr = cond.partition(" ")
                if kind in ("white", "pink"):
                    level = CALLER_LEVEL_DBFS - float(snr.split()[0])
                    x += (white if kind == "white" else pink)(rng, n, level)
                elif kind == "over":
                    # start the echo so that the assistant is talking when the caller starts
                    f0 = onset // FRAME
                    s0 = int(rng.choice(talking[(talking >= f0)
                                                & (talking < len(echo_gate) - n // FRAME + f0)]))
                    s0 -= f0
                    x += echo20[s0 * FRAME:s0 * FRAME + n]
                    gate = echo_gate[s0:s0 + n // FRAME]
                trials.append(Trial(cond, u.name, Stream.of(x, gate), onset))
    return trials


def score(det: Detector, trials: Sequence[Trial]) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for t in trials:
        o = out.setdefault(t.condition, Outcome())
        starts, states = run(det, t.stream)
        first = t.onset // FRAME  # the frame holding the first speech sample
        if first > 0 and states[first - 1]:
            o.early += 1
            continue
        late = [(i + 1) * FRAME - t.onset for i in starts if i >= first]
        if late and late[0] <= DETECT_WITHIN_MS * SR // 1000:
            o.delays.append(late[0] * 1000 / SR)
        else:
            o.misses += 1
            o.missed_utts.append(t.utt)
    return out


# -- noise-only rows -----------------------------------------------------------------------------


@dataclass
class NoiseRow:
    name: str
    group: str  # "noise", "click", "cough", "echo", "echo-ungated"
    stream: Stream
    events: list[tuple[int, int]] | None = None


def make_noise_rows(rng: np.random.Generator, echo: AssistantStream) -> list[NoiseRow]:
    n = NOISE_SECONDS * SR
    rows = [NoiseRow(f"white {lv} dBFS", "noise", Stream.of(white(rng, n, lv)))
            for lv in (-50, -40, -35)]
    rows += [NoiseRow(f"pink {lv} dBFS", "noise", Stream.of(pink(rng, n, lv)))
             for lv in (-50, -40, -35)]
    rows += [NoiseRow(f"hum 50 Hz+harm. {lv} dBFS", "noise", Stream.of(hum(rng, n, lv)))
             for lv in (-45, -35)]
    for ms in (5, 20):
        x, ev = clicks(rng, n, ms)
        rows.append(NoiseRow(f"click {ms} ms full-scale, 1/s", "click", Stream.of(x), ev))
    rows.append(NoiseRow("keyboard ticks", "click", Stream.of(keyboard(rng, n))))
    x, ev = coughs(rng, n)
    rows.append(NoiseRow(f"cough 150-250 ms -20 dBFS ({len(ev)})", "cough", Stream.of(x), ev))
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


def table(header: Sequence[str], rows: Sequence[Sequence[object]], first: int = 30,
          width: int = 8) -> None:
    def cell(v: object, w: int) -> str:
        if isinstance(v, float):
            v = "-" if v != v else (f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}")
        return f"{v!s:>{w}}"
    print(f"{header[0]:<{first}}" + "".join(cell(h, width) for h in header[1:]))
    for r in rows:
        print(f"{r[0]!s:<{first}}" + "".join(cell(v, width) for v in r[1:]))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regen-data", action="store_true",
                    help="re-synthesize bench/data/utt_*.wav with espeak-ng")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    rng = np.random.default_rng(SEED)

    utts, files = load_speech(args.regen_data)
    echo = assistant_stream(rng, utts, NOISE_SECONDS + 2)
    dets = [energy_detector(100, " (voxd default)"), energy_detector(60),
            energy_detector(120, " (sample voxd.toml)"), energy_detector(140)]
    if webrtcvad is not None:
        dets += [webrtc_detector(m) for m in (1, 2, 3)]
    else:
        print("webrtcvad not installed: webrtcvad rows skipped "
              "(.venv/bin/pip install webrtcvad-wheels)\n")
    names = [d.name for d in dets]

    print("Barge-in VAD comparison (per 20 ms G.711 mu-law 8 kHz frame, as voxd sees it)")
    kb = sum(p.stat().st_size for p in files) / 1000
    print(f"speech: {len(utts)} utterances ({len(utts) - len(UTTERANCES)} from hello.wav, "
          f"{len(UTTERANCES)} espeak-ng in {files[0].parent} ({kb:.0f} kB)), caller at "
          f"{CALLER_LEVEL_DBFS:g} dBFS active level, assistant at {ASSISTANT_LEVEL_DBFS:g} dBFS")
    print(f"state machine: threshold {THRESHOLD_DBFS:g} dBFS / voiced, hangover {HANGOVER_MS} ms;"
          f" echo margin {ECHO_MARGIN_DB:g} dB, echo delay {ECHO_DELAY_FRAMES * FRAME_MS} ms")
    for d in dets:
        print(f"  {d.name:<5} {d.desc}")
    print()

    # onsets
    trials = make_trials(rng, utts, echo)
    results = {d.name: score(d, trials) for d in dets}
    conds = list(dict.fromkeys(t.condition for t in trials))
    per_cond = len(trials) // len(conds)
    print(f"1. Onset delay, true speech start -> STARTED (ms): {len(utts)} utterances x "
          f"{OFFSETS_PER_TRIAL} offsets = {per_cond} onsets per condition, {len(conds)} conditions")
    rows = []
    pooled: dict[str, Outcome] = {}
    for d in dets:
        allo = Outcome()
        for o in results[d.name].values():
            allo.delays += o.delays
            allo.misses += o.misses
            allo.early += o.early
        pooled[d.name] = allo
        rows.append([d.name, pct(allo.delays, 50), pct(allo.delays, 95),
                     max(allo.delays, default=float("nan")), len(allo.delays), allo.misses,
                     allo.early])
    table(["all conditions", "p50", "p95", "max", "found", "missed", "early"], rows, 16)
    print("  missed = not STARTED within 1 s of the onset; early = already in speech (set off by"
          " the noise/echo) when the caller started, so no delay to measure\n")

    print("   per condition: p50 / p95 ms, then misses+early if any")
    rows = []
    for c in conds:
        row: list[object] = [c]
        for d in dets:
            o = results[d.name][c]
            cell = f"{pct(o.delays, 50):.0f}/{pct(o.delays, 95):.0f}" if o.delays else "-/-"
            if o.misses or o.early:
                cell += f" {o.misses}m{o.early}e"
            row.append(cell)
        rows.append(row)
    table(["condition", *names], rows, 28, 13)
    print()

    # noise-only
    noise_rows = make_noise_rows(rng, echo)
    fs: dict[tuple[str, str], float] = {}
    occ: dict[tuple[str, str], float] = {}
    cough_hits: dict[str, list[tuple[int, bool]]] = {}
    for r in noise_rows:
        minutes = len(r.stream.frames) * FRAME_MS / 60000
        for d in dets:
            starts, states = run(d, r.stream)
            fs[r.name, d.name] = len(starts) / minutes
            occ[r.name, d.name] = 100.0 * sum(states) / len(states)
            if r.group == "cough" and r.events:
                hit = []
                for p, m in r.events:
                    lo, hi = p // FRAME, (p + m) // FRAME + HANGOVER_MS // FRAME_MS
                    hit.append((m * 1000 // SR, any(lo <= i <= hi for i in starts)))
                cough_hits[d.name] = hit
    print(f"2. False starts per minute on noise-only samples ({NOISE_SECONDS} s each)")
    table(["sample", *names], [[r.name, *(fs[r.name, n] for n in names)] for r in noise_rows], 34)
    print()
    print("   % of frames in speech (a detector stuck in 'speech' fires once, then never again)")
    table(["sample", *names],
          [[r.name, *(occ[r.name, n] for n in names)] for r in noise_rows if r.group != "click"],
          34)
    print()
    if cough_hits:
        print("   coughs that set off STARTED, by cough length")
        buckets = [(150, 175), (175, 200), (200, 225), (225, 251)]
        rows = []
        for lo, hi in buckets:
            row = [f"{lo}-{min(hi, 250)} ms"]
            for n in names:
                sel = [h for ms, h in cough_hits[n] if lo <= ms < hi]
                row.append(f"{sum(sel)}/{len(sel)}")
            rows.append(row)
        table(["cough length", *names], rows, 34)
        print()

    # cost
    cost_frames = [f for t in trials for f in t.stream.frames][:COST_FRAMES]
    rng.shuffle(cost_frames)  # mix speech, silence, noise (state machine state varies)
    overhead = timer_overhead_ns(20000)
    cost: dict[str, tuple[float, float]] = {}
    parts = [("energy only (frame_energy_dbfs_ulaw)", lambda: frame_energy_dbfs_ulaw),
             ("mu-law decode only (ulaw_to_pcm16)", lambda: ulaw_to_pcm16)]
    if webrtcvad is not None:
        def vad_only() -> Callable[[bytes], object]:
            v = webrtcvad.Vad(2).is_speech
            pcm = {f: ulaw_to_pcm16(f) for f in cost_frames}
            return lambda f: v(pcm[f], SR)
        parts.append(("webrtcvad.is_speech only (mode 2)", vad_only))
    for label, make in parts:
        cost[label] = min(time_per_frame(make(), cost_frames) for _ in range(3))
    for d in dets:
        cost[d.name] = min(time_per_frame(d.make_step(), cost_frames) for _ in range(3))
    print(f"3. Cost per frame (us), {len(cost_frames)} frames each timed with perf_counter_ns "
          f"(best of 3 runs; includes ~{overhead / 1000:.2f} us timer overhead)")
    rows = [[k, v[0] / 1000, v[1] / 1000] for k, v in cost.items()]
    table(["path", "median", "mean"], rows, 40)
    print("  E*: energy + state machine. W*: decode + webrtcvad + state machine; with the echo "
          "gate voxd\n  needs the frame energy as well, so a deployed W* costs W* + energy only.")
    print()

    # verdict
    noise_by = {r.name: r for r in noise_rows}

    def fails(rowsel: Callable[[NoiseRow], bool]) -> dict[str, list[str]]:
        return {n: [r for r, rr in noise_by.items() if rowsel(rr) and fs[r, n] > 0] for n in names}

    clean = [c for c in conds if c.startswith("clean")]
    crit: list[tuple[str, dict[str, list[str]]]] = [
        (f"onset p95 <= {TARGET_P95_MS:g} ms (all conditions)",
         {n: [f"p95 {pct(pooled[n].delays, 95):.0f} ms"]
          if not pct(pooled[n].delays, 95) <= TARGET_P95_MS else [] for n in names}),
        ("no misses on clean speech",
         {n: [f"{sum(results[n][c].misses for c in clean)} missed"]
          if sum(results[n][c].misses for c in clean) else [] for n in names}),
        ("0 false starts on clicks/keyboard", fails(lambda r: r.group == "click")),
        ("0 false starts on gated echo ERL >= 20 dB",
         fails(lambda r: r.group == "echo" and "ERL 15" not in r.name)),
        ("0 false starts on gated echo ERL 15 dB (= margin)",
         fails(lambda r: r.group == "echo" and "ERL 15" in r.name)),
        ("0 false starts on coughs", fails(lambda r: r.group == "cough")),
    ]
    print("4. Verdict")
    deciding = []
    for label, f in crit:
        bad = [n for n in names if f[n]]
        if not bad:
            print(f"  - {label}: all pass")
            continue
        detail = "; ".join(f"{n} ({', '.join(f[n][:3])}{', ...' if len(f[n]) > 3 else ''})"
                           for n in bad)
        if len(bad) == len(names):
            print(f"  - {label}: EVERY candidate fails, so it cannot decide between them: "
                  f"{detail}")
        else:
            deciding.append(f)
            print(f"  - {label}: fails {detail}")
    ok = [n for n in names if not any(f[n] for f in deciding)]
    med = {n: cost[n][0] / 1000 for n in names}
    if ok:
        best = min(ok, key=med.__getitem__)
        others = ", ".join(f"{n} {med[n]:.1f} us" for n in sorted(ok, key=med.__getitem__)
                           if n != best)
        print(f"  => {best} ({next(d.desc for d in dets if d.name == best)}) is the cheapest "
              f"candidate passing every criterion that some candidate passes: "
              f"{med[best]:.1f} us/frame median, onset p50/p95 "
              f"{pct(pooled[best].delays, 50):.0f}/{pct(pooled[best].delays, 95):.0f} ms"
              + (f" (also passing: {others})." if others else "."))
    else:
        ranked = sorted(names, key=lambda n: (sum(bool(f[n]) for f in deciding), med[n]))
        print("  => no candidate passes every deciding criterion; fewest failures, then cheapest: "
              + ", ".join(f"{n} ({sum(bool(f[n]) for f in deciding)} failed, {med[n]:.1f} us)"
                          for n in ranked))
    print(f"\n(finished in {time.monotonic() - t_start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

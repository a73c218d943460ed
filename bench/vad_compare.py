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
    out = DATA if regen else Path(tempfile.mkdtemp(prefix="vad_compare_"))
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



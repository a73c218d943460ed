"""DTMF: the tones tones_ulaw makes, and DtmfDecoder on them and on audio that is not DTMF."""

from __future__ import annotations

import math
import re

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxd.audio import dtmf
from voxd.audio.dtmf import (
    BLOCK_SAMPLES,
    COL_HZ,
    KEYS,
    ROW_HZ,
    DtmfDecoder,
    decode_ulaw,
    key_frequencies,
    problem,
    tones_ulaw,
)
from voxd.audio.g711 import ULAW_SILENCE, ulaw_decode, ulaw_encode

FS = 8000
MS = FS // 1000  # samples (= mu-law bytes) per millisecond
FRAME = 160  # 20 ms
TONE_AMPLITUDE = 32767 * 10 ** (-9 / 20)  # each tone's peak, as documented

Samples = npt.NDArray[np.float64]


def decoded(ulaw: bytes) -> Samples:
    """mu-law bytes -> float64 samples (int16 scale)."""
    return ulaw_decode(np.frombuffer(ulaw, dtype=np.uint8)).astype(np.float64)


def encoded(x: Samples) -> bytes:
    """float samples (int16 scale) -> mu-law bytes, rounded and clipped."""
    return ulaw_encode(np.clip(np.rint(x), -32768, 32767).astype(np.int16)).tobytes()


def sine(freq: float, n: int, amplitude: float = TONE_AMPLITUDE, phase: float = 0.0) -> Samples:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(n) / FS + phase)


def feed_in_chunks(ulaw: bytes, sizes: list[int]) -> str:
    """Feed ulaw to one decoder in chunks of the given sizes (cycled); join what it reports."""
    decoder = DtmfDecoder()
    out = []
    pos = 0
    i = 0
    while pos < len(ulaw):
        size = sizes[i % len(sizes)]
        out.append(decoder.feed(ulaw[pos : pos + size]))
        pos += size
        i += 1
    return "".join(out)


# --- keys and validation ------------------------------------------------------------------


def test_keypad_table() -> None:
    assert KEYS == "123A456B789C*0#D"
    layout = ["123A", "456B", "789C", "*0#D"]
    for r, row in enumerate(layout):
        for c, key in enumerate(row):
            assert key_frequencies(key) == (ROW_HZ[r], COL_HZ[c])
    assert ROW_HZ == (697, 770, 852, 941)
    assert COL_HZ == (1209, 1336, 1477, 1633)
    for lower in "abcd":
        assert key_frequencies(lower) == key_frequencies(lower.upper())
    with pytest.raises(KeyError):
        key_frequencies("w")


@pytest.mark.parametrize("digits", ["1", "0123456789*#ABCD", "abcd", "1w2W3", "w", "5" * 64])
def test_problem_accepts_keys_and_pauses(digits: str) -> None:
    assert problem(digits) is None


@pytest.mark.parametrize(
    ("digits", "reason"),
    [
        ("", "no keys"),
        ("5" * 65, "more than 64 keys"),
        ("w" * 65, "more than 64 keys"),
        ("12x4", "character 3 is not a keypad key or w"),
        ("x", "character 1 is not a keypad key or w"),
        ("1 2", "character 2 is not a keypad key or w"),
        ("123e", "character 4 is not a keypad key or w"),
        ("12\n", "character 3 is not a keypad key or w"),
        ("\u0661", "character 1 is not a keypad key or w"),  # ARABIC-INDIC DIGIT ONE
        ("1\uff12", "character 2 is not a keypad key or w"),  # FULLWIDTH DIGIT TWO
        ("#,", "character 2 is not a keypad key or w"),
    ],
)
def test_problem_names_the_first_bad_character_by_position(digits: str, reason: str) -> None:
    assert problem(digits) == reason


def test_problem_max_keys() -> None:
    assert problem("123", max_keys=3) is None
    assert problem("1234", max_keys=3) == "more than 3 keys"
    assert problem(123) == "the keys are not a string"  # type: ignore[arg-type]


_REASON = re.compile(
    r"no keys|more than \d+ keys|character \d+ is not a keypad key or w|the keys are not a string"
)


@given(st.text(max_size=80))
def test_problem_never_echoes_the_input(text: str) -> None:
    reason = problem(text)
    if reason is not None:
        assert _REASON.fullmatch(reason), reason


@pytest.mark.parametrize("digits", ["", "12x", "1" * 65])
def test_tones_ulaw_raises_the_problem(digits: str) -> None:
    reason = problem(digits)
    assert reason is not None
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
        tones_ulaw(digits)


@pytest.mark.parametrize(
    "kwargs", [{"tone_ms": 0}, {"tone_ms": -20}, {"gap_ms": -1}, {"pause_ms": -1}, {"tone_ms": 2.5}]
)
def test_tones_ulaw_rejects_bad_durations(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be an integer number of ms"):
        tones_ulaw("1", **kwargs)


# --- the tones -----------------------------------------------------------------------------


def test_default_timings_100_ms_tone_100_ms_gap_500_ms_pause() -> None:
    one = tones_ulaw("1")
    assert len(one) == 200 * MS
    tone, gap = one[: 100 * MS], one[100 * MS :]
    assert set(gap) == {ULAW_SILENCE}
    x = decoded(tone)
    loud = np.flatnonzero(np.abs(x) > 0.01 * TONE_AMPLITUDE)
    assert loud[0] <= 2 and loud[-1] >= 100 * MS - 3  # the tone fills its 100 ms
    assert np.abs(x[: 20 * MS]).max() > TONE_AMPLITUDE  # and is loud from early on

    layout = tones_ulaw("1w2")
    assert len(layout) == (100 + 100 + 500 + 100 + 100) * MS
    assert layout[: 200 * MS] == one
    assert set(layout[200 * MS : 700 * MS]) == {ULAW_SILENCE}  # the pause, no gap after it
    assert layout[700 * MS :] == tones_ulaw("2")
    assert tones_ulaw("w") == bytes([ULAW_SILENCE]) * 500 * MS
    assert tones_ulaw("wW") == bytes([ULAW_SILENCE]) * 1000 * MS


def test_custom_timings() -> None:
    audio = tones_ulaw("12w", tone_ms=60, gap_ms=40, pause_ms=200)
    assert len(audio) == (60 + 40 + 60 + 40 + 200) * MS
    assert set(audio[60 * MS : 100 * MS]) == {ULAW_SILENCE}
    assert len(tones_ulaw("3", tone_ms=1, gap_ms=0)) == MS


@given(
    st.text(alphabet="0123456789*#ABCDabcdwW", min_size=1, max_size=12),
    st.integers(1, 10),
    st.integers(0, 10),
    st.integers(0, 30),
)
@settings(max_examples=50)
def test_whole_frames_when_durations_are_20_ms_multiples(
    digits: str, tone: int, gap: int, pause: int
) -> None:
    audio = tones_ulaw(digits, tone_ms=20 * tone, gap_ms=20 * gap, pause_ms=20 * pause)
    assert len(audio) % FRAME == 0


def test_lower_case_keys_sound_like_upper_case() -> None:
    assert tones_ulaw("abcd") == tones_ulaw("ABCD")
    assert tones_ulaw("1w2") == tones_ulaw("1W2")


def _peaks_hz(x: Samples) -> tuple[float, float, Samples, Samples]:
    """Strongest frequency in 600-1000 Hz and in 1150-1700 Hz (1 Hz grid), and the spectrum."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=FS))  # bin k is k Hz
    freqs = np.arange(len(spectrum), dtype=np.float64)
    low = 600 + int(np.argmax(spectrum[600:1000]))
    high = 1150 + int(np.argmax(spectrum[1150:1700]))
    return float(low), float(high), spectrum, freqs


@pytest.mark.parametrize("key", list(KEYS))
def test_each_key_is_its_row_and_column_frequency(key: str) -> None:
    x = decoded(tones_ulaw(key)[: 100 * MS])
    low, high, spectrum, freqs = _peaks_hz(x)
    row_hz, col_hz = key_frequencies(key)
    assert abs(low - row_hz) <= 1
    assert abs(high - col_hz) <= 1
    # equal levels, and nothing else anywhere near: outside +-40 Hz of the two tones the
    # spectrum stays 40 dB down (the fades leave no splatter into other keys' frequencies)
    peak_low, peak_high = spectrum[int(low)], spectrum[int(high)]
    assert abs(20 * math.log10(peak_low / peak_high)) < 0.5
    away = (np.abs(freqs - row_hz) > 40) & (np.abs(freqs - col_hz) > 40)
    assert spectrum[away].max() < 0.01 * min(peak_low, peak_high)


def test_level_is_loud_but_never_clips() -> None:
    x = decoded(tones_ulaw(KEYS))
    peak = np.abs(x).max()
    assert peak <= 2 * TONE_AMPLITUDE * 1.03  # two tones at -9 dBFS: at most about -3 dBFS
    assert peak >= 2 * TONE_AMPLITUDE * 0.9  # the sum does come close to that peak
    assert peak < 32124 * 0.75  # 32124 is the largest mu-law value: >= 2.5 dB headroom
    # each tone's own level: least-squares amplitude of the row sine over the steady part
    for key in "1D":
        steady = decoded(tones_ulaw(key))[10 * MS : 90 * MS]
        n = np.arange(10 * MS, 90 * MS)
        for hz in key_frequencies(key):
            basis = np.stack([np.sin(2 * np.pi * hz * n / FS), np.cos(2 * np.pi * hz * n / FS)])
            coef, *_ = np.linalg.lstsq(basis.T, steady, rcond=None)
            dbfs = 20 * math.log10(math.hypot(*coef) / 32767)
            assert -9.3 < dbfs < -8.7


def test_tones_fade_in_and_out_without_a_click() -> None:
    x = decoded(tones_ulaw("D")[: 100 * MS])
    assert np.abs(x[:4]).max() < 0.05 * TONE_AMPLITUDE
    assert np.abs(x[-4:]).max() < 0.05 * TONE_AMPLITUDE
    step = np.abs(np.diff(np.concatenate([[0.0], x, [0.0]])))
    assert step[:8].max() < 0.25 * step.max()  # no jump at the edges


# --- Goertzel ------------------------------------------------------------------------------


def goertzel_power(block: Samples, freq: float) -> float:
    """The textbook Goertzel recurrence (deliberately scalar): |DFT of block at freq|**2."""
    coeff = 2 * math.cos(2 * math.pi * freq / FS)
    s1 = s2 = 0.0
    for sample in block:
        s1, s2 = float(sample) + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def test_block_powers_are_the_goertzel_powers() -> None:
    rng = np.random.default_rng(3)
    block = rng.standard_normal(BLOCK_SAMPLES) * 3000 + sine(770, BLOCK_SAMPLES) * 0.3
    y = dtmf._BASIS @ block
    powers = y[:8] ** 2 + y[8:] ** 2
    for freq, power in zip(ROW_HZ + COL_HZ, powers, strict=True):
        assert power == pytest.approx(goertzel_power(block, freq), rel=1e-9)


# --- decoding DTMF -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "digits", ["0123456789*#ABCD", "1111", "55#5", "1w1", "1ww2w3", "D*#0", "ab"]
)
@pytest.mark.parametrize("chunk", [1, 7, 80, 160, 205, 333, 1 << 20])
def test_every_key_once_in_order_whatever_the_chunking(digits: str, chunk: int) -> None:
    expected = digits.replace("w", "").replace("W", "").upper()
    assert feed_in_chunks(tones_ulaw(digits), [chunk]) == expected


@given(
    st.text(alphabet="0123456789*#ABCDabcdwW", min_size=1, max_size=16),
    st.lists(st.integers(1, 500), min_size=1, max_size=8),
    st.integers(0, 400),
)
@settings(max_examples=150, deadline=None)
def test_round_trip(digits: str, chunks: list[int], lead_in: int) -> None:
    audio = bytes([ULAW_SILENCE]) * lead_in + tones_ulaw(digits)
    expected = "".join(ch.upper() for ch in digits if ch not in "wW")
    assert feed_in_chunks(audio, chunks) == expected
    assert decode_ulaw(audio) == expected


def test_keys_are_reported_in_the_chunk_that_confirms_them() -> None:
    """Fed 20 ms frames, a key comes out once, 40-66 ms after its tone starts (+ the frame)."""
    for lead_in in range(0, BLOCK_SAMPLES, 3):
        audio = bytes([ULAW_SILENCE]) * lead_in + tones_ulaw("7")
        decoder = DtmfDecoder()
        reports = [
            (end, keys)
            for end in range(FRAME, len(audio) + FRAME, FRAME)
            if (keys := decoder.feed(audio[end - FRAME : end]))
        ]
        assert len(reports) == 1
        end, keys = reports[0]
        assert keys == "7"
        assert 39 * MS < end - lead_in < 66 * MS + FRAME


def test_decoder_state_across_calls_and_reset() -> None:
    audio = tones_ulaw("42")
    decoder = DtmfDecoder()
    assert decoder.feed(b"") == ""
    assert decoder.feed(audio[:1000]) == "4"
    decoder.reset()  # forgets the held 4 and the partial block
    assert decoder.feed(audio[1000:]) == "2"
    assert decoder.feed(audio) == "42"
    # a key held across calls is reported once
    assert decoder.feed(tones_ulaw("9", tone_ms=1000)[: 30 * MS]) == ""
    long_nine = tones_ulaw("9", tone_ms=1000)
    decoder.reset()
    assert [decoder.feed(long_nine[i : i + FRAME]) for i in range(0, len(long_nine), FRAME)].count(
        "9"
    ) == 1


@pytest.mark.parametrize("lead_in", range(0, BLOCK_SAMPLES, 5))
def test_minimum_tone_and_gap(lead_in: int) -> None:
    silence = bytes([ULAW_SILENCE]) * lead_in
    assert decode_ulaw(silence + tones_ulaw("3", tone_ms=60)) == "3"  # >= 60 ms: always
    assert decode_ulaw(silence + tones_ulaw("3", tone_ms=20)) == ""  # 20 ms: never
    assert decode_ulaw(silence + tones_ulaw("33", gap_ms=60)) == "33"  # a 60 ms gap releases
    assert decode_ulaw(silence + tones_ulaw("33", gap_ms=20)) == "3"  # 20 ms does not


def test_next_key_without_a_gap() -> None:
    assert decode_ulaw(tones_ulaw("1", gap_ms=0) + tones_ulaw("2")) == "12"


def attenuated(ulaw: bytes, db: float) -> bytes:
    return encoded(decoded(ulaw) * 10 ** (-db / 20))


def test_decodes_20_db_down_like_a_long_phone_line() -> None:
    audio = tones_ulaw("0123456789*#ABCD1111")
    assert decode_ulaw(attenuated(audio, 20)) == "0123456789*#ABCD1111"
    assert decode_ulaw(attenuated(audio, 26)) == "0123456789*#ABCD1111"
    assert decode_ulaw(attenuated(audio, 40)) == ""  # below the -38 dBFS sensitivity


def with_noise(ulaw: bytes, snr_db: float, seed: int, tone_db: float = 0.0) -> bytes:
    """Add white noise snr_db below the power of a key's tones (after tone_db of gain).

    A key's two tones of peak A have a mean square of A**2, so the noise RMS is A / 10**(snr/20).
    """
    x = decoded(ulaw)
    sigma = TONE_AMPLITUDE * 10 ** ((tone_db - snr_db) / 20)
    return encoded(x + np.random.default_rng(seed).standard_normal(len(x)) * sigma)


@pytest.mark.parametrize("seed", range(5))
def test_decodes_with_white_noise_20_db_down(seed: int) -> None:
    digits = "0123456789*#ABCD55#5"
    assert decode_ulaw(with_noise(tones_ulaw(digits), 20, seed)) == digits
    faint = attenuated(tones_ulaw(digits), 20)  # both at once: -29 dBFS tones, 20 dB SNR
    assert decode_ulaw(with_noise(faint, 20, seed, tone_db=-20)) == digits


def two_tones(row_hz: float, col_hz: float, row_db: float = 0, col_db: float = 0) -> bytes:
    """100 ms of a row and a column tone (each at the documented level plus its dB), then 100 ms
    of silence."""
    n = 100 * MS
    x = sine(row_hz, n) * 10 ** (row_db / 20) + sine(col_hz, n, phase=1.0) * 10 ** (col_db / 20)
    return encoded(np.concatenate([x, np.zeros(100 * MS)]))


@pytest.mark.parametrize("deviation", [-0.01, 0.01])
def test_accepts_frequencies_1_percent_off(deviation: float) -> None:
    for key in KEYS:
        row_hz, col_hz = key_frequencies(key)
        assert decode_ulaw(two_tones(row_hz * (1 + deviation), col_hz * (1 - deviation))) == key
        assert decode_ulaw(two_tones(row_hz * (1 + deviation), col_hz * (1 + deviation))) == key


@pytest.mark.parametrize("deviation", [-0.035, -0.03, 0.03, 0.035])
def test_rejects_frequencies_3_percent_off(deviation: float) -> None:
    for key in KEYS:
        row_hz, col_hz = key_frequencies(key)
        assert decode_ulaw(two_tones(row_hz * (1 + deviation), col_hz)) == ""
        assert decode_ulaw(two_tones(row_hz, col_hz * (1 + deviation))) == ""
        assert decode_ulaw(two_tones(row_hz * (1 + deviation), col_hz * (1 + deviation))) == ""
        assert decode_ulaw(two_tones(row_hz * (1 + deviation), col_hz * (1 - deviation))) == ""


def test_twist_limits() -> None:
    row_hz, col_hz = key_frequencies("5")
    assert decode_ulaw(two_tones(row_hz, col_hz, col_db=-6)) == "5"  # row 6 dB stronger
    assert decode_ulaw(two_tones(row_hz, col_hz, row_db=-3)) == "5"  # column 3 dB stronger
    assert decode_ulaw(two_tones(row_hz, col_hz, col_db=-10)) == ""  # > 8 dB normal twist
    assert decode_ulaw(two_tones(row_hz, col_hz, row_db=-6)) == ""  # > 4 dB reverse twist


def test_two_rows_or_two_columns_at_once_is_no_key() -> None:
    n = 100 * MS
    rows = sine(697, n) + sine(770, n, phase=0.5) + sine(1209, n, phase=1.0)
    cols = sine(852, n) + sine(1336, n, phase=0.5) + sine(1477, n, phase=1.0)
    assert decode_ulaw(encoded(rows * 0.7)) == ""
    assert decode_ulaw(encoded(cols * 0.7)) == ""


# --- rejecting what is not DTMF ------------------------------------------------------------


def test_silence_and_noise_are_no_keys() -> None:
    assert decode_ulaw(bytes([ULAW_SILENCE]) * 8000) == ""
    assert decode_ulaw(bytes([0x7F]) * 8000) == ""  # mu-law "negative zero"
    rng = np.random.default_rng(11)
    for dbfs in (-60, -40, -20, -10, -3):
        noise = rng.standard_normal(5 * FS) * 32768 * 10 ** (dbfs / 20)
        assert decode_ulaw(encoded(noise)) == "", dbfs


@pytest.mark.parametrize("freq", [*ROW_HZ, *COL_HZ, 440.0, 1000.0, 2000.0])
def test_a_single_sine_is_no_key(freq: float) -> None:
    assert decode_ulaw(encoded(sine(freq, FS))) == ""
    assert decode_ulaw(encoded(sine(freq, FS) * 1.9)) == ""


def sawtooth(f0: Samples, amplitude: float = 12000.0) -> Samples:
    """Band-limited sawtooth (harmonics 1/k up to 3.8 kHz) following the f0 contour (Hz)."""
    phase = 2 * np.pi * np.cumsum(f0) / FS
    x = np.zeros(len(f0))
    for k in range(1, int(3800 / f0.min()) + 1):
        x += np.where(k * f0 < 3800, np.sin(k * phase) / k, 0.0)
    return x * (amplitude / float(np.abs(x).max()))


def test_a_150_hz_sawtooth_is_no_key() -> None:
    assert decode_ulaw(encoded(sawtooth(np.full(2 * FS, 150.0)))) == ""


def test_a_key_under_louder_speech_like_sound_is_no_key() -> None:
    """Purity: the two tones must carry at least half of the energy."""
    n = 200 * MS
    key = decoded(tones_ulaw("6", tone_ms=200, gap_ms=0))
    buzz = sawtooth(np.full(n, 123.0), amplitude=1.0)
    buzz *= TONE_AMPLITUDE / math.sqrt(np.mean(buzz**2))  # the key's mean square: A**2
    assert decode_ulaw(encoded(key + buzz * 10 ** (-10 / 20))) == "6"  # 10 dB under: a key
    assert decode_ulaw(encoded((key + buzz * 10 ** (3 / 20)) * 0.6)) == ""  # 3 dB over: none


def test_steady_sawtooths_of_any_pitch_are_no_keys() -> None:
    for f0 in np.arange(70.0, 420.0, 2.5):
        assert decode_ulaw(encoded(sawtooth(np.full(FS // 5, f0)))) == "", f0


def chirp(f_start: float, f_end: float, seconds: float, amplitude: float = 12000.0) -> Samples:
    """A linear sweep from f_start to f_end Hz."""
    n = int(seconds * FS)
    freq = np.linspace(f_start, f_end, n)
    return amplitude * np.sin(2 * np.pi * np.cumsum(freq) / FS)


def test_chirps_are_no_keys() -> None:
    for f_start, f_end in ((300, 3400), (3400, 300), (600, 1700), (1650, 680)):
        assert decode_ulaw(encoded(chirp(f_start, f_end, 3.0))) == ""
    # two sweeps at once, crossing the row and the column band in opposite directions
    both = chirp(500, 1800, 1.0, 9000) + chirp(1800, 500, 1.0, 9000)
    assert decode_ulaw(encoded(both)) == ""
    both = chirp(650, 1000, 0.5, 9000) + chirp(1700, 1150, 0.5, 9000)
    assert decode_ulaw(encoded(both)) == ""


# (F1, F2, F3) of some vowels, Hz; /a/ and /o/ put F1 and F2 in the row and column bands
VOWELS = {
    "a": (730, 1090, 2440),
    "i": (270, 2290, 3010),
    "u": (300, 870, 2240),
    "e": (530, 1840, 2480),
    "o": (570, 840, 2410),
    "ae": (660, 1720, 2410),
    "er": (490, 1350, 1690),
}


def vowel(f0: Samples, formants: tuple[int, int, int], seed: int = 0) -> Samples:
    """Speech-like voiced sound: harmonics of f0 (1/k) shaped by three formant resonances."""
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * np.cumsum(f0) / FS
    x = np.zeros(len(f0))
    for k in range(1, int(3800 / f0.min()) + 1):
        fk = k * f0
        gain = np.ones(len(f0))
        for formant, bandwidth in zip(formants, (90, 110, 170), strict=True):
            gain *= formant**2 / np.sqrt((formant**2 - fk**2) ** 2 + (bandwidth * fk) ** 2)
        x += np.where(fk < 3800, gain / k, 0.0) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return x * (12000 / float(np.abs(x).max()))


def test_steady_vowels_of_any_pitch_are_no_keys() -> None:
    """Sung vowels, the hardest speech-like case: a fixed pitch held for 100 ms."""
    for name, formants in VOWELS.items():
        for f0 in np.arange(80.0, 400.0, 1.5):
            assert decode_ulaw(encoded(vowel(np.full(100 * MS, f0), formants))) == "", (name, f0)


def test_speech_like_utterances_are_no_keys_and_keys_after_them_still_are() -> None:
    t = np.arange(FS) / FS
    rng = np.random.default_rng(5)
    parts = []
    for i, formants in enumerate(VOWELS.values()):
        # intonation: a glide between two pitches, 5 Hz vibrato, syllable-rate loudness
        start, end = rng.uniform(90, 260, size=2)
        f0 = start + (end - start) * t + 4 * np.sin(2 * np.pi * 5 * t)
        envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t + i)
        parts.append(vowel(f0, formants, seed=i) * envelope)
    speech = encoded(np.concatenate(parts))
    assert decode_ulaw(speech) == ""
    assert decode_ulaw(speech + tones_ulaw("#42")) == "#42"

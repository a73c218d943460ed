"""The simulated callees: what each sends once it answers, and what answering machine
detection makes of it."""

from __future__ import annotations

import numpy as np
import pytest

from voxd.sim.callee import HELLO_SECONDS, Callee
from voxd.sim.caller import RATE


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[int(np.argmax(spectrum))])


def loud(samples: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > 300


def test_a_human_says_hello_and_nothing_more():
    sound = Callee("human").sound()
    assert len(sound) == round(HELLO_SECONDS * RATE) and loud(sound)
    assert sound.dtype == np.int16


def test_a_voicemail_plays_its_greeting_then_a_1khz_beep():
    machine = Callee("voicemail", greeting_seconds=3.0, beep_seconds=0.4)
    sound = machine.sound()
    assert len(sound) == round(3.4 * RATE)
    greeting, tone = sound[:3 * RATE], sound[3 * RATE:]
    assert loud(greeting) and dominant_hz(greeting) != pytest.approx(1000, abs=20)
    assert dominant_hz(tone) == pytest.approx(1000, abs=5) and loud(tone)
    assert dominant_hz(Callee("voicemail", beep_hz=1400).sound()[-800:]) == pytest.approx(
        1400, abs=10)


def test_given_audio_replaces_the_callee_sound():
    audio = np.arange(100, dtype=np.int16)
    assert np.array_equal(Callee("human", audio=audio).sound(), audio)


@pytest.mark.parametrize(("callee", "mode", "expected"), [
    (Callee("human", amd_seconds=1.5), "Enable", ("human", 1.5)),
    (Callee("human", amd_seconds=1.5), "DetectMessageEnd", ("human", 1.5)),
    (Callee("voicemail", amd_seconds=0.8), "Enable", ("machine_start", 0.8)),
    (Callee("voicemail", greeting_seconds=2.0, beep_seconds=0.5), "DetectMessageEnd",
     ("machine_end_beep", 2.5)),
    (Callee("voicemail", greeting_seconds=40.0), "DetectMessageEnd", ("unknown", 30.0)),
    (Callee("voicemail", answered_by="fax"), "Enable", ("fax", 1.0)),
])
def test_answering_machine_detection(callee, mode, expected):
    assert callee.detection(mode, timeout=30.0) == expected

"""Turn latency is located on Twilio's media clock, not on packet arrival times."""

from __future__ import annotations

from voxd.call.turns import TurnTimer

LOUD, QUIET = -20.0, -90.0


def feed(timer: TurnTimer, pattern: list[float], arrivals: list[float],
         start_ms: int = 0) -> list[bool]:
    return [timer.caller_audio(start_ms + i * 20, 160, energy, arrivals[i])
            for i, energy in enumerate(pattern)]


def test_latency_runs_from_the_last_voiced_frame_on_the_media_clock():
    timer = TurnTimer(min_speech_ms=60, hangover_ms=300)
    pattern = [QUIET] * 5 + [LOUD] * 25 + [QUIET] * 20  # speech 100..600 ms
    # A frame leaves once its 20 ms are captured, then takes 40 ms of network delay plus up to
    # 35 ms of jitter.
    jitter = [0, 10, 35, 5, 0, 20, 0, 15, 30, 0] * 5
    arrivals = [10.0 + 0.040 + ((i + 1) * 20 + jitter[i]) / 1000 for i in range(len(pattern))]
    started = feed(timer, pattern, arrivals)
    assert started.index(True) == 7  # confirmed after min_speech (3 frames)
    # Speech ended at 600 ms on the caller's clock = 10.0 + 0.040 + 0.600 on voxd's clock.
    latency = timer.assistant_audio(10.0 + 0.040 + 0.600 + 0.250)
    assert latency is not None and abs(latency - 0.250) < 1e-9
    assert timer.latencies == [latency]
    assert timer.assistant_audio(20.0) is None  # one answer per turn


def test_audio_already_playing_before_the_turn_ended_is_not_an_answer():
    timer = TurnTimer(min_speech_ms=60, hangover_ms=100)
    pattern = [LOUD] * 10 + [QUIET] * 10
    feed(timer, pattern, [1.0 + (i + 1) * 0.02 for i in range(20)])
    assert timer.assistant_audio(burst_started_at=1.1) is None  # began mid-utterance
    assert timer.assistant_audio(burst_started_at=1.5) is not None  # a new burst after


def test_a_new_utterance_before_the_answer_moves_the_turn_end():
    timer = TurnTimer(min_speech_ms=40, hangover_ms=100)
    pattern = [LOUD] * 5 + [QUIET] * 10 + [LOUD] * 5 + [QUIET] * 10
    feed(timer, pattern, [(i + 1) * 0.02 for i in range(30)])
    latency = timer.assistant_audio(0.5 + 0.1)  # second utterance ended at 400 ms
    assert latency is not None and abs(latency - 0.2) < 1e-9
    assert len(timer.latencies) == 1


def test_no_turn_without_speech():
    timer = TurnTimer()
    feed(timer, [QUIET] * 50, [(i + 1) * 0.02 for i in range(50)])
    assert timer.assistant_audio(5.0) is None

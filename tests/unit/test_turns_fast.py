"""Answers that begin inside the speech detector's hangover (a fast assistant): counted once
the caller's turn is known to have ended, with the latency from the last loud frame; audio
that begins while the caller is still speaking, or in a pause the caller then breaks, is not
an answer."""

from __future__ import annotations

from voxd.call.turns import TurnTimer

LOUD, QUIET = -20.0, -90.0
DELAY = 0.040  # network delay of every frame; each leaves once its 20 ms are captured


def arrival(i: int) -> float:
    return 10.0 + DELAY + (i + 1) * 0.02


class Call:
    """A TurnTimer fed frame by frame, with the late answers it reports."""

    def __init__(self, hangover_ms: int = 300) -> None:
        self.late: list[tuple[float, float]] = []
        self.timer = TurnTimer(min_speech_ms=60, hangover_ms=hangover_ms,
                               on_late_answer=lambda lat, at: self.late.append((lat, at)))
        self.i = 0

    def frames(self, energy: float, n: int) -> None:
        for _ in range(n):
            self.timer.caller_audio(self.i * 20, 160, energy, arrival(self.i))
            self.i += 1

    def media_end(self) -> float:
        """voxd's time of the end of the frames fed so far (on the media clock)."""
        return 10.0 + DELAY + self.i * 0.02


def test_an_answer_inside_the_hangover_counts_once_the_turn_has_ended():
    call = Call(hangover_ms=300)
    call.frames(QUIET, 5)
    call.frames(LOUD, 25)  # speech 100..600 ms
    speech_end = call.media_end()
    call.frames(QUIET, 10)  # 200 ms into the 300 ms hangover
    burst = speech_end + 0.200
    assert call.timer.assistant_audio(burst) is None  # not known yet
    assert call.late == [] and call.timer.latencies == []
    call.frames(QUIET, 4)  # still inside the hangover: the echo of the answer is gated out
    assert call.late == []
    call.frames(QUIET, 1)  # the hangover (15 frames) runs out: it was the answer
    assert len(call.late) == 1
    latency, at = call.late[0]
    assert abs(latency - 0.200) < 1e-9 and at == burst
    assert call.timer.latencies == [latency]
    assert call.timer.assistant_audio(call.media_end() + 1.0) is None  # one answer per turn
    assert len(call.timer.latencies) == 1


def test_an_answer_after_the_hangover_is_timed_at_once_as_before():
    call = Call(hangover_ms=300)
    call.frames(LOUD, 20)
    speech_end = call.media_end()
    call.frames(QUIET, 20)  # 400 ms: the hangover ran out
    latency = call.timer.assistant_audio(speech_end + 0.400)
    assert latency is not None and abs(latency - 0.400) < 1e-9
    assert call.late == [] and call.timer.latencies == [latency]


def test_audio_while_the_caller_is_clearly_speaking_is_no_answer():
    call = Call(hangover_ms=300)
    call.frames(LOUD, 10)
    talk_over = call.media_end()  # the assistant starts talking over the caller
    assert call.timer.assistant_audio(talk_over) is None
    call.frames(LOUD, 15)
    call.frames(QUIET, 20)  # the turn ends, the burst that began mid-speech goes on
    assert call.late == [] and call.timer.latencies == []
    # The assistant's next burst is the answer, timed from the real end of speech.
    latency = call.timer.assistant_audio(arrival(24) + 0.6)
    assert latency is not None and abs(latency - 0.6) < 1e-9


def test_audio_in_a_pause_the_caller_then_breaks_is_no_answer():
    call = Call(hangover_ms=300)
    call.frames(LOUD, 15)
    pause_start = call.media_end()
    call.frames(QUIET, 5)  # a 100 ms pause inside the utterance
    assert call.timer.assistant_audio(pause_start + 0.090) is None  # talks into the pause
    call.frames(QUIET, 3)
    call.frames(LOUD, 10)  # the caller goes on: the assistant talked over them
    speech_end = call.media_end()
    call.frames(QUIET, 20)
    assert call.late == [] and call.timer.latencies == []
    latency = call.timer.assistant_audio(speech_end + 0.5)  # the real answer, after the end
    assert latency is not None and abs(latency - 0.5) < 1e-9


def test_the_last_burst_before_the_end_is_the_one_that_can_answer():
    call = Call(hangover_ms=300)
    call.frames(LOUD, 10)
    call.timer.assistant_audio(call.media_end())  # talk-over, mid-speech
    call.frames(LOUD, 10)
    speech_end = call.media_end()
    call.frames(QUIET, 4)
    call.timer.assistant_audio(speech_end + 0.080)  # a new burst, in the final pause
    call.frames(QUIET, 15)
    assert [round(lat, 9) for lat, _ in call.late] == [0.08]


def test_a_loud_frame_that_arrives_late_but_was_spoken_before_the_answer_moves_the_end():
    timer = TurnTimer(min_speech_ms=60, hangover_ms=100)
    late: list[float] = []
    timer.on_late_answer = lambda lat, at: late.append(lat)
    for i in range(10):
        timer.caller_audio(i * 20, 160, LOUD, 1.0 + (i + 1) * 0.02)  # speech 0..200 ms
    # The frame 200..220 ms is loud but delayed by 60 ms; the answer began at 1.23 s
    timer.assistant_audio(1.23)
    timer.caller_audio(200, 160, LOUD, 1.28)
    for i in range(11, 20):
        timer.caller_audio(i * 20, 160, QUIET, 1.0 + (i + 1) * 0.02)
    # The end is 220 ms on the media clock = 1.22 s: the answer came 10 ms after it.
    assert len(late) == 1 and abs(late[0] - 0.010) < 1e-9


def test_without_a_listener_a_late_answer_is_still_counted():
    timer = TurnTimer(min_speech_ms=60, hangover_ms=100)
    for i in range(10):
        timer.caller_audio(i * 20, 160, LOUD, (i + 1) * 0.02)
    timer.assistant_audio(0.25)
    for i in range(10, 20):
        timer.caller_audio(i * 20, 160, QUIET, (i + 1) * 0.02)
    assert [round(x, 9) for x in timer.latencies] == [0.05]

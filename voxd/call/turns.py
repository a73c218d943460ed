"""Per-turn response latency: end of the caller's speech -> first assistant audio sent.

The end of speech is located on Twilio's own media clock (`media.timestamp`, ms since the
stream started: when the caller spoke, not when the packet happened to arrive), then mapped
onto voxd's clock with the smallest (arrival - timestamp) offset seen so far: the least-delayed
frame is the best estimate of the constant part of the path. Pure: callers pass in the times.
"""

from __future__ import annotations

from collections.abc import Callable

from voxd.audio.line import BYTES_PER_MS
from voxd.audio.vad import SpeechDetector, SpeechEdge


class TurnTimer:
    """Follows caller speech frame by frame and times the assistant's answer to each turn.

    What a turn is. The caller's utterance runs from the speech detector's STARTED to its
    STOPPED; its end is the end of its last loud frame (on the media clock, mapped as the
    module doc says), not the end of the hangover (the quiet that confirms it). The answer
    is the first assistant burst (a start of audio after Twilio's queue ran dry, see
    `Playback`) that begins at or after that end; its latency is burst start - end.

    - A burst that begins after STOPPED is timed at once (`assistant_audio` returns it).
    - A burst that begins during the hangover (the caller quiet, the detector not yet sure)
      may be the answer too: a fast assistant replies within voxd's hangover. It is held and
      decided when the detector is: at STOPPED, if the utterance's last loud frame still ends
      at or before the burst's start, it was the answer; the turn is counted then, with the
      same latency, and `on_late_answer(latency, burst_started_at)` is told.
    - If the caller speaks again after the burst began (before the hangover ran out), the
      pause was not the end of the turn: the assistant talked over the caller, and that
      burst is no answer (the utterance's end moves past it). Neither is a burst that began
      while the caller was speaking, nor the rest of a burst that began before the end.
    - The assistant's own audio echoed back is gated out before it gets here (`Session`):
      it neither starts an utterance nor moves its end. Echo loud enough to pass the gate
      looks like the caller speaking, and a held answer is then not counted.
    - One answer per turn: a caller utterance ends once (STOPPED) and is answered at most once;
      a later utterance before the answer moves the end (the answer then answers both).

    Cost: nothing more per caller frame; the held answer is a float set at a burst's start
    and read at STOPPED.
    """

    def __init__(self, threshold_dbfs: float = -40.0, min_speech_ms: int = 120,
                 hangover_ms: int = 300,
                 on_late_answer: Callable[[float, float], object] | None = None) -> None:
        self.detector = SpeechDetector(threshold_dbfs=threshold_dbfs,
                                       min_speech_ms=min_speech_ms, hangover_ms=hangover_ms)
        self.threshold_dbfs = threshold_dbfs
        self.latencies: list[float] = []
        self.on_late_answer = on_late_answer
        self._offset = float("inf")
        self._last_loud_end_ms = 0
        self._pending_end: float | None = None
        self._burst_in_speech: float | None = None
        """Start of the latest burst that began while the caller's utterance was open."""

    def caller_audio(self, timestamp_ms: int, nbytes: int, energy_dbfs: float,
                     arrived_at: float) -> bool:
        """Account one caller frame (mu-law, `nbytes` long); True when caller speech starts."""
        end_ms = timestamp_ms + nbytes // BYTES_PER_MS
        # A frame can be sent only once its audio has been captured: map its end, not its
        # start, onto the arrival time (else every turn end lands one frame late).
        offset = arrived_at - end_ms / 1000
        if offset < self._offset:
            self._offset = offset
        if energy_dbfs > self.threshold_dbfs:  # the same test as the detector
            self._last_loud_end_ms = end_ms
        edge = self.detector.update(energy_dbfs)
        if edge is SpeechEdge.STARTED:
            self._pending_end = None
            self._burst_in_speech = None
            return True
        if edge is SpeechEdge.STOPPED:
            end = self._last_loud_end_ms / 1000 + self._offset
            burst = self._burst_in_speech
            self._burst_in_speech = None
            if burst is not None and burst >= end:  # answered within the hangover
                self._pending_end = None
                self._answered(burst - end, burst)
            else:
                self._pending_end = end
        return False

    def assistant_audio(self, burst_started_at: float) -> float | None:
        """Assistant audio is going out in a burst that began at `burst_started_at`: the turn's
        latency, if that burst is the first to begin after a finished caller turn. A burst
        that begins while the caller's utterance is open is held until the detector decides
        (see the class doc): None now, `on_late_answer` later if it was the answer."""
        if self.detector.in_speech:
            self._burst_in_speech = burst_started_at
            return None
        if self._pending_end is None or burst_started_at < self._pending_end:
            return None
        latency = burst_started_at - self._pending_end
        self._pending_end = None
        self.latencies.append(latency)
        return latency

    def _answered(self, latency: float, burst_started_at: float) -> None:
        self.latencies.append(latency)
        if self.on_late_answer is not None:
            self.on_late_answer(latency, burst_started_at)

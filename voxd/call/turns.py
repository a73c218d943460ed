"""Per-turn response latency: end of the caller's speech -> first assistant audio sent.

The end of speech is located on Twilio's own media clock (`media.timestamp`, ms since the
stream started: when the caller spoke, not when the packet happened to arrive), then mapped
onto voxd's clock with the smallest (arrival - timestamp) offset seen so far: the least-delayed
frame is the best estimate of the constant part of the path. Pure: callers pass in the times.
"""

from __future__ import annotations

from voxd.audio.line import BYTES_PER_MS
from voxd.audio.vad import SpeechDetector, SpeechEdge


class TurnTimer:
    """Follows caller speech frame by frame and times the assistant's answer to each turn."""

    def __init__(self, threshold_dbfs: float = -40.0, min_speech_ms: int = 120,
                 hangover_ms: int = 300) -> None:
        self.detector = SpeechDetector(threshold_dbfs=threshold_dbfs,
                                       min_speech_ms=min_speech_ms, hangover_ms=hangover_ms)
        self.threshold_dbfs = threshold_dbfs
        self.latencies: list[float] = []
        self._offset = float("inf")
        self._last_loud_end_ms = 0
        self._pending_end: float | None = None

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
            return True
        if edge is SpeechEdge.STOPPED:
            self._pending_end = self._last_loud_end_ms / 1000 + self._offset
        return False

    def assistant_audio(self, burst_started_at: float) -> float | None:
        """Assistant audio is going out in a burst that began at `burst_started_at`: the turn's
        latency, if that burst is the first to begin after a finished caller turn."""
        if self._pending_end is None or burst_started_at < self._pending_end:
            return None
        latency = burst_started_at - self._pending_end
        self._pending_end = None
        self.latencies.append(latency)
        return latency

"""voxd's own per-frame work (no sockets): what one 20 ms frame costs in each direction.

Run: .venv/bin/python bench/frame_path.py
Inbound:  Twilio JSON text -> MediaStream.receive (JSON + base64) -> caller-speech energy ->
          (pcm16: InboundTranscoder)
Outbound: assistant audio -> (pcm16: OutboundTranscoder) -> FrameCutter -> MediaStream.media
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np

from voxd.audio.framing import FrameCutter
from voxd.audio.transcode import InboundTranscoder, OutboundTranscoder
from voxd.audio.vad import frame_energy_dbfs_ulaw
from voxd.twilio.protocol import MediaStream

N = 20000
SID = "MZ" + "0" * 32


def timed(fn, n: int = N) -> tuple[float, float]:
    samples = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn(i)
        samples[i] = time.perf_counter_ns() - t0
    return float(np.median(samples)) / 1000, float(np.percentile(samples, 99)) / 1000


def main() -> None:
    rng = np.random.default_rng(0)
    ulaw = rng.integers(0, 256, 160, dtype=np.uint8).tobytes()
    pcm = (rng.standard_normal(320) * 3000).astype("<i2").tobytes()
    stream = MediaStream()
    stream.receive(json.dumps({"event": "start", "streamSid": SID,
                               "start": {"streamSid": SID, "callSid": "CA1"}}))
    messages = [json.dumps({"event": "media", "sequenceNumber": str(i), "streamSid": SID,
                            "media": {"track": "inbound", "chunk": str(i),
                                      "timestamp": str(i * 20),
                                      "payload": base64.b64encode(ulaw).decode()}})
                for i in range(N)]
    inbound = InboundTranscoder()
    outbound = OutboundTranscoder()
    cutter = FrameCutter()

    def in_mulaw(i: int) -> None:
        frame = stream.receive(messages[i])
        frame_energy_dbfs_ulaw(frame.payload)

    def in_pcm16(i: int) -> None:
        frame = stream.receive(messages[i])
        frame_energy_dbfs_ulaw(frame.payload)
        inbound.process(frame.payload)

    def out_mulaw(i: int) -> None:
        for f in cutter.push(ulaw):
            stream.media(f)

    def out_pcm16(i: int) -> None:
        for f in cutter.push(outbound.process(pcm)):
            stream.media(f)

    rows = [
        ("MediaStream.receive (JSON + base64)", lambda i: stream.receive(messages[i])),
        ("MediaStream.media (base64 + JSON)", lambda i: stream.media(ulaw)),
        ("inbound, mulaw passthrough", in_mulaw),
        ("inbound, pcm16 (transcode to 16 kHz)", in_pcm16),
        ("outbound, mulaw passthrough", out_mulaw),
        ("outbound, pcm16 (transcode to 8 kHz)", out_pcm16),
    ]
    print(f"{N} frames of 20 ms, microseconds per frame (sans-I/O work only, no sockets)")
    print(f"{'path':44}{'median':>8}{'p99':>8}")
    print("-" * 60)
    for name, fn in rows:
        median, p99 = timed(fn)
        print(f"{name:44}{median:8.2f}{p99:8.2f}")


if __name__ == "__main__":
    main()

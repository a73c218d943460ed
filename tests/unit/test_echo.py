"""The built-in echo assistant: plays an utterance back after a pause, yields to barge-in."""

from __future__ import annotations

import numpy as np
import trio

from voxd.audio.g711 import pcm16_to_ulaw
from voxd.providers.base import AssistantAudio, AssistantInterrupted, CallInfo
from voxd.providers.echo import EchoProvider

CALL = CallInfo(call_sid="CA1", stream_sid="MZ1")


def tone_ulaw(seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * 8000)) / 8000
    pcm = (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2")
    return pcm16_to_ulaw(pcm.tobytes())


SILENCE = b"\xff" * 160


def frames(data: bytes) -> list[bytes]:
    return [data[i:i + 160] for i in range(0, len(data), 160)]


async def collect(assistant, into: list) -> None:
    while True:
        into.append(await assistant.receive())


async def test_utterance_is_played_back_whole_after_the_pause(autojump_clock):
    utterance = tone_ulaw(0.6)
    events: list = []
    async with EchoProvider("mulaw").connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(collect, echo, events)
        for frame in [SILENCE] * 5 + frames(utterance) + [SILENCE] * 40:
            await echo.send_audio(frame)
            await trio.sleep(0.02)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    audio = b"".join(e.data for e in events if isinstance(e, AssistantAudio))
    assert audio == utterance  # onset kept via pre-roll, trailing silence trimmed


async def test_talking_over_the_playback_interrupts_it(autojump_clock):
    events: list = []
    async with EchoProvider("mulaw").connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(collect, echo, events)
        for frame in frames(tone_ulaw(2.0)) + [SILENCE] * 30:  # playback starts after ~0.5 s
            await echo.send_audio(frame)
            await trio.sleep(0.02)
        played_before = sum(isinstance(e, AssistantAudio) for e in events)
        assert played_before > 0
        for frame in frames(tone_ulaw(0.3, 700)):  # the caller talks over it
            await echo.send_audio(frame)
            await trio.sleep(0.02)
        interrupted_at = next(i for i, e in enumerate(events)
                              if isinstance(e, AssistantInterrupted))
        await trio.sleep(0.3)
        # nothing of the first utterance after the interruption (the new one is still going)
        assert not any(isinstance(e, AssistantAudio) for e in events[interrupted_at + 1:])
        nursery.cancel_scope.cancel()
    assert interrupted_at < 100  # the 2 s utterance (100 frames) was cut short


async def test_pcm16_echo_frames_are_640_bytes(autojump_clock):
    pcm = (np.sin(np.arange(16000 * 0.4) * 0.2) * 6000).astype("<i2").tobytes()
    events: list = []
    async with EchoProvider("pcm16").connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(collect, echo, events)
        await echo.send_audio(pcm + bytes(640 * 40))  # any chunking: one big piece
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    sizes = {len(e.data) for e in events if isinstance(e, AssistantAudio)}
    assert sizes == {640}
    assert b"".join(e.data for e in events)[: len(pcm)] == pcm

"""The built-in echo assistant: plays an utterance back after a pause, yields to barge-in."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from voxd.audio.g711 import pcm16_to_ulaw, ulaw_decode
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


# -- the echo gate: the echo's own voice coming back over the line -------------------------

ECHO_DB, ECHO_DELAY_FRAMES = 20.0, 6  # a phone line's echo: 20 dB down, 120 ms late


def speechlike(seconds: float, rate: int, freq: float = 300.0, peak: float = 12000.0,
               ) -> np.ndarray:
    """A tone with a syllable-rate envelope (4 Hz): loud and quiet frames, like speech."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (np.sin(2 * np.pi * freq * t) * envelope * peak).astype(np.float64)


class Line:
    """The caller's side of a phone line, played in real time like Twilio: every 20 ms one
    frame of what the echo sent is heard, and the caller's next frame carries what was heard
    ECHO_DELAY_FRAMES frames earlier, ECHO_DB quieter, on top of what the caller says."""

    def __init__(self, audio: str) -> None:
        self.audio = audio
        self.rate = 16000 if audio == "pcm16" else 8000
        self.frame = self.rate // 50
        self.queue = np.zeros(0)   # sent by the echo, not heard yet
        self.heard: list[np.ndarray] = []
        self.events: list = []

    def decode(self, data: bytes) -> np.ndarray:
        if self.audio == "pcm16":
            return np.frombuffer(data, "<i2").astype(np.float64)
        return ulaw_decode(np.frombuffer(data, np.uint8)).astype(np.float64)

    def encode(self, x: np.ndarray) -> bytes:
        pcm = np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()
        return pcm if self.audio == "pcm16" else pcm16_to_ulaw(pcm)

    async def listen(self, echo) -> None:
        while True:
            event = await echo.receive()
            self.events.append(event)
            if isinstance(event, AssistantAudio):
                self.queue = np.concatenate([self.queue, self.decode(event.data)])
            elif isinstance(event, AssistantInterrupted):
                self.queue = np.zeros(0)  # voxd clears what was queued

    async def talk(self, echo, caller: np.ndarray) -> None:
        """Send `caller` (padded to whole frames) in real time, with the line's echo mixed in."""
        gain = 10 ** (-ECHO_DB / 20)
        caller = np.concatenate([caller, np.zeros(-len(caller) % self.frame)])
        start = trio.current_time()
        for k in range(len(caller) // self.frame):
            await trio.sleep_until(start + (k + 1) * 0.02)  # the frame has been captured
            said = caller[k * self.frame:(k + 1) * self.frame].copy()
            if len(self.heard) >= ECHO_DELAY_FRAMES:
                said += gain * self.heard[-ECHO_DELAY_FRAMES]
            await echo.send_audio(self.encode(said))
            heard, self.queue = self.queue[:self.frame], self.queue[self.frame:]
            self.heard.append(np.concatenate([heard, np.zeros(self.frame - len(heard))]))

    def audio_frames(self) -> int:
        return sum(isinstance(e, AssistantAudio) for e in self.events)

    def interruptions(self) -> int:
        return sum(isinstance(e, AssistantInterrupted) for e in self.events)


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_its_own_echo_on_the_line_never_interrupts_it(autojump_clock, audio):
    line = Line(audio)
    utterance = speechlike(1.5, line.rate)
    async with EchoProvider(audio).connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(line.listen, echo)
        await line.talk(echo, np.concatenate([utterance, np.zeros(5 * line.rate)]))
        nursery.cancel_scope.cancel()
    assert line.interruptions() == 0
    # the utterance played back whole (75 frames), and its echo was not taken for a new
    # utterance to play back in turn
    assert line.audio_frames() == 75
    echoed = np.concatenate(line.heard)
    assert max(abs(echoed)) > 5000  # it was loud: its echo was well above the VAD threshold


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_the_same_echo_interrupts_it_without_the_gate(autojump_clock, audio):
    """The test above can fail: with the gate's margin opened wide, the same echo is taken
    for the caller talking over the playback."""
    line = Line(audio)
    utterance = speechlike(1.5, line.rate)
    provider = EchoProvider(audio, echo_margin_db=100.0)
    async with provider.connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(line.listen, echo)
        await line.talk(echo, np.concatenate([utterance, np.zeros(5 * line.rate)]))
        nursery.cancel_scope.cancel()
    assert line.interruptions() >= 1


@pytest.mark.parametrize("audio", ["pcm16", "mulaw"])
async def test_a_caller_talking_over_its_echo_interrupts_it(autojump_clock, audio):
    line = Line(audio)
    utterance = speechlike(1.5, line.rate)
    # the playback starts ~0.5 s after the utterance; the caller talks from 0.6 s into it, at
    # the utterance's own level (20 dB above the echo) and in another voice
    talk_over_at = 1.5 + 0.5 + 0.6
    caller = np.zeros(int(6.0 * line.rate))
    caller[:len(utterance)] = utterance
    over = speechlike(0.8, line.rate, freq=700.0)
    at = int(talk_over_at * line.rate)
    caller[at:at + len(over)] = over
    async with EchoProvider(audio).connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(line.listen, echo)
        await line.talk(echo, caller)
        nursery.cancel_scope.cancel()
    assert line.interruptions() == 1
    first = next(i for i, e in enumerate(line.events) if isinstance(e, AssistantInterrupted))
    # interrupted about 0.6 s (30 frames) into the 75-frame playback, 200 ms of speech later
    # (the echo runs 5 frames ahead of real time)
    assert 30 + 10 <= first <= 30 + 10 + 5 + 3
    # then the caller's 0.8 s is played back (whole, after the pause): the gate did not cut it
    assert line.audio_frames() == first + 40


async def test_a_short_sound_over_the_playback_neither_interrupts_nor_is_echoed(autojump_clock):
    line = Line("pcm16")
    utterance = speechlike(1.5, line.rate)
    caller = np.zeros(int(6.0 * line.rate))
    caller[:len(utterance)] = utterance
    knock = speechlike(0.12, line.rate, freq=700.0)  # past min_speech_ms, short of 200 ms
    at = int(2.6 * line.rate)
    caller[at:at + len(knock)] = knock
    async with EchoProvider("pcm16").connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(line.listen, echo)
        await line.talk(echo, caller)
        nursery.cancel_scope.cancel()
    assert line.interruptions() == 0
    assert line.audio_frames() == 75


async def test_voxd_barging_in_first_stops_it_without_a_second_interruption(autojump_clock):
    events: list = []
    async with EchoProvider("mulaw").connect(CALL) as echo, trio.open_nursery() as nursery:
        nursery.start_soon(collect, echo, events)
        for frame in frames(tone_ulaw(2.0)) + [SILENCE] * 30:
            await echo.send_audio(frame)
            await trio.sleep(0.02)
        talk_over = frames(tone_ulaw(0.5, 700))
        for i, frame in enumerate(talk_over):
            if i == 4:  # voxd's local VAD fires first (80 ms) and tells the echo
                await echo.barge_in(0.5)
                stopped_at = len(events)
            await echo.send_audio(frame)
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert not any(isinstance(e, AssistantInterrupted) for e in events)
    assert len(events) == stopped_at  # nothing more of the playback after voxd's barge-in

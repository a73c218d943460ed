"""Playback: 160-byte frames, paced a bounded lead ahead of real time, dropped instantly."""

from __future__ import annotations

import base64
import json

import pytest
import trio

from voxd.call.playback import END_MARK, Playback
from voxd.twilio.protocol import MediaStream

START = json.dumps({"event": "start", "streamSid": "MZ1",
                    "start": {"streamSid": "MZ1", "callSid": "CA1"}})


class Twilio:
    """Records what the playout sent, with the (virtual) time it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict]] = []
        self.marked = trio.Event()

    async def send(self, text: str) -> None:
        self.record(text)

    def record(self, text: str) -> None:
        message = json.loads(text)
        self.sent.append((trio.current_time(), message))
        if message["event"] == "mark":
            self.marked.set()

    def media(self) -> list[tuple[float, bytes]]:
        return [(t, base64.b64decode(m["media"]["payload"]))
                for t, m in self.sent if m["event"] == "media"]

    def events(self) -> list[str]:
        return [m["event"] for _, m in self.sent]


class Direct:
    """Twilio's socket written without waiting (`voxd.call.playback.Direct`). After `cut_after`
    frames the socket takes no more: the rest is owed until `unstall` is set."""

    def __init__(self, twilio: Twilio, cut_after: int | None = None) -> None:
        self.twilio = twilio
        self.cut_after = cut_after
        self.writing = False
        self.taken = 0
        self.owed: list[str] = []
        self.unstall = trio.Event()

    def send_nowait(self, text: str) -> bool:
        if self.owed or (self.cut_after is not None and self.taken >= self.cut_after):
            self.owed.append(text)
            return False
        self.taken += 1
        self.twilio.record(text)
        return True

    async def flush(self) -> None:
        self.writing = True
        await self.unstall.wait()
        for text in self.owed:
            self.twilio.record(text)
        self.owed.clear()
        self.writing = False


@pytest.fixture(params=["playout task only", "sent inline while idle"])
async def playout(nursery, request):
    """(make, twilio): tests request `autojump_clock` themselves (pytest-trio looks for the
    clock among the test's own fixtures), so virtual time makes the timing exact. Every test
    runs twice: with the playout task sending everything, and with `enqueue` sending frames
    itself while the playout is idle: what Twilio gets, and when, must be the same."""
    stream = MediaStream()
    stream.receive(START)
    twilio = Twilio()

    def make(**kw) -> Playback:
        if request.param == "sent inline while idle":
            kw.setdefault("direct", Direct(twilio))
        playback = Playback(twilio.send, stream, **kw)
        nursery.start_soon(playback.run)
        return playback

    return make, twilio


async def test_audio_is_recut_into_frames_and_a_paused_partial_is_flushed(playout, autojump_clock):
    make, twilio = playout
    playback = make()
    await playback.enqueue(b"\x01" * 100)  # less than a frame: held for a moment...
    await playback.enqueue(b"\x02" * 300)
    await trio.sleep(1)  # ...then the assistant pauses: the partial frame goes out, padded
    payloads = [p for _, p in twilio.media()]
    assert [len(p) for p in payloads] == [160, 160, 160]
    assert b"".join(payloads) == b"\x01" * 100 + b"\x02" * 300 + b"\xff" * 80


async def test_a_burst_is_sent_at_once_up_to_the_lead_then_in_real_time(playout, autojump_clock):
    make, twilio = playout
    playback = make(lead=0.1)
    t0 = trio.current_time()
    bursts: list[float] = []
    playback._on_burst = bursts.append
    await playback.enqueue(b"\x00" * 160 * 50)  # 1 s of audio, all at once
    await trio.sleep(2)
    times = [t - t0 for t, _ in twilio.media()]
    assert len(times) == 50
    assert times[:5] == [0.0] * 5  # the first 100 ms (the lead) go out immediately
    # then one frame per 20 ms, each as soon as Twilio would hold no more than 100 ms with it
    for i in range(5, 50):
        assert abs(times[i] - ((i + 1) * 0.02 - 0.1)) < 1e-6
    assert bursts == [t0]  # one burst, starting at once: no delay added


async def test_interrupt_drops_everything_and_clear_goes_out_at_once(playout, autojump_clock):
    make, twilio = playout
    playback = make(lead=0.2)
    await playback.enqueue(b"\x00" * 160 * 100)  # 2 s
    await trio.sleep(0.5)
    assert playback.playing
    assert abs(playback.queued_seconds - 0.2) < 0.021  # Twilio holds no more than the lead
    assert abs(playback.held_seconds - 1.3) < 0.021  # the rest waits in voxd
    dropped = playback.interrupt()
    assert abs(dropped - 1.5) < 0.021
    interrupted_at = trio.current_time()
    await trio.sleep(1)
    clear = [t for t, m in twilio.sent if m["event"] == "clear"]
    assert clear == [interrupted_at]  # not after the pacing wait
    assert twilio.events()[-1] == "clear"  # and nothing of the old turn after it
    assert not playback.playing and playback.interrupt() == 0.0
    assert twilio.events().count("clear") == 1  # nothing sent since: no second clear


async def test_new_audio_after_a_clear_is_a_new_burst(playout, autojump_clock):
    make, twilio = playout
    bursts: list[float] = []
    playback = make(on_burst=bursts.append)
    await playback.enqueue(b"\x00" * 1600)
    await trio.sleep(0.05)
    playback.interrupt()
    await trio.sleep(0.01)
    await playback.enqueue(b"\x05" * 160)
    await trio.sleep(0.5)
    assert len(bursts) == 2
    assert twilio.events()[-2:] == ["clear", "media"]


async def test_drain_waits_for_twilio_to_confirm_the_last_words(playout, autojump_clock):
    make, twilio = playout
    playback = make()
    await playback.enqueue(b"\x00" * 160 * 25)  # 0.5 s

    async def twilio_echoes_marks():
        await twilio.marked.wait()
        await trio.sleep(0.5)  # Twilio plays the rest, then echoes
        playback.mark_played(END_MARK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(twilio_echoes_marks)
        assert await playback.drain(grace=1.0) is True
    assert twilio.events()[-1] == "mark" and len(twilio.media()) == 25
    assert await playback.drain(grace=0.2) is False  # no echo this time: gives up in bounds


async def test_a_full_queue_holds_the_assistant_back(playout, autojump_clock):
    """An assistant sending 1 s of audio at once into a 0.2 s queue is held back until the
    audio plays out (backpressure), and none of it is lost."""
    make, twilio = playout
    playback = make(max_queue_seconds=0.2, lead=0.02)
    t0 = trio.current_time()
    for _ in range(50):
        await playback.enqueue(b"\x00" * 160)
    waited = trio.current_time() - t0
    assert 0.75 <= waited <= 0.8  # (1 s - 0.2 s queued - 0.02 s lead) of playing out
    await trio.sleep(1)
    assert len(twilio.media()) == 50


async def test_the_echo_reference_follows_what_plays_not_what_was_sent(playout, autojump_clock):
    """Frames sent ahead (the lead) must not lower the reference before they play: the echo
    arriving now comes from what is playing, or played a moment ago."""
    make, _ = playout
    playback = make(lead=0.2)
    loud = b"\x30" * 160 * 25  # -18.5 dBFS for 0.5 s
    softer = b"\x3c" * 160 * 50  # -22.8 dBFS for 1 s, sent up to 0.2 s ahead of playing
    await playback.enqueue(loud + softer)
    await trio.sleep(0.49)  # the loud part is playing; softer frames are already sent
    assert playback.echo_level(trio.current_time()) > -19.0
    await trio.sleep(0.2)  # the softer part plays now: the loud part's echo decays away
    assert -23.0 < playback.echo_level(trio.current_time()) < -19.0


async def test_a_frame_the_socket_cannot_take_is_owed_and_the_rest_queue_behind_it(
        nursery, autojump_clock):
    """Twilio stops reading after 3 frames: the enqueuing task never waits, the later frames
    queue (stall detection sees them held), and once the socket drains all arrive in order."""
    stream = MediaStream()
    stream.receive(START)
    twilio = Twilio()
    direct = Direct(twilio, cut_after=3)
    playback = Playback(twilio.send, stream, lead=0.2, direct=direct)
    nursery.start_soon(playback.run)
    await trio.sleep(0.01)  # the playout is idle
    frames = [bytes([i]) * 160 for i in range(1, 9)]
    with trio.fail_after(0.001):  # no wait in the enqueuing task
        for frame in frames[:4]:
            await playback.enqueue(frame)
    assert len(twilio.media()) == 3 and len(direct.owed) == 1
    for frame in frames[4:]:
        await playback.enqueue(frame)
    await trio.sleep(0.5)
    assert playback.held_seconds > 0.0 and playback.frames_sent == 4  # held: no progress
    direct.unstall.set()
    await trio.sleep(1)
    assert [p for _, p in twilio.media()] == frames


async def test_audio_enqueued_right_after_an_interrupt_goes_out_after_the_clear(
        nursery, autojump_clock):
    stream = MediaStream()
    stream.receive(START)
    twilio = Twilio()
    playback = Playback(twilio.send, stream, direct=Direct(twilio))
    nursery.start_soon(playback.run)
    await trio.sleep(0.01)
    await playback.enqueue(b"\x01" * 160 * 5)
    assert len(twilio.media()) == 5  # sent inline, at once
    playback.interrupt()
    await playback.enqueue(b"\x02" * 160)  # before the playout had a chance to run
    await trio.sleep(0.5)
    assert twilio.events() == ["media"] * 5 + ["clear", "media"]
    assert twilio.media()[-1][1] == b"\x02" * 160


async def test_unmute_takes_a_new_request_right_after_a_muting_interrupt(playout, autojump_clock):
    """After a barge-in voxd heard itself, the rest of the turn is dropped; keys the assistant
    then asks to press are a new request (`unmute`), and are played."""
    make, twilio = playout
    playback = make()
    await playback.enqueue(b"\x01" * 160 * 10)
    await trio.sleep(0.05)
    playback.interrupt(mute=True)
    await playback.enqueue(b"\x02" * 160)  # the rest of the interrupted turn: dropped
    playback.unmute()
    await playback.enqueue(b"\x03" * 160)  # keys to press: played
    await trio.sleep(1)
    after_clear = twilio.events()[twilio.events().index("clear") + 1:]
    played = [p for _, p in twilio.media()][-len(after_clear):] if after_clear else []
    assert played == [b"\x03" * 160]

"""The simulator's pure parts: Twilio's playout (queue, marks, clear) and the Media Streams
messages it sends as Twilio does."""

from __future__ import annotations

import json

from voxd.audio.g711 import ULAW_SILENCE
from voxd.audio.line import FRAME_BYTES
from voxd.sim import messages
from voxd.sim.playout import Playout, line_echo
from voxd.twilio.protocol import MediaFrame, MediaStream, StreamStart, StreamStop


def test_a_mark_is_due_once_the_audio_before_it_has_played():
    playout = Playout()
    assert playout.mark("at-once") == ["at-once"]  # nothing queued before it
    playout.receive(b"\x01" * 300)
    assert playout.mark("after-300") == []
    assert playout.tick() == b"\x01" * FRAME_BYTES and playout.due() == []
    heard = playout.tick()  # the last 140 bytes, padded with silence
    assert heard == b"\x01" * 140 + bytes([ULAW_SILENCE]) * 20
    assert playout.due() == ["after-300"]
    assert playout.tick() == bytes([ULAW_SILENCE]) * FRAME_BYTES


def test_clear_drops_the_queue_and_makes_every_mark_due():
    playout = Playout()
    playout.receive(b"\x02" * 800)
    playout.mark("a")
    playout.receive(b"\x03" * 800)
    playout.mark("b")
    playout.tick()
    assert playout.clear() == (1440, ["a", "b"])
    assert playout.tick() == bytes([ULAW_SILENCE]) * FRAME_BYTES
    playout.receive(b"\x04" * 160)  # after a clear, positions count from what played
    assert playout.mark("c") == []
    playout.tick()
    assert playout.due() == ["c"]


def test_line_echo_adds_what_was_heard_earlier_quieter():
    silence = bytes([ULAW_SILENCE]) * FRAME_BYTES
    loud = b"\x80" * FRAME_BYTES  # mu-law full scale
    assert line_echo(silence, [], 20, 120) == silence  # nothing heard that long ago yet
    echoed = line_echo(silence, [loud] * 6, 20, 120)
    assert echoed != silence
    assert line_echo(silence, [loud] * 6, 200, 120) == silence  # far below one step


def test_messages_are_what_voxd_parses_from_twilio():
    stream = MediaStream()
    sid, call, account = "MZ" + "1" * 32, "CA" + "2" * 32, "AC" + "3" * 32
    stream.receive(messages.encode(messages.connected()))
    start = stream.receive(messages.encode(messages.start(sid, call, account, {"a": "1"}), 1))
    assert isinstance(start, StreamStart)
    assert (start.stream_sid, start.call_sid, start.custom_parameters) == (sid, call, {"a": "1"})
    frame = stream.receive(messages.encode(messages.media(sid, 0, b"\x05" * 160), 2))
    assert isinstance(frame, MediaFrame) and frame.payload == b"\x05" * 160
    assert isinstance(stream.receive(messages.encode(messages.stop(sid, call, account), 3)),
                      StreamStop)


def test_the_load_generators_media_frames_are_the_same_json():
    sid = "MZ" + "1" * 32
    payload = "BQUF"
    fast = messages.MediaFrames(sid).frame(6, payload)
    built = messages.media(sid, 6, b"\x05\x05\x05")
    assert json.loads(fast) == built and fast == messages.encode(built)


def test_sequence_numbers_follow_the_event_name():
    text = messages.encode(messages.mark("MZ1", "m"), 7)
    assert text == '{"event":"mark","sequenceNumber":"7","streamSid":"MZ1","mark":{"name":"m"}}'

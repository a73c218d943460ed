"""The Twilio Media Streams protocol: every event, every error, and the frames voxd sends."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.errors import ProtocolError
from voxd.twilio.protocol import (
    Connected,
    Dtmf,
    MarkPlayed,
    MediaFrame,
    MediaStream,
    StreamStart,
    StreamState,
    StreamStop,
)

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA1234567890abcdef1234567890abcdef"


def msg(event: str, **fields: object) -> str:
    return json.dumps({"event": event, **fields})


def start(sid: str = SID, **overrides: object) -> str:
    body = {"accountSid": "AC1", "streamSid": sid, "callSid": CALL, "tracks": ["inbound"],
            "customParameters": {"from": "+1555", "token": "t"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
    body.update(overrides)
    return msg("start", sequenceNumber="1", streamSid=sid, start=body)


def media(payload: bytes = b"\xff" * 160, ts: str = "20", sid: str = SID) -> str:
    return msg("media", sequenceNumber="3", streamSid=sid,
               media={"track": "inbound", "chunk": "2", "timestamp": ts,
                      "payload": base64.b64encode(payload).decode()})


@pytest.fixture
def streaming() -> MediaStream:
    stream = MediaStream()
    stream.receive(msg("connected", protocol="Call", version="1.0.0"))
    stream.receive(start())
    return stream


def test_a_whole_stream_in_order():
    stream = MediaStream()
    assert stream.receive(msg("connected", protocol="Call", version="1.0.0")) == \
        Connected("Call", "1.0.0")
    started = stream.receive(start())
    assert started == StreamStart(SID, CALL, "AC1", ("inbound",), {"from": "+1555", "token": "t"})
    assert stream.state is StreamState.STREAMING
    frame = stream.receive(media(bytes(range(160)), ts="40"))
    assert frame == MediaFrame(bytes(range(160)), 40, 2)
    assert stream.receive(msg("dtmf", streamSid=SID, sequenceNumber="4",
                              dtmf={"track": "inbound_track", "digit": "7"})) == Dtmf("7")
    assert stream.receive(msg("mark", streamSid=SID, sequenceNumber="5",
                              mark={"name": "turn-1"})) == MarkPlayed("turn-1")
    assert stream.receive(msg("stop", streamSid=SID, sequenceNumber="6",
                              stop={"accountSid": "AC1", "callSid": CALL})) == StreamStop()
    assert stream.state is StreamState.STOPPED


def test_start_without_connected_and_with_extra_fields_is_accepted():
    stream = MediaStream()
    event = stream.receive(start(futureField={"x": 1}))
    assert isinstance(event, StreamStart)


def test_frames_of_any_size_are_accepted(streaming):
    assert streaming.receive(media(b"\x00" * 7)).payload == b"\x00" * 7
    assert streaming.receive(media(b"")).payload == b""


@pytest.mark.parametrize(("text", "problem"), [
    ("{nope", "invalid JSON"),
    ("[]", "malformed message"),
    ('{"streamSid":"x"}', "no 'event' field"),
    (msg("bogus", streamSid=SID), "unknown event 'bogus'"),
    (msg("media", streamSid=SID), "missing required field `media`"),
    (msg("media", streamSid=SID, media={"timestamp": "1"}), "missing required field `payload`"),
    (msg("media", streamSid=SID, media={"payload": "", "timestamp": 5}), "Expected `str`"),
    (msg("media", streamSid=SID, media={"payload": "", "timestamp": "soon"}),
     "integers in strings"),
    (media(sid="MZother"), "streamSid 'MZother', but this stream is"),
    (msg("media", streamSid=SID, media={"payload": "not base64!", "timestamp": "0"}),
     "not valid base64"),
    (msg("media", streamSid=SID, media={"payload": "AAA", "timestamp": "0"}), "not valid base64"),
    (start(), "duplicate 'start'"),
    (msg("connected", protocol="Call", version="1.0.0"), "'connected' received while streaming"),
    (msg("mark", streamSid=SID, mark={}), "missing required field `name`"),
    (msg("dtmf", streamSid=SID), "missing required field `dtmf`"),
])
def test_errors_while_streaming(streaming, text, problem):
    with pytest.raises(ProtocolError, match=problem.replace("(", r"\(").replace("?", r"\?")):
        streaming.receive(text)


@pytest.mark.parametrize(("text", "problem"), [
    (media(), "'media' received while awaiting start"),
    (msg("mark", streamSid=SID, mark={"name": "m"}), "'mark' received while awaiting start"),
    (msg("stop", streamSid=SID), "'stop' received while awaiting start"),
    (start(streamSid="MZdifferent"), "outside and 'MZdifferent' inside"),
    (start(callSid=""), "empty callSid"),
    (start(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}),
     "unsupported media format audio/x-l16/16000/1"),
    (msg("start", streamSid=SID), "missing required field `start`"),
])
def test_errors_before_start(text, problem):
    with pytest.raises(ProtocolError, match=problem):
        MediaStream().receive(text)


def test_connected_comes_once():
    stream = MediaStream()
    stream.receive(msg("connected", protocol="Call", version="1.0.0"))
    with pytest.raises(ProtocolError, match="'connected' received twice"):
        stream.receive(msg("connected", protocol="Call", version="1.0.0"))


def test_anything_after_stop_is_an_error(streaming):
    streaming.receive(msg("stop", streamSid=SID))
    with pytest.raises(ProtocolError, match="'media' received while stopped"):
        streaming.receive(media())


def test_oversized_message_is_refused_before_parsing():
    stream = MediaStream(max_message_bytes=1024)
    stream.receive(start())
    with pytest.raises(ProtocolError, match="exceeds the limit of 1024"):
        stream.receive(media(b"\xff" * 1000))


def test_outbound_frames_are_what_twilio_expects(streaming):
    sent = json.loads(streaming.media(b"\x01\x02\xff"))
    assert sent == {"event": "media", "streamSid": SID,
                    "media": {"payload": base64.b64encode(b"\x01\x02\xff").decode()}}
    assert json.loads(streaming.mark('turn "1"')) == {"event": "mark", "streamSid": SID,
                                                     "mark": {"name": 'turn "1"'}}
    assert json.loads(streaming.clear()) == {"event": "clear", "streamSid": SID}


def test_nothing_can_be_sent_before_start():
    stream = MediaStream()
    for build in (lambda: stream.media(b"x"), lambda: stream.mark("m"), stream.clear):
        with pytest.raises(ProtocolError, match="before the stream started"):
            build()


@given(st.text(max_size=300))
def test_arbitrary_text_gives_an_event_or_a_protocol_error(text):
    with contextlib.suppress(ProtocolError):
        MediaStream().receive(text)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["event", "streamSid", "media", "payload", "timestamp",
                                       "start", "callSid", "mark", "name", "x"]),
                      children, max_size=5),
    max_leaves=20))
def test_arbitrary_json_while_streaming_gives_an_event_or_a_protocol_error(value):
    stream = MediaStream()
    stream.receive(start())
    with contextlib.suppress(ProtocolError):
        stream.receive(json.dumps(value))


def nested(depth: int, kind: str) -> str:
    """JSON nested `depth` levels deep: lists, objects, or both in turn."""
    opens = {"list": ["["], "object": ['{"x":'], "mixed": ["[", '{"x":']}[kind]
    closes = {"[": "]", '{"x":': "}"}
    layers = [opens[i % len(opens)] for i in range(depth)]
    return "".join(layers) + "1" + "".join(closes[o] for o in reversed(layers))


DEEP_PLACES = [
    lambda deep: deep,  # the whole message
    lambda deep: '{"event":' + deep + "}",  # the tag
    lambda deep: '{"event":"nope","x":' + deep + "}",  # an unknown event's field
    lambda deep: '{"event":"connected","extra":' + deep + "}",  # a field Twilio may add
    lambda deep: start(customParameters={"token": "t"}).replace('"tracks"', '"x":' + deep
                                                                 + ',"tracks"'),
    lambda deep: media().replace('"track"', '"x":' + deep + ',"track"'),
]


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("place", range(len(DEEP_PLACES)))
@pytest.mark.parametrize("kind", ["list", "object"])
def test_deeply_nested_json_is_a_protocol_error(streaming, depth, place, kind):
    text = DEEP_PLACES[place](nested(depth, kind))
    for stream in (MediaStream(max_message_bytes=len(text)), streaming):
        stream.max_message_bytes = len(text)  # past the size check: the parser must cope
        with pytest.raises(ProtocolError) as caught:
            stream.receive(text)
        error = caught.value  # one line: no chained traceback
        assert error.__cause__ is None and (error.__suppress_context__ or not error.__context__)
        assert "\n" not in str(error) and len(str(error)) < 200


@given(depth=st.integers(0, 3000), kind=st.sampled_from(["list", "object", "mixed"]),
       place=st.integers(0, len(DEEP_PLACES) - 1), stop=st.integers(0, 200))
def test_any_nesting_gives_an_event_or_a_protocol_error(depth, kind, place, stop):
    text = DEEP_PLACES[place](nested(depth, kind))
    text = text[:len(text) - stop]  # cut short too: unbalanced brackets
    for limit in (len(text), 64 * 1024):  # past the size check, and with Twilio's default
        stream = MediaStream()
        if place == 5:  # media: while streaming
            stream.receive(start())
        stream.max_message_bytes = limit
        with contextlib.suppress(ProtocolError):
            stream.receive(text)

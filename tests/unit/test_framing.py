"""FrameCutter: lossless re-chunking into fixed-size frames."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.audio.framing import FrameCutter


@given(
    pieces=st.lists(st.binary(max_size=500), max_size=30),
    frame_bytes=st.integers(1, 200),
)
def test_any_chunking_reassembles_the_stream(pieces: list[bytes], frame_bytes: int) -> None:
    cutter = FrameCutter(frame_bytes)
    frames: list[bytes] = []
    for piece in pieces:
        frames.extend(cutter.push(piece))
    stream = b"".join(pieces)
    assert all(isinstance(f, bytes) and len(f) == frame_bytes for f in frames)
    whole = len(stream) - len(stream) % frame_bytes
    assert b"".join(frames) == stream[:whole]
    assert cutter.pending == len(stream) % frame_bytes
    tail = cutter.flush()
    if whole == len(stream):
        assert tail is None
    else:
        assert tail == stream[whole:] + b"\xff" * (frame_bytes - len(stream) + whole)
    assert cutter.pending == 0


def test_common_case_returns_the_frame() -> None:
    cutter = FrameCutter()
    frame = bytes(range(160))
    assert cutter.push(frame) == [frame]
    assert cutter.pending == 0
    assert cutter.push(bytearray(frame)) == [frame]
    assert type(cutter.push(memoryview(frame))[0]) is bytes


def test_partial_then_completion() -> None:
    cutter = FrameCutter(4)
    assert cutter.push(b"ab") == []
    assert cutter.pending == 2
    assert cutter.push(b"cdefghij") == [b"abcd", b"efgh"]
    assert cutter.pending == 2
    assert cutter.push(b"") == []
    assert cutter.push(memoryview(b"klmn")[:2]) == [b"ijkl"]
    assert cutter.pending == 0
    assert cutter.push(bytearray(b"op")) == []
    assert cutter.push(memoryview(b"qrstu")) == [b"opqr"]
    assert cutter.flush() == b"stu\xff"


def test_flush_pads_with_pad_byte() -> None:
    cutter = FrameCutter(160)
    cutter.push(b"\x01\x02\x03")
    assert cutter.flush() == b"\x01\x02\x03" + b"\xff" * 157
    assert cutter.flush() is None
    custom = FrameCutter(frame_bytes=6, pad=0x00)
    custom.push(b"abcdefg")
    assert custom.flush() == b"g\x00\x00\x00\x00\x00"


def test_clear_drops_remainder() -> None:
    cutter = FrameCutter(4)
    cutter.push(b"abcdef")
    cutter.clear()
    assert cutter.pending == 0
    assert cutter.flush() is None
    assert cutter.push(b"wxyz") == [b"wxyz"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        FrameCutter(0)
    with pytest.raises(ValueError):
        FrameCutter(160, pad=256)

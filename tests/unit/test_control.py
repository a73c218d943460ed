"""Assistants' JSON control messages (voxd/providers/control.py): whatever arrives is a message
or one ProtocolError line, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.errors import ProtocolError
from voxd.providers.control import decode_control


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("build", [
    lambda d: "[" * d + "]" * d,
    lambda d: '{"a":' * d + "1" + "}" * d,
    lambda d: '{"type":"audio","x":' + "[" * d + "]" * d + "}",
])
def test_deeply_nested_json_is_a_protocol_error(depth, build):
    with pytest.raises(ProtocolError, match="the assistant sent a control message with JSON "
                                            "nested too deeply") as caught:
        decode_control(build(depth), "the assistant")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@given(st.integers(0, 3000), st.integers(0, 50))
def test_any_nesting_gives_a_message_or_a_protocol_error(depth, cut):
    text = '{"type":"x","y":' + "[" * depth + "]" * depth + "}"
    try:
        kind, message = decode_control(text[:len(text) - cut], "Vapi")
    except ProtocolError:
        return
    assert kind == "x" and isinstance(message, dict)


def test_tool_arguments_keypad_and_refusal_texts_shared_by_the_providers():
    from voxd.providers.control import (
        MAX_TEXT_FIELD,
        keypad_text,
        tool_argument,
        transfer_refused_text,
    )

    assert tool_argument({"to": "x" * 5000}, "to") == "x" * MAX_TEXT_FIELD
    assert tool_argument({"to": 3}, "to") == tool_argument({}, "to") == ""
    assert keypad_text("The caller pressed {digits}.", "12#") == "The caller pressed 1 2 #."
    assert transfer_refused_text("", "busy") == ("The transfer to a person was not made: busy. "
                                                 "Tell the caller, and carry on.")

"""JSON control messages on an assistant's socket, sans-I/O: what every such protocol shares."""

from __future__ import annotations

from typing import Any

import msgspec

from voxd.errors import ProtocolError


def decode_control(text: str, sender: str) -> tuple[str, dict[str, Any]]:
    """(type, message) of one text frame that must be a JSON object with a string `type`;
    ProtocolError naming `sender` otherwise."""
    try:
        message = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{sender} sent a control message that is not JSON: {exc}") \
            from None
    except RecursionError:  # msgspec's depth guard, past ~1,000 levels: the stack stays safe
        raise ProtocolError(f"{sender} sent a control message with JSON nested too deeply") \
            from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"{sender} sent a control message without a string 'type'")
    return message["type"], message


MAX_TEXT_FIELD = 1000
"""Longest string field voxd takes from a control message (a name, an announcement, keys)."""


def text_field(message: dict[str, Any], name: str, kind: str, sender: str) -> str:
    """The optional string field `name` of a `kind` message ("" when absent or null);
    ProtocolError naming `sender` when it is not a string or is too long."""
    value = message.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"{sender} sent {kind} with a '{name}' that is not a string")
    if len(value) > MAX_TEXT_FIELD:
        raise ProtocolError(f"{sender} sent {kind} with a '{name}' over {MAX_TEXT_FIELD} "
                            "characters")
    return value


def tool_argument(arguments: dict[str, Any], name: str) -> str:
    """A tool call's argument as a string (bounded to MAX_TEXT_FIELD; "" when absent or not a
    string): the model's JSON, taken as leniently as its vendor's tools are."""
    value = arguments.get(name)
    return value[:MAX_TEXT_FIELD] if isinstance(value, str) else ""


def keypad_text(template: str, digits: str) -> str:
    """What an assistant is told when the caller pressed `digits` (keypad.template)."""
    return template.replace("{digits}", " ".join(digits))


def transfer_refused_text(to: str, reason: str) -> str:
    """What an assistant is told when the transfer it asked for was not made."""
    return (f"The transfer to {to or 'a person'} was not made: {reason}. "
            "Tell the caller, and carry on.")

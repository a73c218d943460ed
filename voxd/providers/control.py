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

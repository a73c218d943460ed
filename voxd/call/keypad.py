"""The caller's key presses on their way to the assistant: one at a time, or collected into
an entry (`keypad.collect`) that ends with `keypad.finish_on`, after
`keypad.inter_digit_timeout` without a press, or at `keypad.max_digits`.

Keys arrive from the inbound pump through a small channel (presses are rare, and the pump
never waits on the assistant); keys pressed while the assistant connects wait in it. Keys
are never logged unless `keypad.log_digits` (they may be a PIN), and then only at debug.
"""

from __future__ import annotations

import logging

import trio

from voxd.config import KeypadConfig
from voxd.observability import metrics
from voxd.providers.base import AssistantSession, KeypadEntry

log = logging.getLogger("voxd.call")

CHANNEL_KEYS = 64
"""Presses held for the assistant; more are dropped (a caller cannot press 64 keys while the
assistant takes one message)."""


class Keypad:
    """Gathers presses (`press`, from the inbound pump) and forwards entries (`run`)."""

    def __init__(self, config: KeypadConfig) -> None:
        self.config = config
        self._tx, self._rx = trio.open_memory_channel[str](CHANNEL_KEYS)
        self.dropped = 0

    def press(self, key: str) -> None:
        """The caller pressed `key` (a valid keypad key): pass it on, never waiting."""
        metrics.KEYPAD.labels(direction="in").inc()
        if not self.config.forward:
            return
        try:
            self._tx.send_nowait(key)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("keypad presses arrive faster than the assistant takes them; "
                            "dropping presses")

    async def run(self, assistant: AssistantSession) -> None:
        """Forward entries to the assistant for the life of the call."""
        config = self.config
        entry = ""
        deadline = float("inf")
        while True:
            key = None
            with trio.move_on_at(deadline):
                key = await self._rx.receive()
            if key is not None:
                entry += key
                if config.collect and key != config.finish_on and \
                        len(entry) < config.max_digits:
                    deadline = trio.current_time() + config.inter_digit_timeout
                    continue
            if entry:
                await self._forward(assistant, entry)
            entry, deadline = "", float("inf")

    async def _forward(self, assistant: AssistantSession, entry: str) -> None:
        if self.config.log_digits:
            log.debug("keypad entry for the assistant: %s", entry)
        log.info("caller keypad entry of %d key(s) passed to the assistant", len(entry))
        await assistant.tell(KeypadEntry(entry))

"""The waiting helpers fail, naming what did not happen, instead of waiting forever."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.integration.waiting import logged, wait_until, wait_until_sync


async def test_wait_until_returns_once_true_and_fails_naming_what_did_not_happen():
    event = trio.Event()

    async def later() -> None:
        await trio.sleep(0.05)
        event.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        await wait_until(event.is_set, 2, "the event")
    with pytest.raises(AssertionError, match=r"not within 0\.1s: the call \(last seen: 3\)"):
        await wait_until(lambda: False, 0.1, "the call", seen=lambda: 3)


def test_wait_until_sync_fails_naming_what_did_not_happen():
    wait_until_sync(lambda: True, 0, "at once")
    with pytest.raises(AssertionError, match=r"not within 0\.1s: voxd accepts"):
        wait_until_sync(lambda: False, 0.1, "voxd accepts")


async def test_logged_sees_lines_logged_after_it_was_made(caplog):
    caplog.set_level(logging.INFO)
    seen = logged(caplog, "reason=caller-hangup")
    assert not seen()
    logging.getLogger("voxd.call").info("call ended: reason=caller-hangup")
    assert seen()

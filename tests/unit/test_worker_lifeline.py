"""A worker whose lifeline descriptor cannot be waited on serves on without it (one warning):
a task in the worker's root nursery must not be able to end the worker."""

from __future__ import annotations

import logging
import os

from voxd import worker
from voxd.worker_env import INDEX_ENV, LIFELINE_ENV


async def test_an_unusable_lifeline_is_one_warning_not_the_end_of_the_worker(monkeypatch, caplog):
    read, write = os.pipe()
    os.close(read)
    os.close(write)  # a descriptor number nothing has open
    monkeypatch.setenv(INDEX_ENV, "0")
    monkeypatch.setenv(LIFELINE_ENV, str(read))
    with caplog.at_level(logging.WARNING, logger="voxd.worker"):
        await worker._drain_when_orphaned()  # returns instead of raising
    assert [r.getMessage() for r in caplog.records] == [
        f"no lifeline to the supervisor (descriptor {read}: Bad file descriptor): a worker "
        "left behind by a killed supervisor will not notice"]

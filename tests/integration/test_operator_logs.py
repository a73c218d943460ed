"""The log an operator reads for `voxd serve` with server.workers = 2: the service announced
once, every worker's line marked `worker=N`, and a reload that says what it did not apply."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.integration.test_cli import free_port

VOXD = [sys.executable, "-m", "voxd"]
LINE = re.compile(r"^\S+Z (?P<level>[A-Z]+) (?P<logger>\S+) (?:worker=(?P<worker>\d+) )?"
                  r"(?P<message>.*)$")


def wait_for(log: Path, done: Callable[[str], bool], what: str, within: float = 30) -> str:
    """The log once `done(text)` holds; fails naming `what` (and the log) after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = log.read_text()
        if done(text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what}\n{log.read_text()}")


def test_two_workers_log_as_one_service_and_a_reload_says_listen_was_not_applied(tmp_path):
    port, other = free_port(), free_port()
    config = tmp_path / "voxd.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n'
                      f'public_url = "http://127.0.0.1:{port}"\nworkers = 2\n'
                      "[twilio]\nvalidate_signatures = false\n")
    log = tmp_path / "voxd.log"
    with log.open("w") as err:
        daemon = subprocess.Popen([*VOXD, "serve", "--config", str(config)], stderr=err,
                                  stdout=subprocess.DEVNULL)
    try:
        wait_for(log, lambda t: "ready: 2 workers" in t, "the supervisor's ready line")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200

        config.write_text(config.read_text().replace(f"127.0.0.1:{port}\"\npublic",
                                                     f"127.0.0.1:{other}\"\npublic"))
        daemon.send_signal(signal.SIGHUP)
        text = wait_for(log, lambda t: t.count("reloaded ") == 2, "both workers reloaded")
        ignored = [m for m in text.splitlines() if "server.listen change ignored" in m]
        assert sorted(re.search(r"worker=(\d)", m)[1] for m in ignored) == ["1", "2"]
        assert all(m.endswith(f"still listening on 127.0.0.1:{port} (the file now says "
                              f"127.0.0.1:{other})") for m in ignored)
        reloaded = [m for m in text.splitlines() if "reloaded " in m]
        assert all(f"listen 127.0.0.1:{port}," in m and str(other) not in m for m in reloaded)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200

        config.write_text(config.read_text() + "[server\n")
        daemon.send_signal(signal.SIGHUP)
        text = wait_for(log, lambda t: t.count("reload refused") == 2, "both refused the file")
        refused = [m for m in text.splitlines() if "reload refused" in m]
        assert all(m.count(str(config)) == 1 and "not valid TOML" in m for m in refused)

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    lines = log.read_text().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    assert sum("starting: ok" in line for line in lines) == 1
    workers = {m["worker"] for m in parsed if m and m["worker"]}
    assert workers == {"1", "2"}
    # A line without worker= is the main process's: the command line's start lines and the
    # supervisor's; everything a worker serves (voxd.server and below) says which worker.
    unmarked = {m["logger"] for m in parsed if m and not m["worker"]}
    assert unmarked <= {"voxd", "voxd.supervisor"}, unmarked
    for what, times in (("listening on", 2), ("SIGHUP received: reloading", 4),
                        ("draining:", 2), ("stopped", 2)):
        said = [m[0] for m in parsed if m and m["message"].startswith(what)]
        assert len(said) == times and all("worker=" in line for line in said), (what, said)

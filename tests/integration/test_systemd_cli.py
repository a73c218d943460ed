"""What the unit relies on from the command line, without systemd: `voxd reload` (ExecReload=)
and journal priorities on the lines that say why voxd did not start."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_cli import free_port
from tests.integration.test_cli import write_config as cli_config

VOXD = [sys.executable, "-m", "voxd"]


def write_config(path: Path, port: int, extra: str = "") -> Path:
    """test_cli's config file, with signatures off."""
    return cli_config(path, port, f"[twilio]\nvalidate_signatures = false\n{extra}")


def as_journal(path: Path) -> dict[str, str]:
    """The environment systemd gives a service whose stderr is the journal stream `path`."""
    st = path.stat()
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def start_serving(config: Path, log: Path) -> subprocess.Popen:
    port = int(config.read_text().split('127.0.0.1:')[1].split('"')[0])
    with log.open("w") as err:
        proc = subprocess.Popen([*VOXD, "serve", "--config", str(config)], stderr=err,
                                stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("voxd did not start:\n" + log.read_text())


def wait_for(log: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (content := log.read_text()):
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in:\n{log.read_text()}")


def test_reload_signals_voxd_only_when_the_file_is_valid(tmp_path):
    config = write_config(tmp_path / "voxd.toml", free_port())
    log = tmp_path / "voxd.log"
    proc = start_serving(config, log)
    try:
        good = config.read_text() + "[call]\nmax_concurrent_calls = 7\n"
        config.write_text(good)
        ok = subprocess.run([*VOXD, "reload", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "MAINPID": str(proc.pid)})
        assert ok.returncode == 0, ok.stderr
        assert f"max 7 calls; sent SIGHUP to process {proc.pid} (server.listen, " in ok.stdout
        wait_for(log, "reloaded ")
        assert "max 7 calls" in log.read_text().split("reloaded ")[1]

        config.write_text(good.replace("max_concurrent_calls = 7", "max_concurrent_calls = -1")
                          .replace("validate_signatures = false", "validate_signatures = 3"))
        bad = subprocess.run([*VOXD, "reload", "--config", str(config), "--pid", str(proc.pid)],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stdout == ""
        lines = bad.stderr.splitlines()
        assert lines and all(line.startswith("voxd: reload refused, voxd keeps its running "
                                             "config: ") for line in lines), bad.stderr
        time.sleep(0.5)
        assert log.read_text().count("SIGHUP received") == 1  # the bad file was never signalled
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_reload_without_a_process_to_signal(tmp_path):
    config = write_config(tmp_path / "voxd.toml", free_port())
    env = {k: v for k, v in os.environ.items() if k != "MAINPID"}
    missing = subprocess.run([*VOXD, "reload", "--config", str(config)], capture_output=True,
                             text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "no --pid given and no $MAINPID" in missing.stderr
    with subprocess.Popen(["sleep", "0"]) as gone:
        gone.wait()
    dead = subprocess.run([*VOXD, "reload", "--config", str(config), "--pid", str(gone.pid)],
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and f"no process {gone.pid}" in dead.stderr


def test_startup_failures_carry_an_error_priority_under_journald(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path / "voxd.toml", taken.getsockname()[1])
        log = tmp_path / "journal-stream"
        log.touch()
        with log.open("w") as err:
            busy = subprocess.run([*VOXD, "serve", "--config", str(config)], stderr=err,
                                  env=as_journal(log), timeout=60)
    assert busy.returncode == 1
    lines = log.read_text().splitlines()
    assert lines[0].startswith("<6>INFO voxd voxd ")  # log lines had their priority already
    assert lines[-1].startswith("<3>voxd: server.listen: cannot listen on 127.0.0.1:")
    assert "Address already in use" in lines[-1]

    config.write_text('[server]\nlisten = "nowhere"\nbogus = 1\n')
    with log.open("w") as err:
        bad = subprocess.run([*VOXD, "serve", "--config", str(config)], stderr=err,
                             env=as_journal(log), timeout=60)
    assert bad.returncode == 2
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("<3>voxd: server.") for line in lines), lines

    with log.open("w") as err:  # a terminal (no journal) gets the lines without the prefix
        subprocess.run([*VOXD, "serve", "--config", str(config)], stderr=err, timeout=60)
    assert all(line.startswith("voxd: server.") for line in log.read_text().splitlines())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to give voxd a mount of its own")
def test_reload_checks_with_the_credentials_the_running_voxd_sees(tmp_path):
    """As under systemd: voxd's credentials are a mount in its own namespace, and ExecReload=
    gets $CREDENTIALS_DIRECTORY but not the mount (systemd issue #35227)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    port = free_port()
    config = write_config(tmp_path / "voxd.toml", port)
    config.write_text(config.read_text().replace("validate_signatures = false",
                                                 "validate_signatures = true"))
    log = tmp_path / "voxd.log"
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    env.pop("VOXD_TWILIO_AUTH_TOKEN", None)
    script = (f"mount -t tmpfs tmpfs {creds} && printf tok > {creds}/twilio_auth_token && "
              f"exec {shlex.join([*VOXD, 'serve', '--config', str(config)])}")
    with log.open("w") as err:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 script], stderr=err, env=env)
    try:
        wait_for(log, "listening on", timeout=30)
        assert list(creds.iterdir()) == []  # this side of the mount sees none of them
        ok = subprocess.run([*VOXD, "reload", "--config", str(config), "--pid", str(proc.pid)],
                            capture_output=True, text=True, timeout=60, env=env)
        assert ok.returncode == 0, ok.stderr
        wait_for(log, "reloaded ")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_reload_without_any_view_of_the_credentials_checks_the_rest(tmp_path):
    config = write_config(tmp_path / "voxd.toml", free_port())
    config.write_text(config.read_text().replace("validate_signatures = false",
                                                 "validate_signatures = true"))
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(tmp_path / "not-mounted-here")}
    env.pop("VOXD_TWILIO_AUTH_TOKEN", None)
    # SIGHUP's default action for the target, even where the tests run with it ignored
    # (under nohup: an ignored signal stays ignored across exec)
    with subprocess.Popen(["sleep", "30"], preexec_fn=lambda: signal.signal(
            signal.SIGHUP, signal.SIG_DFL)) as target:
        result = subprocess.run([*VOXD, "reload", "--config", str(config), "--pid",
                                 str(target.pid)], capture_output=True, text=True, timeout=60,
                                env=env)
        assert result.returncode == 0, result.stderr
        assert target.wait(timeout=10) == -signal.SIGHUP
    assert result.stderr.startswith("voxd: reload: the service's credentials (")

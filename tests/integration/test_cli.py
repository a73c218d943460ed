"""The command line as a user runs it: separate processes, real sockets, exit codes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.audio import burst, silence

VOXD = [sys.executable, "-m", "voxd"]


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOXD, *args], capture_output=True, text=True, timeout=60, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int, extra: str = "") -> Path:
    """A voxd.toml for a daemon run as its own process on 127.0.0.1:`port`."""
    path.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n'
                    f'public_url = "http://127.0.0.1:{port}"\n{extra}')
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


def test_check_config_ok_and_bad(tmp_path):
    ok = run("check-config", "--config", str(Path(__file__).parents[2] / "voxd.toml"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    bad = tmp_path / "bad.toml"
    bad.write_text('[assistant]\nprovider = "vapi"\n[server]\nlisten = 5\n')
    result = run("check-config", "--config", str(bad), env={**os.environ, "VAPI_API_KEY": "k"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "voxd: server.listen: input should be a valid string (got 5)",
        'voxd: vapi.assistant_id: required when assistant.provider = "vapi" (or an inline '
        "[vapi.assistant] table)",
    ]
    assert "Traceback" not in result.stderr


def test_check_config_prints_a_warning_and_still_passes(tmp_path):
    config = tmp_path / "voxd.toml"
    config.write_text('[server]\nlisten = "0.0.0.0:3027"\n'
                      'public_url = "http://voice.example.com:8080"\n'
                      '[twilio]\nvalidate_signatures = false\n')
    result = run("check-config", "--config", str(config))
    assert result.returncode == 0 and result.stdout.startswith("ok: ")
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("voxd: warning: ")
    assert "8080" in warnings[0] and "3027" in warnings[0], warnings


def test_no_command_lists_the_commands_and_a_typo_gets_the_nearest():
    bare = run()
    assert bare.returncode == 2
    for command in ("serve", "check-config", "reload", "call", "demo", "loadtest", "dial", "show"):
        assert re.search(rf"^\s+{command}\b", bare.stderr, re.M), (command, bare.stderr)
    typo = run("serv")
    assert (typo.returncode, typo.stderr) == (
        2, "voxd: no command 'serv': did you mean 'serve'? `voxd --help` lists them\n")
    hostile = run("\x1b[2Jzzz")
    assert hostile.returncode == 2 and "\x1b" not in hostile.stderr
    assert hostile.stderr.startswith("voxd: no command '\\x1b[2Jzzz': `voxd --help`")


def test_call_usage_errors_are_one_line():
    missing = run("call", "http://127.0.0.1:9/twilio/voice", "--wav", "/no/such.wav")
    assert missing.returncode == 2 and missing.stderr == "voxd: --wav: no such file: /no/such.wav\n"
    unwritable = run("demo", "--record", "/no/such/dir/demo.wav")
    assert unwritable.returncode == 2
    assert unwritable.stderr == "voxd: --record: no such directory: /no/such/dir\n"
    unreachable = run("call", f"http://127.0.0.1:{free_port()}/twilio/voice", "--seconds", "1")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("voxd: cannot reach the webhook")
    assert "Traceback" not in unreachable.stderr


def serving(config: Path, port: int, env: dict[str, str] | None = None,
            stdout: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """`voxd serve --config CONFIG` in its own process, once it answers /healthz on `port`."""
    proc = subprocess.Popen([*VOXD, "serve", "--config", str(config)], env=env,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)
    origin = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(origin + "/healthz").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"voxd serve did not come up: {proc.communicate()[1]}")


@pytest.fixture
def daemon(tmp_path):
    """`voxd serve` in its own process, with signatures on."""
    port = free_port()
    config = write_config(tmp_path / "voxd.toml", port, '[assistant]\naudio = "mulaw"\n')
    env = {**os.environ, "VOXD_TWILIO_AUTH_TOKEN": "test-token-123"}
    proc = serving(config, port, env=env, stdout=subprocess.PIPE)
    yield f"http://127.0.0.1:{port}", proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_call_against_a_running_daemon(daemon, tmp_path):
    origin, proc = daemon
    caller = tmp_path / "caller.wav"
    # 16 kHz input: the simulator resamples any rate to 8 kHz.
    write_wav(caller, np.repeat(np.concatenate([burst(0.6), silence(1.0)]), 2), rate=16000)
    out = tmp_path / "call.wav"
    result = run("call", origin + "/twilio/voice", "--wav", str(caller), "--record", str(out),
                 "--seconds", "2.5", "--auth-token", "test-token-123")
    assert result.returncode == 0, result.stderr
    assert "latency (caller)" in result.stdout and "latency (voxd)" in result.stdout
    assert "no reply" not in result.stdout
    assert "ended by caller" in result.stdout
    with wave.open(str(out)) as wav:
        assert wav.getnchannels() == 2 and wav.getnframes() == 2.5 * 8000

    unsigned = run("call", origin + "/twilio/voice", "--seconds", "1",
                   env={k: v for k, v in os.environ.items() if k != "VOXD_TWILIO_AUTH_TOKEN"})
    assert unsigned.returncode == 1
    assert unsigned.stderr.strip() == "voxd: webhook answered HTTP 403: invalid signature"

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    summary = [line for line in stderr.splitlines() if "call ended:" in line]
    assert len(summary) == 1
    assert "call_sid=CA" in summary[0] and "stream_sid=MZ" in summary[0]
    assert "turns=1" in summary[0] and "reason=caller-hangup" in summary[0]
    assert "test-token-123" not in stderr


def test_loadtest_runs_its_own_voxd_and_echo_upstream():
    result = run("loadtest", "--calls", "3", "--seconds", "5", "--audio", "mulaw")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "calls 3 x 5s; frames sent 750, lost 0; calls failed 0" in out, out
    assert re.search(r"voxd CPU per call +\d+\.\d\d% of one core", out), out
    assert re.search(r"teardown after stop +max \d+ ms", out), out
    assert "calls up" in result.stderr  # progress while it runs


def test_loadtest_measures_turn_latency_with_an_echo_that_takes_turns():
    result = run("loadtest", "--calls", "2", "--seconds", "6", "--audio", "pcm16", "--turns")
    assert result.returncode == 0, result.stderr
    found = re.search(r"turn latency \(voxd's\)  p50 (\d+) ms, p95 (\d+) ms \(the echo waits "
                      r"400 ms of it\)", result.stdout)
    assert found, result.stdout
    # the echo answers 400 ms after the caller stops; voxd and the sockets add a little
    assert 400 <= int(found.group(1)) <= int(found.group(2)) < 500, result.stdout


def test_loadtest_usage_errors():
    result = run("loadtest", "--calls", "0")
    assert result.returncode == 2 and "--calls and --workers must be at least 1" in result.stderr
    result = run("loadtest", "http://127.0.0.1:9/twilio/voice", "--turns")
    assert result.returncode == 2 and "--reply-after-ms 400" in result.stderr


@pytest.mark.parametrize(("args", "code"), [(("--help",), 0),  # argparse drops what it cannot write
                                            (("check-config", "--config", "voxd.toml"), 1)])
def test_a_closed_output_stops_any_command_quietly(args, code):
    """`voxd ... | head -1` whose reader has gone: no traceback, no 'Exception ignored'."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([*VOXD, *args], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=60, cwd=Path(__file__).parents[2])
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, \
        result.stderr
    assert result.returncode == code

"""`voxd loadtest`, `voxd call` and `voxd echo-upstream` when something is wrong: an assistant
that is down, voxd at capacity or not there, a bad URL, Ctrl-C. Each failure is one line (or,
for a load test, counted under its reason in the report) with the documented exit code, never
a traceback. Separate processes, real sockets; waits are on output lines and /healthz."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_cli import VOXD, free_port, run, write_config
from tests.integration.test_sim_ux import Lines

FALLBACK = "<Say>Sorry, the assistant is unavailable right now.</Say>"


def no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text and "ExceptionGroup" not in text, text


@pytest.fixture
def start_voxd(tmp_path) -> Iterator[Callable[[str], str]]:
    """Start `voxd serve` (signatures off, the generic WebSocket assistant at `ws://...`
    given) in its own process; returns its origin once /healthz answers."""
    procs: list[subprocess.Popen[str]] = []

    def start(assistant_url: str, extra: str = "") -> str:
        port = free_port()
        config = write_config(
            tmp_path / f"voxd-{port}.toml", port,
            '[twilio]\nvalidate_signatures = false\nrest_call_control = false\n'
            f'[assistant]\nprovider = "websocket"\n[websocket]\nurl = "{assistant_url}"\n'
            f'[barge_in]\nlocal_vad = false\n{extra}')
        proc = subprocess.Popen([*VOXD, "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        origin = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(origin + "/healthz").status_code == 200:
                    return origin
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.kill()
        pytest.fail(f"voxd serve did not come up: {proc.communicate()[1]}")

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate()


@pytest.fixture
def echo_url() -> Iterator[str]:
    """`voxd echo-upstream` on a free port, in its own process, once it listens."""
    proc = subprocess.Popen([*VOXD, "echo-upstream", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = Lines(proc.stdout).wait_for("echo upstream on ")
    yield re.search(r"ws://\S+", line).group(0)
    proc.terminate()
    assert proc.wait(10) == 0  # SIGTERM stops it as a service: quietly, exit 0


# -- voxd loadtest -------------------------------------------------------------------------------

def test_loadtest_counts_every_call_a_down_assistant_fails_and_runs_its_duration(start_voxd):
    origin = start_voxd(f"ws://127.0.0.1:{free_port()}/")  # nothing listens there
    result = run("loadtest", origin + "/twilio/voice", "--calls", "3", "--seconds", "5")
    no_traceback(result.stdout, result.stderr)
    assert result.returncode == 1, result.stderr
    assert "calls 3 x 5s; frames sent 0, lost 0; calls failed 3" in result.stdout
    assert ("  failed: 3 calls: voxd ended the stream before the caller hung up and gave the "
            f"caller {FALLBACK} (voxd's log says why: the call's reason=)") in result.stdout
    assert "nan" not in result.stdout  # what could not be measured says so
    assert result.stderr.splitlines()[-1] == "voxd: 3 of 3 calls failed (reasons above)"
    # the run went on for its length after the calls failed, progress every second
    seconds = [float(t) for t in re.findall(r"^\[\s*([\d.]+)s\]", result.stderr, re.M)]
    assert seconds and max(seconds) >= 5, result.stderr


def test_loadtest_counts_the_calls_voxd_refuses_at_capacity(start_voxd, echo_url):
    origin = start_voxd(echo_url, "[call]\nmax_concurrent_calls = 1\n")
    result = run("loadtest", origin + "/twilio/voice", "--calls", "3", "--seconds", "5")
    no_traceback(result.stdout, result.stderr)
    assert result.returncode == 1, result.stderr
    assert "calls failed 2" in result.stdout, result.stdout
    assert (f"  failed: 2 calls: webhook answered no <Connect><Stream>, only {FALLBACK} (voxd "
            "answers its call.fallback_twiml alone when it is at call.max_concurrent_calls or "
            "draining: see its log)") in result.stdout, result.stdout
    assert result.stderr.splitlines()[-1] == "voxd: 2 of 3 calls failed (reasons above)"


def test_loadtest_without_voxd_there_is_one_line():
    port = free_port()
    result = run("loadtest", f"http://127.0.0.1:{port}/twilio/voice", "--calls", "2",
                 "--seconds", "5")
    assert result.returncode == 1
    assert result.stderr == (f"voxd: cannot reach http://127.0.0.1:{port}: connection refused: "
                             f"nothing listens on 127.0.0.1:{port} (is voxd running there?)\n")


def test_loadtest_wrong_path_counts_the_calls_under_the_http_status(start_voxd):
    origin = start_voxd(f"ws://127.0.0.1:{free_port()}/")
    result = run("loadtest", origin + "/twilio/wrong", "--calls", "2", "--seconds", "5")
    no_traceback(result.stdout, result.stderr)
    assert result.returncode == 1
    assert "  failed: 2 calls: webhook answered HTTP 404" in result.stdout, result.stdout


@pytest.mark.parametrize("args,expected", [
    (["127.0.0.1:3000/twilio/voice"], "voxd: WEBHOOK_URL: not an http:// or https:// URL: "
                                      "127.0.0.1:3000/twilio/voice"),
    (["http://127.0.0.1:99999/twilio/voice"], "voxd: WEBHOOK_URL: Port out of range"),
    (["--seconds", "2"], "voxd: --seconds must be at least 6.5 (the 2.5 s ramp of 50 calls "
                         "plus a 4 s steady window)"),
    (["--seconds", "nan"], "voxd: --seconds must be a number of seconds"),
])
def test_loadtest_bad_flags_exit_2_before_anything_starts(args, expected):
    result = run("loadtest", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(expected), result.stderr


def test_ctrl_c_on_loadtest_prints_the_report_so_far_and_exits_130():
    proc = subprocess.Popen([*VOXD, "loadtest", "--calls", "2", "--seconds", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = Lines(proc.stderr)
    progress.wait_for("2/2 calls up")
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    stdout = proc.stdout.read()  # a few lines: the pipe never fills
    stderr = "".join(progress.seen) + progress.rest()
    no_traceback(stdout, stderr)
    assert proc.returncode == 130
    assert "calls 2 x 30s; frames sent " in stdout, stdout
    assert [line for line in stderr.splitlines() if line.startswith("voxd: ")] == [
        "voxd: interrupted: the report covers the 2 calls placed so far (cut short, so not a "
        "measurement of the full run)"]


# -- voxd call -----------------------------------------------------------------------------------

def test_call_exits_1_when_voxd_ends_it_with_the_fallback(start_voxd, tmp_path):
    origin = start_voxd(f"ws://127.0.0.1:{free_port()}/")
    out = tmp_path / "call.wav"
    result = run("call", origin + "/twilio/voice", "--seconds", "1", "--record", str(out))
    no_traceback(result.stdout, result.stderr)
    assert result.returncode == 1
    assert "ended by voxd" in result.stdout and out.exists()  # the report and WAV still there
    assert result.stderr == (
        "voxd: voxd ended the call before the caller hung up, and the caller hears "
        f"{FALLBACK} (the fallback: voxd's log says why, as the call's reason=, e.g. "
        "upstream-error when the assistant cannot be reached)\n")


def test_call_exits_0_when_the_call_ends_normally(start_voxd, echo_url):
    origin = start_voxd(echo_url)
    result = run("call", origin + "/twilio/voice", "--seconds", "1")
    assert result.returncode == 0, result.stderr
    assert "ended by caller" in result.stdout and result.stderr == ""


def test_call_at_capacity_says_voxd_answered_the_fallback_only(start_voxd, echo_url):
    origin = start_voxd(echo_url, "[call]\nmax_concurrent_calls = 1\n")
    first = subprocess.Popen([*VOXD, "call", origin + "/twilio/voice", "--seconds", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        Lines(first.stdout).wait_for("stream started")
        result = run("call", origin + "/twilio/voice", "--seconds", "1")
    finally:
        first.kill()
        first.communicate()
    assert result.returncode == 1
    assert result.stderr == (
        f"voxd: webhook answered no <Connect><Stream>, only {FALLBACK} (voxd answers its "
        "call.fallback_twiml alone when it is at call.max_concurrent_calls or draining: see "
        "its log)\n")


@pytest.mark.parametrize("url,expected", [
    ("http://127.0.0.1:99999/twilio/voice", "voxd: WEBHOOK_URL: Port out of range 0-65535"),
    ("http://[::1/twilio/voice", "voxd: WEBHOOK_URL: Invalid IPv6 URL"),
    ("ftp://host/x", "voxd: WEBHOOK_URL: not an http:// or https:// URL"),
])
def test_call_bad_url_is_a_usage_error(url, expected):
    result = run("call", url, "--seconds", "1")
    assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr


# -- voxd echo-upstream ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:0"],
    ["--protocol", "openai"],
])
def test_ctrl_c_on_echo_upstream_is_one_line_and_130(args):
    proc = subprocess.Popen([*VOXD, "echo-upstream", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    Lines(proc.stdout).wait_for("echo")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert (proc.returncode, stderr) == (130, "voxd: interrupted\n")


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_echo_upstream_refuses_a_negative_reply_delay(value):
    result = run("echo-upstream", "--reply-after-ms", value)
    assert result.returncode == 2
    assert result.stderr.startswith("voxd: --reply-after-ms: must be >= 0, got "), result.stderr


def test_echo_upstream_on_a_taken_port_is_one_line(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("echo-upstream", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""  # it does not claim to listen first
    assert result.stderr == (f"voxd: --listen: cannot listen on 127.0.0.1:{port}: Address "
                             "already in use\n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a full disk)")
def test_a_recording_that_cannot_be_written_at_the_end_is_one_line():
    result = run("demo", "--record", "/dev/full")
    no_traceback(result.stderr)
    assert result.returncode == 1
    assert "ended by caller" in result.stdout  # the report came first
    assert result.stderr.splitlines()[-1] == (
        "voxd: --record: cannot write /dev/full: No space left on device")

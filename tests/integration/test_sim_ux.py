"""`voxd call` and `voxd demo` as a user meets them: Ctrl-C, audio files of every kind, and a
one-line error for every way a call cannot be placed. Separate processes, real sockets."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.integration.audio import burst, silence
from tests.integration.test_cli import VOXD, free_port, run, serving, write_config
from voxd.sim.explain import connection_problem


class Lines:
    """A process's output read line by line in a thread, to wait for one (no fixed sleeps)."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        pytest.fail(f"no line with {text!r} in {self.seen}")

    def rest(self) -> str:
        out = []
        while (line := self.lines.get(timeout=10)) is not None:
            out.append(line)
        return "".join(out)


def interrupted(proc: subprocess.Popen[str], stdout: Lines) -> tuple[int, str]:
    """Ctrl-C the process once its stream started; (exit code, stderr)."""
    stdout.wait_for("stream started")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    return proc.returncode, stderr


def assert_readable_call(path: Path) -> None:
    data, rate = sf.read(path, always_2d=True)
    assert rate == 8000 and data.shape[1] == 2


@pytest.fixture
def daemon(tmp_path) -> Iterator[str]:
    """`voxd serve` in its own process, signatures off; its origin."""
    port = free_port()
    config = write_config(tmp_path / "voxd.toml", port,
                          "[twilio]\nvalidate_signatures = false\n")
    proc = serving(config, port)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.communicate()


# -- Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_on_call_is_one_line_keeps_the_recording_and_exits_130(daemon, tmp_path):
    out = tmp_path / "call.wav"
    proc = subprocess.Popen([*VOXD, "call", daemon + "/twilio/voice", "--record", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, stderr = interrupted(proc, Lines(proc.stdout))
    assert code == 130
    [line] = stderr.splitlines()
    assert line.startswith("voxd: interrupted: wrote the ") and line.endswith(
        f" s recorded so far to {out}"), stderr
    assert_readable_call(out)


def test_ctrl_c_on_call_without_record_says_nothing_was_written(daemon):
    proc = subprocess.Popen([*VOXD, "call", daemon + "/twilio/voice"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, stderr = interrupted(proc, Lines(proc.stdout))
    assert code == 130
    [line] = stderr.splitlines()
    assert line.startswith("voxd: interrupted after ") and "no --record" in line


def test_ctrl_c_on_demo_keeps_the_recording_and_exits_130(tmp_path):
    out = tmp_path / "demo.wav"
    proc = subprocess.Popen([*VOXD, "demo", "--record", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, stderr = interrupted(proc, Lines(proc.stdout))
    assert code == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    mine = [line for line in stderr.splitlines() if line.startswith("voxd: ")]
    assert len(mine) == 1 and mine[0].startswith("voxd: interrupted: wrote the "), stderr
    assert_readable_call(out)
    # the simulated caller hung up (sent stop), as a person hanging up would
    assert "reason=caller-hangup" in stderr, stderr


# -- audio files -------------------------------------------------------------------------------

def speech(rate: int, seconds: float = 0.6) -> np.ndarray:
    """A burst then silence at `rate`, float in [-1, 1]."""
    at8k = np.concatenate([burst(seconds), silence(0.5)]).astype(np.float64) / 32768
    return np.interp(np.arange(int(len(at8k) * rate / 8000)) * 8000 / rate,
                     np.arange(len(at8k)), at8k)


@pytest.mark.parametrize("name,rate,channels,subtype,fmt", [
    ("extensible-24.wav", 8000, 1, "PCM_24", "WAVEX"),
    ("float-48k-stereo.wav", 48000, 2, "FLOAT", "WAV"),
    ("int32-44k1.wav", 44100, 1, "PCM_32", "WAVEX"),
    ("speech.flac", 16000, 1, "PCM_16", "FLAC"),
    ("speech.ogg", 48000, 2, "VORBIS", "OGG"),
])
def test_read_audio_reads_what_editors_write(tmp_path, name, rate, channels, subtype, fmt):
    from voxd.sim.audio_files import read_audio

    mono = speech(rate)
    data = np.repeat(mono[:, None], channels, axis=1) * 0.5
    path = tmp_path / name
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    got = read_audio(path)
    assert got.dtype == np.int16
    assert abs(len(got) - len(mono) * 8000 / rate) <= 2
    loud = got[: int(0.6 * 8000)].astype(np.float64)
    quiet = got[int(0.7 * 8000):].astype(np.float64)
    assert np.sqrt(np.mean(loud ** 2)) > 10 * max(1.0, np.sqrt(np.mean(quiet ** 2)))


def test_call_with_a_24_bit_extensible_wav_reaches_the_daemon(daemon, tmp_path):
    caller = tmp_path / "caller.wav"
    sf.write(caller, speech(48000) * 0.5, 48000, subtype="PCM_24", format="WAVEX")
    result = run("call", daemon + "/twilio/voice", "--wav", str(caller), "--seconds", "2.5")
    assert result.returncode == 0, result.stderr
    assert "no reply" not in result.stdout and "ended by caller" in result.stdout


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_text("just some text\n"), "not an audio file"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt "),
     "cannot read it (damaged or cut short?): Error in WAV file"),
])
def test_unreadable_wav_is_one_line_naming_the_file_and_the_reason(tmp_path, make, reason):
    path = tmp_path / "caller.wav"
    make(path)
    result = run("call", f"http://127.0.0.1:{free_port()}/twilio/voice", "--wav", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"voxd: --wav: {path}: {reason}"), line


# -- numeric flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    (["--line-echo", "-5"], "voxd: --line-echo: must be >= 0 dB, got -5 (how much quieter"),
    (["--line-echo", "nan"], "voxd: --line-echo: must be >= 0 dB"),
    (["--seconds", "0"], "voxd: --seconds: must be > 0 s, got 0"),
    (["--seconds", "-1"], "voxd: --seconds: must be > 0 s, got -1"),
    (["--seconds", "inf"], "voxd: --seconds: must be > 0 s, got inf"),
])
def test_bad_numbers_are_refused_naming_the_flag(flags, expected):
    result = run("call", f"http://127.0.0.1:{free_port()}/twilio/voice", *flags)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(expected), line


def test_outputs_that_cannot_be_written_are_refused_before_the_call(tmp_path):
    result = run("call", f"http://127.0.0.1:{free_port()}/twilio/voice",
                 "--record", str(tmp_path))
    assert (result.returncode, result.stderr) == (
        2, f"voxd: --record: {tmp_path} is a directory\n")


# -- what went wrong, in one line --------------------------------------------------------------

class _Canned(BaseHTTPRequestHandler):
    """Answers every POST by its path: /404 an HTML page, /500 a traceback-ish text, /json a
    JSON body, /elsewhere TwiML streaming to another host, /refused TwiML streaming to a
    port that answers the upgrade with 403."""

    routes: dict[str, tuple[int, str, str]] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, kind, body = self.routes.get(self.path, (404, "text/html", ""))
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # the refused WebSocket upgrade
        data = b"stream token missing"
        self.send_response(403)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    ws = origin.replace("http://", "ws://")
    page = ("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n<body>\n"
            "<h1>Not Found</h1>\n<p>The requested URL was not found.</p>\n</body></html>\n")
    _Canned.routes = {
        "/404": (404, "text/html", page),
        "/500": (500, "text/plain", "Internal Server Error\n\x1b[31mboom\x1b[0m\n" + "x" * 500),
        "/json": (200, "application/json", '{"ok": true}'),
        "/elsewhere": (200, "text/xml", '<?xml version="1.0"?><Response><Connect><Stream '
                       'url="wss://voice.invalid/twilio/media"/></Connect></Response>'),
        "/refused": (200, "text/xml", f'<?xml version="1.0"?><Response><Connect><Stream '
                     f'url="{ws}/twilio/media"/></Connect></Response>'),
        "/empty": (500, "text/plain", ""),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield origin
    server.shutdown()
    server.server_close()


def one_line_failure(url: str) -> str:
    result = run("call", url, "--seconds", "1",
                 env={k: v for k, v in os.environ.items() if k != "VOXD_TWILIO_AUTH_TOKEN"})
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert not line.rstrip().endswith(":"), line  # never an empty reason
    return line


def test_tls_to_a_plain_http_port(canned):
    line = one_line_failure(canned.replace("http://", "https://") + "/404")
    assert "TLS handshake failed" in line and "does not speak TLS" in line, line


def test_name_not_resolved_and_connection_refused():
    # A name that does not resolve, without asking any DNS server (tests stay off the network):
    # httpx's error as it wraps the resolver's.
    unresolved = httpx.ConnectError("[Errno -2] Name or service not known")
    unresolved.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connection_problem(unresolved, "http://voice.example.com/twilio/voice") == (
        "the host name voice.example.com is not resolved (Name or service not known)")
    port = free_port()
    assert f"connection refused: nothing listens on 127.0.0.1:{port}" in one_line_failure(
        f"http://127.0.0.1:{port}/twilio/voice")


def test_http_errors_are_a_status_and_a_short_escaped_excerpt(canned):
    assert one_line_failure(canned + "/404") == "voxd: webhook answered HTTP 404: 404 Not Found"
    error = one_line_failure(canned + "/500")
    assert error.startswith("voxd: webhook answered HTTP 500: Internal Server Error "
                            "\\x1b[31mboom\\x1b[0m xxx")
    assert "\x1b" not in error and len(error) < 200
    assert "HTTP 500 Internal Server Error (empty body)" in one_line_failure(canned + "/empty")


def test_a_webhook_answering_something_else_than_twiml(canned):
    line = one_line_failure(canned + "/json")
    assert line == ('voxd: webhook answered application/json that is not TwiML (Twilio: error '
                    '12100): {"ok": true}'), line


def test_a_stream_sent_elsewhere_asks_about_public_url(canned):
    line = one_line_failure(canned + "/elsewhere")
    assert "cannot open the media stream wss://voice.invalid/twilio/media" in line
    assert line.endswith("; the TwiML sends the stream to wss://voice.invalid, not to the "
                         f"webhook's {canned.removeprefix('http://')}: is server.public_url "
                         "right?"), line


def test_a_refused_media_stream(canned):
    line = one_line_failure(canned + "/refused")
    assert "the media stream ws://127.0.0.1:" in line
    assert "was refused: HTTP 403: stream token missing" in line


def test_timeouts_and_empty_messages_are_named():
    import trio

    from voxd.sim.explain import connection_problem

    assert connection_problem(httpx.ReadTimeout(""), "http://h:3000/x", 10) == (
        "connected to h:3000, but no answer came within 10 s (timed out)")
    assert connection_problem(httpx.ConnectTimeout(""), "https://h/x", 10) == (
        "no connection to h:443 within 10 s (timed out) (TLS to a plain-HTTP port can hang "
        "like this: is it http/ws?)")
    assert connection_problem(httpx.ConnectTimeout(""), "http://h/x", 10) == (
        "no connection to h:80 within 10 s (timed out)")
    assert "TLS to a plain-HTTP port" in connection_problem(trio.TooSlowError(), "wss://h/x")
    assert connection_problem(RuntimeError(), "http://h/x") == "RuntimeError"


# -- the picture -------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header (and it is a PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_demo_plot_draws_the_call(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    out = tmp_path / "demo.png"
    result = run("demo", "--record", str(tmp_path / "demo.wav"), "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert f"drew the call to {out}" in result.stdout
    width, height = png_size(out)
    assert 1000 <= width <= 4200 and 500 <= height <= 800
    assert out.stat().st_size > 20_000  # two waveforms and their labels, not a blank canvas


def test_plot_without_matplotlib_is_one_line_before_the_call(tmp_path):
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named \'matplotlib\'")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    for command in (["demo"], ["call", f"http://127.0.0.1:{free_port()}/twilio/voice"]):
        result = run(*command, "--plot", str(tmp_path / "call.png"), env=env)
        assert (result.returncode, result.stdout, result.stderr) == (
            2, "", "voxd: --plot needs matplotlib: pip install 'voxd[plot]'\n")


async def test_plot_call_marks_turns_clears_marks_and_the_end(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_call needs the plot extra")
    from voxd.sim.demo import run_demo
    from voxd.sim.plot import end_of, plot_call

    report = await run_demo("mulaw", dtmf=[("1", 6.0)])
    assert report.clear_times and report.mark_times  # what the picture draws was recorded
    assert end_of(report)[1] == "caller hung up (stop sent)"
    assert end_of(report, "interrupted")[1] == "interrupted"
    plot_call(report, tmp_path / "call.png")
    assert png_size(tmp_path / "call.png")[0] >= 1000

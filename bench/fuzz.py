"""Fuzz: random and mutated bytes over real connections against a running `voxd serve`, while a
good call flows, then check that nothing the inputs did reached the daemon or the call.

Run: .venv/bin/python bench/fuzz.py [--minutes 3] [--connections 8] [--seed 1]
                                    [--kinds http,upgrade,h2,ws,twilio] [--max-cases N]
                                    [--replay CASE] [--one-by-one] [--no-triage]
                                    [--out DIR] [--log FILE]

voxd runs as its own process on 127.0.0.1 in the production posture (signatures and stream
tokens on; config in a temporary directory, one worker, the `echo` assistant). --connections
fuzz clients run at once, each running cases one after the other, each case on its own
connection(s). Every case is drawn from its own generator seeded with (--seed, case number),
so a case is the same whatever the concurrency, and `--replay CASE` (same --seed and --kinds)
sends just that case to a fresh daemon. The kinds:

- http: HTTP/1.x request heads and bodies, built from voxd's routes then mutated (methods,
  paths with percent-encodings and control characters, versions, header names and values,
  duplicate headers such as two X-Twilio-Signature, Content-Length / Transfer-Encoding
  conflicts, huge and tiny heads, slow or short bodies, pipelining), sometimes mutated byte by
  byte after rendering;
- upgrade: WebSocket upgrades, valid and mutated, of /media-stream and other paths, signed
  (as Twilio signs: the X-Twilio-Signature of the stream URL from the webhook's TwiML),
  unsigned, wrongly or doubly signed, with bytes after the head;
- h2: the HTTP/2 preface with prior knowledge, and h2c upgrades (`Upgrade: h2c`,
  `HTTP2-Settings`), then frames: SETTINGS (window 0 too), HEADERS (also RFC 8441 CONNECT
  :protocol websocket), DATA on answered streams, PING floods, WINDOW_UPDATE, RST_STREAM,
  GOAWAY and random frames; sometimes closed early;
- ws: a signed, accepted media WebSocket, then framing mutations: bad opcodes, RSV bits,
  unmasked frames, stray and interleaved fragments, lying and non-minimal lengths, oversized
  and fragmented control frames, pings, closes with bad codes and reasons, invalid UTF-8,
  floods of tiny frames;
- twilio: a signed, accepted media WebSocket with a fresh stream token from the webhook, then
  Twilio messages (connected/start/media/mark/dtmf/stop) mutated as JSON: wrong types, huge
  values, deep nesting, non-ASCII, control characters and forged log lines, bad base64;
  tokens mutated (other digit spellings, lengths, non-ASCII) or replayed.

All the while good calls (`voxd.sim.caller.TwilioSimulator`, signed with the auth token) run
one after another. At the end a table of checks; exit 1 if any failed: the daemon is the same
process and answers /healthz; its log has no traceback, no "internal error" and no "failed
(voxd's bug" line, and no raw control characters or forged lines; its open descriptors, trio
tasks and counted connections (/metrics) are back at the baseline; every good call's frames
all arrived (the simulator's count equals `frames_in` of voxd's summary line, nothing
dropped); the log grew by less than one byte per byte received; a replayed stream never
started a second call; the fuzzer itself did not fail; SIGTERM stops voxd with exit 0.

A failure names the seed and the case that caused it: by the client port or the CallSid in
voxd's log line, by the port of a connection voxd still holds, or by replaying the suspects
(the cases in flight at the time) one by one against a fresh daemon (--no-triage: not).
Every suspect case is saved in --out as case-N.connK.bin (the bytes sent on each connection, in
order) with case-N.txt (what was sent, when, what came back, the replay command).
`--one-by-one` runs the cases one at a time and checks descriptors, tasks and connections
after each: a leak that no connection explains names its case that way.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import trio
from twilio.request_validator import RequestValidator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxd.audio.g711 import ulaw_decode
from voxd.sim.caller import SimulatorError, TwilioSimulator, parse_twiml
from voxd.sim.load import free_port, speech_ulaw

KINDS = ("http", "upgrade", "h2", "ws", "twilio")
WEIGHTS = {"http": 3, "upgrade": 3, "h2": 2, "ws": 2, "twilio": 3}
CASE_SECONDS = 6.0
"""Longest one case may take (its connections are closed then, whatever it was doing)."""
LEAK_SECONDS = 7.0
"""--one-by-one: how long after a case voxd has to release what it held for it (more than
server.handshake_timeout)."""
REPLY_SECONDS = 1.5
"""How long a case waits for voxd's answer before going on (or closing)."""
MARK = "FORGED"
"""Injected after CR/LF in values that may be logged: a log line starting with it is forged."""


@dataclass
class Options:
    seed: int = 1
    minutes: float = 1.0
    connections: int = 8
    max_cases: int = 1_000_000
    kinds: tuple[str, ...] = KINDS
    replay: int | None = None
    out: Path | None = None
    log_copy: Path | None = None
    good_call_seconds: float = 8.0
    triage: bool = True
    keep_home: bool = True
    """Keep the temporary directory (config, log, saved cases) when no --log / --out copy."""
    one_by_one: bool = False
    """Cases one at a time, each followed by a leak check (no good call meanwhile)."""
    settle: float = 25.0
    """After the last case, how long voxd has to get back to its baseline (handshake_timeout,
    start_timeout and a call's teardown all fit in the default)."""
    quiet: bool = False


# -- one case: what was sent, on which connections -----------------------------------------------


@dataclass
class Case:
    index: int
    kind: str
    rng: random.Random
    steps: list[str] = field(default_factory=list)
    sent: list[bytearray] = field(default_factory=list)
    """Bytes sent, one buffer per connection."""
    ports: list[int] = field(default_factory=list)
    call_sids: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    """Wall-clock (time.time()) times, to match voxd's log timestamps."""
    replies: list[bytes] = field(default_factory=list)
    refused: bool = False
    """Could not connect (or the webhook failed) at all."""
    replayed: bool = False
    """This case opened its stream a second time (a replayed token)."""
    fuzzer_error: str = ""
    """The fuzzer's own failure building or sending this case (a bug to fix here)."""
    accepted: bool = False
    """A signed media upgrade of this case got its 101 (the fuzz reached the WebSocket)."""

    def note(self, text: str) -> None:
        self.steps.append(text[:300])

    @property
    def bytes_sent(self) -> int:
        return sum(len(b) for b in self.sent)

    def save(self, out: Path, seed: int, kinds: tuple[str, ...], why: str) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, data in enumerate(self.sent):
            path = out / f"case-{self.index}.conn{k}.bin"
            path.write_bytes(bytes(data))
            paths.append(path)
        kinds_arg = "" if kinds == KINDS else f" --kinds {','.join(kinds)}"
        text = [f"case {self.index} (kind {self.kind}), seed {seed}: {why}",
                f"replay: .venv/bin/python bench/fuzz.py --seed {seed}{kinds_arg} "
                f"--replay {self.index}",
                f"client ports {self.ports}; call sids {self.call_sids}; "
                f"{self.bytes_sent} bytes sent", ""]
        text += self.steps
        text += ["", "replies:"] + [repr(r[:400]) for r in self.replies]
        (out / f"case-{self.index}.txt").write_text("\n".join(text) + "\n")
        return [out / f"case-{self.index}.txt", *paths]


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"voxd-fuzz:{seed}:{index}")


def make_case(seed: int, index: int, kinds: tuple[str, ...]) -> Case:
    rng = case_rng(seed, index)
    kind = rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
    return Case(index, kind, rng)


class Conn:
    """One client connection of a case: everything sent is recorded, nothing raises for what
    voxd does to the connection (resets, closes)."""

    def __init__(self, case: Case, stream: trio.SocketStream) -> None:
        self.case = case
        self.stream = stream
        self.buffer = case.sent[-1]
        self.gone = False
        self.received = bytearray()

    @classmethod
    async def open(cls, case: Case, target: Target) -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", target.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        case.ports.append(stream.socket.getsockname()[1])
        case.sent.append(bytearray())
        return cls(case, stream)

    async def send(self, data: bytes, note: str = "") -> None:
        if self.gone or not data:
            return
        self.case.note(f"conn{len(self.case.sent) - 1} send {len(data)} bytes"
                       f"{': ' + note if note else ''}: {data[:120]!r}")
        try:
            await self.stream.send_all(data)
            self.buffer += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.gone = True

    async def dribble(self, data: bytes, pieces: int, pause: float, note: str = "") -> None:
        """Send `data` in `pieces` parts with `pause` seconds between them."""
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            await self.send(data[i:i + step], note)
            await trio.sleep(pause)

    async def read(self, seconds: float = REPLY_SECONDS, until: bytes | None = None) -> bytes:
        """What voxd sends within `seconds` (until it closes, or `until` has arrived)."""
        got = bytearray()
        with trio.move_on_after(seconds):
            while not self.gone:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.gone = True
                    break
                if not data:
                    self.gone = True
                    break
                got += data
                if until is not None and until in got:
                    break
        self.received += got
        if got:
            self.case.replies.append(bytes(got[:2000]))
        return bytes(got)

    async def close(self, how: str = "fin") -> None:
        self.case.note(f"close ({how})")
        if how == "rst":
            with contextlib.suppress(OSError):
                self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                              struct.pack("ii", 1, 0))
        elif how == "half":
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.send_eof()
            await self.read(0.3)
        await trio.aclose_forcefully(self.stream)


# -- the target: where voxd is, and how Twilio would sign ---------------------------------------


class Target:
    def __init__(self, origin: str, token: str, client: httpx.AsyncClient) -> None:
        self.origin = origin
        self.port = int(origin.rsplit(":", 1)[1])
        self.token = token
        self.validator = RequestValidator(token)
        self.client = client
        self.stream_url = "ws" + origin.removeprefix("http") + "/media-stream"

    @property
    def webhook_url(self) -> str:
        return self.origin + "/twilio/voice"

    def sign(self, url: str, params: dict[str, str] | None = None) -> str:
        try:
            return self.validator.compute_signature(url, params or {})
        except UnicodeEncodeError:  # a lone surrogate: Twilio could not have signed it either
            return "bm90IHNpZ25hYmxl"

    async def stream_for(self, case: Case) -> tuple[str, dict[str, str], str]:
        """A signed webhook as Twilio sends it: (stream URL, its parameters, call sid)."""
        call_sid = "CA" + f"{case.rng.getrandbits(128):032x}"
        form = {"AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01", "CallSid": call_sid,
                "CallStatus": "ringing", "Direction": "inbound", "From": "+15005550006",
                "To": "+15005550001"}
        response = await self.client.post(self.webhook_url, data=form, headers={
            "X-Twilio-Signature": self.sign(self.webhook_url, form)})
        instruction = parse_twiml(response.text)
        case.call_sids.append(call_sid)
        case.note(f"webhook for {call_sid}: stream {instruction.url} {instruction.parameters}")
        return instruction.url, instruction.parameters, call_sid


# -- mutation helpers ---------------------------------------------------------------------------


NASTY_STRINGS = [
    "", " ", "\x00", "\r\n", f"\r\n{MARK} line", f"\n{MARK}", "\x1b[31mred\x1b[0m", "\x1b]0;t\x07",
    "\u202e", "é", "²³", "٠١٢", "\ud83d\ude00", "%00", "%0d%0a", "%2e%2e/", "../../etc/passwd",
    "'\"<>", "${jndi:x}", "null", "-1", "1e309", "NaN", "0x7fffffff",
]


def nasty(rng: random.Random, big: int = 70_000) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(NASTY_STRINGS)
    if roll < 0.7:
        return rng.choice(NASTY_STRINGS) * rng.choice([2, 10, 100, 1000])
    if roll < 0.85:
        return "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(1, 40)))
    return rng.choice("aZ9%\x7f") * rng.choice([255, 4096, 16_500, big])


def mutate_bytes(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """Byte-level mutations: flips, inserts, deletes, duplicated runs, truncation."""
    out = bytearray(data)
    for _ in range(rounds or rng.randrange(1, 6)):
        if not out:
            out += rng.randbytes(rng.randrange(1, 16))
            continue
        at = rng.randrange(len(out))
        op = rng.randrange(7)
        if op == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif op == 2:
            del out[at:at + rng.randrange(1, 16)]
        elif op == 3:
            run = out[at:at + rng.randrange(1, 64)]
            out[at:at] = run * rng.randrange(1, 50)
        elif op == 4:
            out[at:at] = rng.choice([b"\r\n", b"\n", b"\r", b"\x00", b"\r\n\r\n", b":", b" ",
                                     b"\xff", b"%", b"\x1b"])
        elif op == 5:
            del out[at:]
        else:
            out[at] = rng.choice(b"\x00\x7f\x80\xff\r\n\t :;,%")
    return bytes(out)


def head(request_line: str | bytes, headers: list[tuple[bytes, bytes]],
         eol: bytes = b"\r\n") -> bytes:
    line = enc(request_line) if isinstance(request_line, str) else request_line
    return line + eol + b"".join(k + b": " + v + eol for k, v in headers) + eol


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# -- kind: http ---------------------------------------------------------------------------------


METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT",
           b"PATCH", b"PRI", b"get", b"G\x00T", b"GET ", b"", b"M" * 300, b"\xff\xfe"]
PATHS = ["/healthz", "/readyz", "/metrics", "/twilio/voice", "/twilio/voice?CallSid=CA1",
         "/media-stream", "/", "*", "//healthz", "/healthz/../metrics", "/%68ealthz",
         "/twilio%2Fvoice", "/media%2Dstream", "/%00", "/%zz", "/%", "/\x1b[2J", "/a\tb",
         "http://127.0.0.1/healthz", "/" + "a" * 9000, "/?" + "q=" * 3000,
         "/twilio/voice?From=%0d%0aFORGED", "/\u00e9", "/\x7f"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/9.9",
            b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"", b"HTTP/01.1", b"HTTP/1.1\x00"]


def http_request(case: Case, target: Target) -> list[tuple[bytes, float]]:
    """One mutated request as (chunk, pause after) pieces."""
    rng = case.rng
    path = rng.choice(PATHS)
    method = b"POST" if path.startswith("/twilio/voice") and rng.random() < 0.6 else b"GET"
    if rng.random() < 0.25:
        method = rng.choice(METHODS)
    version = b"HTTP/1.1" if rng.random() < 0.7 else rng.choice(VERSIONS)
    form = {"CallSid": "CA" + f"{rng.getrandbits(128):032x}", "AccountSid": "AC" + "1" * 32,
            "From": "+15005550006", "To": "+15005550001"}
    if rng.random() < 0.4:
        form[rng.choice([*form, "Caller", "X" * 50])] = nasty(rng, 20_000)
    body = (urllib.parse.urlencode(form, errors="surrogatepass").encode()
            if method == b"POST" else b"")
    if rng.random() < 0.15:
        body = rng.randbytes(rng.choice([1, 100, 5000, 70_000]))
    signature = target.sign(target.webhook_url, form) if rng.random() < 0.5 else "x" * 28
    headers = [(b"Host", b"127.0.0.1"), (b"User-Agent", b"TwilioProxy/1.1")]
    if method == b"POST":
        headers += [(b"Content-Type", b"application/x-www-form-urlencoded"),
                    (b"Content-Length", str(len(body)).encode())]
    if path.startswith("/twilio") or rng.random() < 0.1:
        headers.append((b"X-Twilio-Signature", signature.encode()))
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        op = rng.randrange(12)
        if op == 0:  # duplicate a header
            headers.append(rng.choice(headers) if headers else (b"X", b"y"))
        elif op == 1:
            headers.append((b"X-Twilio-Signature", rng.choice([signature, "", "é"]).encode(
                "utf-8")))
        elif op == 2:  # CL / TE conflicts
            headers += rng.choice([
                [(b"Transfer-Encoding", b"chunked")],
                [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
                [(b"Content-Length", b"-1")], [(b"Content-Length", b"99999999999999999999")],
                [(b"Content-Length", b"1_0")], [(b"Content-Length", b" 0x10")],
                [(b"Transfer-Encoding", b"gzip, chunked")], [(b"Transfer-Encoding", b"chunked, x")],
                [(b"Transfer-Encoding", b"\x0bchunked")]])
        elif op == 3:
            headers.append((enc(nasty(rng, 17_000)), enc(nasty(rng, 17_000))))
        elif op == 4:
            headers.append((b"X-Long", b"v" * rng.choice([100, 8000, 16_000, 17_000])))
        elif op == 5:
            headers.append((b"Bad Name", b"x"))
        elif op == 6:
            headers.append((b"X-Fold", b"a\r\n  folded"))
        elif op == 7:
            headers.append((b"", b"empty name"))
        elif op == 8:
            headers.append((b"Connection", rng.choice([b"keep-alive", b"close", b"Upgrade",
                                                       b"upgrade, http2-settings"])))
        elif op == 9:
            headers.append((b"Expect", b"100-continue"))
        elif op == 10:
            headers = headers[:-1]
        else:
            headers += [(b"X-%d" % i, b"1") for i in range(rng.choice([50, 500, 2000]))]
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
    if chunked:
        body = rng.choice([b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffff\r\nx\r\n",
                           b"-1\r\n", b"5;ext=\x00\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n",
                           b"3\r\nabcdef\r\n0\r\n\r\n", b"zz\r\n"])
    target_path = enc(path)
    line = method + b" " + target_path + (b" " + version if version else b"")
    eol = b"\r\n" if rng.random() < 0.9 else rng.choice([b"\n", b"\r", b"\n\r"])
    data = head(line, headers, eol) + body
    if rng.random() < 0.15:
        data = mutate_bytes(rng, data)
    if rng.random() < 0.1:  # pipelined second request
        data += head(b"GET /healthz HTTP/1.1", [(b"Host", b"x")])
    pieces: list[tuple[bytes, float]] = []
    style = rng.random()
    if style < 0.08:  # slow body / slow head
        cut = rng.randrange(len(data) + 1)
        pieces = [(data[:cut], 0.0)] + [(data[cut:][i:i + 8], 0.25)
                                        for i in range(0, min(len(data) - cut, 64), 8)]
    elif style < 0.14:  # a body shorter than declared, then silence
        pieces = [(data[:max(1, len(data) - rng.randrange(1, 40))], 0.0)]
    else:
        pieces = [(data, 0.0)]
    return pieces


async def case_http(case: Case, target: Target) -> None:
    conn = await Conn.open(case, target)
    for data, pause in http_request(case, target):
        await conn.send(data)
        if pause:
            await trio.sleep(pause)
    await conn.read(REPLY_SECONDS, until=b"\r\n\r\n" if case.rng.random() < 0.5 else None)
    if case.rng.random() < 0.2:
        await conn.send(case.rng.randbytes(case.rng.randrange(1, 200)), "after the reply")
        await conn.read(0.3)
    await conn.close(case.rng.choice(["fin", "rst", "half"]))


# -- kind: upgrade ------------------------------------------------------------------------------


UPGRADE_PATHS = ["/media-stream"] * 6 + ["/media%2Dstream", "/nope", "/healthz", "/twilio/voice",
                                          "/MEDIA-STREAM", "/media-stream/", "//media-stream",
                                          "/media-stream?x=1", "/media-stream%00", "*",
                                          "/media-stream/\x1b[2J", "/metrics"]


def ws_key(rng: random.Random) -> bytes:
    return base64.b64encode(rng.randbytes(16))


async def signed_url(case: Case, target: Target) -> tuple[str, dict[str, str]]:
    """The stream URL Twilio would open for a fresh call, and its parameters."""
    url, params, _ = await target.stream_for(case)
    return url, params


async def case_upgrade(case: Case, target: Target) -> None:
    rng = case.rng
    path = rng.choice(UPGRADE_PATHS)
    signature_style = rng.choice(["valid", "valid", "valid", "missing", "invalid", "two",
                                  "two-valid", "non-ascii", "static"])
    url = target.stream_url
    if signature_style in ("valid", "two", "two-valid"):
        try:
            url, _ = await signed_url(case, target)
        except (httpx.HTTPError, SimulatorError) as exc:
            case.note(f"webhook failed: {exc}")
        if path == "/media-stream":
            path = urllib.parse.urlsplit(url).path or path
    signature = target.sign(url).encode()
    headers = [(b"Host", b"127.0.0.1:%d" % target.port), (b"Upgrade", b"websocket"),
               (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Key", ws_key(rng)),
               (b"Sec-WebSocket-Version", b"13")]
    headers += {
        "valid": [(b"X-Twilio-Signature", signature)], "missing": [],
        "invalid": [(b"X-Twilio-Signature", base64.b64encode(rng.randbytes(20)))],
        "two": [(b"X-Twilio-Signature", signature), (b"X-Twilio-Signature", b"AAAA")],
        "two-valid": [(b"X-Twilio-Signature", signature)] * 2,
        "non-ascii": [(b"X-Twilio-Signature", "é²".encode())],
        "static": [(b"X-Twilio-Signature", target.sign(target.stream_url).encode())],
    }[signature_style]
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        op = rng.randrange(10)
        if op == 0:
            headers = [h for h in headers if h[0] != rng.choice([b"Sec-WebSocket-Key",
                                                                  b"Upgrade", b"Connection",
                                                                  b"Sec-WebSocket-Version"])]
        elif op == 1:
            headers.append((b"Sec-WebSocket-Key", rng.choice([b"short", ws_key(rng), b""])))
        elif op == 2:
            headers.append((b"Sec-WebSocket-Version", rng.choice([b"8", b"13, 8", b"x"])))
        elif op == 3:
            headers.append((b"Sec-WebSocket-Extensions",
                            rng.choice([b"permessage-deflate", b"permessage-deflate; "
                                        b"client_max_window_bits=8", b"x" * 5000])))
        elif op == 4:
            headers.append((b"Sec-WebSocket-Protocol", enc(nasty(rng, 5000))))
        elif op == 5:
            headers.append((b"Upgrade", rng.choice([b"websocket", b"h2c", b"WebSocket/13"])))
        elif op == 6:
            headers.append((b"Connection", rng.choice([b"keep-alive, Upgrade", b"close"])))
        elif op == 7:
            headers.append((enc(nasty(rng, 3000)), enc(nasty(rng, 3000))))
        elif op == 8:
            headers.append((b"Content-Length", rng.choice([b"10", b"-1", b"99999999999"])))
        else:
            headers.append((b"Transfer-Encoding", b"chunked"))
    method = b"GET" if rng.random() < 0.9 else rng.choice(METHODS)
    version = b"HTTP/1.1" if rng.random() < 0.9 else rng.choice(VERSIONS)
    data = head(method + b" " + enc(path) + b" " + version, headers)
    if rng.random() < 0.1:
        data = mutate_bytes(rng, data)
    after = b""
    if rng.random() < 0.5:  # bytes after the head
        after = rng.choice([
            rng.randbytes(rng.randrange(1, 64)), b"x",
            ws_frame(rng, 0x9, b"ping"), ws_frame(rng, 0x1, b'{"event":"connected"}'),
            ws_frame(rng, 0x1, b"a" * 70_000),
            head(b"GET /healthz HTTP/1.1", [(b"Host", b"x")]),
            PREFACE, b"\r\n" * 10,
        ])
    conn = await Conn.open(case, target)
    if rng.random() < 0.5:
        await conn.send(data + after, f"upgrade {path!r}, signature {signature_style}")
    else:
        await conn.send(data, f"upgrade {path!r}, signature {signature_style}")
        await trio.sleep(rng.choice([0, 0.05, 0.3]))
        await conn.send(after, "after the head")
    reply = await conn.read(REPLY_SECONDS, until=b"\r\n\r\n")
    if reply.startswith(b"HTTP/1.1 101"):
        for _ in range(rng.randrange(0, 4)):
            await conn.send(ws_frame(rng, rng.choice([0x1, 0x2, 0x9, 0x8]), rng.randbytes(
                rng.randrange(0, 50))), "a frame after the 101")
    elif rng.random() < 0.5:
        await conn.send(rng.randbytes(rng.randrange(1, 100)), "after the refusal")
    await conn.read(0.3)
    await conn.close(rng.choice(["fin", "rst", "half"]))


# -- WebSocket frames ---------------------------------------------------------------------------


def ws_frame(rng: random.Random, opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
             mask: bool = True, length: int | None = None, form: str | None = None) -> bytes:
    """A client frame; `length` lies about the payload's length, `form` forces the length's
    encoding ("7", "16", "64": non-minimal ones too)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    bit = 0x80 if mask else 0
    form = form or ("7" if n < 126 else "16" if n < 65536 else "64")
    if form == "7" and n < 126:
        out = bytes([first, bit | n])
    elif form in ("7", "16") and n < 65536:
        out = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        out = bytes([first, bit | 127]) + struct.pack("!Q", n & (2**64 - 1))
    if mask:
        key = rng.randbytes(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        out += key
    return out + payload


def mutated_frames(rng: random.Random) -> list[tuple[bytes, str]]:
    """A few mutated frames (with what each is)."""
    out = []
    for _ in range(rng.randrange(1, 8)):
        op = rng.randrange(16)
        text = b'{"event":"connected","protocol":"Call","version":"1.0.0"}'
        if op == 0:
            code = rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
            out.append((ws_frame(rng, code, b"x"), f"opcode {code}"))
        elif op == 1:
            out.append((ws_frame(rng, 0x1, text, rsv=rng.randrange(1, 8)), "RSV bits"))
        elif op == 2:
            out.append((ws_frame(rng, 0x1, text, mask=False), "unmasked"))
        elif op == 3:
            out.append((ws_frame(rng, 0x0, b"stray"), "continuation with nothing to continue"))
        elif op == 4:
            out.append((ws_frame(rng, 0x1, text[:10], fin=False)
                        + ws_frame(rng, 0x1, text, fin=True), "text inside a fragmented text"))
        elif op == 5:
            parts = [text[i:i + 3] for i in range(0, len(text), 3)]
            frames = [ws_frame(rng, 0x1 if i == 0 else 0x0, p, fin=i == len(parts) - 1)
                      for i, p in enumerate(parts)]
            frames.insert(len(frames) // 2, ws_frame(rng, 0x9, b"mid"))
            out.append((b"".join(frames), "fragments with a ping between"))
        elif op == 6:
            out.append((ws_frame(rng, 0x1, b"abc", length=rng.choice([2**63 - 1, 2**64 - 1,
                                                                      70_000, 1 << 31])),
                        "length lies (huge)"))
        elif op == 7:
            out.append((ws_frame(rng, 0x1, text, form=rng.choice(["16", "64"])),
                        "non-minimal length"))
        elif op == 8:
            out.append((ws_frame(rng, 0x9, b"p" * rng.choice([125, 126, 300])), "big ping"))
        elif op == 9:
            out.append((ws_frame(rng, 0x9, b"x", fin=False), "fragmented ping"))
        elif op == 10:
            payload = rng.choice([b"", b"\x03", struct.pack("!H", rng.choice(
                [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 4000, 5000, 65535])),
                b"\x03\xe8" + b"\xff\xfe", b"\x03\xe8" + b"r" * 200])
            out.append((ws_frame(rng, 0x8, payload), f"close {payload[:6]!r}"))
        elif op == 11:
            out.append((ws_frame(rng, 0x1, b'{"event":"\xff\xfe"}'), "invalid UTF-8 text"))
        elif op == 12:
            out.append((ws_frame(rng, 0x2, rng.randbytes(rng.randrange(0, 400))), "binary"))
        elif op == 13:
            count = rng.choice([100, 1000, 5000])
            out.append((ws_frame(rng, 0x9, b"") * count, f"{count} pings"))
        elif op == 14:
            count = rng.choice([100, 2000])
            out.append((b"".join(ws_frame(rng, 0x1 if i == 0 else 0x0, b"", fin=False)
                                 for i in range(count)), f"{count} empty fragments"))
        else:
            out.append((mutate_bytes(rng, ws_frame(rng, rng.choice([0x1, 0x2, 0x8, 0x9, 0xA]),
                                                   text)), "byte-mutated frame"))
    return out


async def open_media(case: Case, target: Target, url: str | None = None,
                     params: dict[str, str] | None = None
                     ) -> tuple[Conn, dict[str, str], str] | None:
    """A signed media upgrade of a fresh call's stream URL (or of `url`, again), accepted
    (101): the connection, the stream's parameters (with its token) and the URL; None if voxd
    did not accept it."""
    if url is None or params is None:
        try:
            url, params = await signed_url(case, target)
        except (httpx.HTTPError, SimulatorError) as exc:
            case.note(f"webhook failed: {exc}")
            return None
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = head(f"GET {path} HTTP/1.1", [
        (b"Host", parts.netloc.encode()), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", ws_key(case.rng)), (b"Sec-WebSocket-Version", b"13"),
        (b"X-Twilio-Signature", target.sign(url).encode())])
    conn = await Conn.open(case, target)
    await conn.send(data, "signed upgrade")
    reply = await conn.read(REPLY_SECONDS, until=b"\r\n\r\n")
    if not reply.startswith(b"HTTP/1.1 101"):
        case.note(f"upgrade not accepted: {reply[:80]!r}")
        await conn.close()
        return None
    case.accepted = True
    return conn, params, url


async def drain(conn: Conn, done: trio.Event) -> None:
    """Read what voxd sends (so its writes never block) until told or closed."""
    while not conn.gone and not done.is_set():
        await conn.read(0.2)


async def case_ws(case: Case, target: Target) -> None:
    rng = case.rng
    opened = await open_media(case, target)
    if opened is None:
        return
    conn, params, _ = opened
    sid = "MZ" + f"{rng.getrandbits(128):032x}"
    valid = [twilio_json(case, "connected", sid, params), twilio_json(case, "start", sid, params)]
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, conn, done)
        if rng.random() < 0.5:
            for text in valid:
                await conn.send(ws_frame(rng, 0x1, enc(text)), "valid message")
        for frame, what in mutated_frames(rng):
            await conn.send(frame, what)
            if rng.random() < 0.3:
                await conn.send(ws_frame(rng, 0x1, enc(twilio_json(case, "media", sid, params))),
                                "valid media")
            await trio.sleep(rng.choice([0, 0, 0.02, 0.1]))
        await trio.sleep(rng.choice([0.1, 0.5]))
        done.set()
    await conn.close(rng.choice(["fin", "rst", "half"]))


# -- kind: twilio -------------------------------------------------------------------------------


def twilio_json(case: Case, event: str, sid: str, params: dict[str, str],
                call_sid: str | None = None) -> str:
    """A valid Twilio message."""
    call_sid = call_sid or (case.call_sids[-1] if case.call_sids else "CA" + "0" * 32)
    payload = base64.b64encode(case.rng.randbytes(160)).decode()
    message: dict[str, object] = {
        "connected": {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        "start": {"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
            "accountSid": "AC" + "0" * 32, "streamSid": sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}},
        "media": {"event": "media", "sequenceNumber": "3", "streamSid": sid, "media": {
            "track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}},
        "mark": {"event": "mark", "sequenceNumber": "4", "streamSid": sid,
                 "mark": {"name": "voxd:turn=1;latency_ms=100"}},
        "dtmf": {"event": "dtmf", "streamSid": sid, "sequenceNumber": "5",
                 "dtmf": {"track": "inbound_track", "digit": "1"}},
        "stop": {"event": "stop", "sequenceNumber": "6", "streamSid": sid,
                 "stop": {"accountSid": "AC" + "0" * 32, "callSid": call_sid}},
    }[event]
    return json.dumps(message)


def weird_value(rng: random.Random) -> object:
    return rng.choice([
        None, True, 0, -1, 2**70, -(2**70), 1.5, 1e308, [], {}, [1, 2], {"a": 1},
        nasty(rng, 60_000), "A" * rng.choice([10, 10_000, 60_000]), "\u00e9" * 100,
        f"CA00\r\n{MARK} call ended: fake", f"\x1b[2J{MARK}", "=" * 7, "AAA=AAA=", "!!!!",
        base64.b64encode(b"\xff" * rng.choice([1, 159, 161, 8001, 20_000])).decode(),
        "0" * 5000, "²³", "\u0660\u0661", "12345678901234567890",
    ])


def mutate_json(rng: random.Random, value: object, depth: int = 0) -> object:
    """One mutation somewhere in a JSON value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        op = rng.randrange(6)
        copy = dict(value)
        if op == 0:
            del copy[key]
        elif op == 1:
            copy[key] = weird_value(rng)
        elif op == 2:
            copy[rng.choice([key.upper(), nasty(rng, 1000), "__proto__"])] = weird_value(rng)
        else:
            copy[key] = mutate_json(rng, value[key], depth + 1)
        return copy
    if isinstance(value, list) and value and rng.random() < 0.7:
        copy = list(value)
        copy[rng.randrange(len(copy))] = weird_value(rng)
        return copy
    if isinstance(value, str) and rng.random() < 0.5:
        return value + rng.choice(NASTY_STRINGS) if rng.random() < 0.5 else weird_value(rng)
    return weird_value(rng)


def deep(rng: random.Random, sid: str) -> str:
    depth = rng.choice([50, 500, 1000, 5000, 20_000])
    inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
    where = rng.choice(["media", "start", "mark", "customParameters"])
    quoted = json.dumps(sid)
    if where == "customParameters":
        return ('{"event":"start","streamSid":' + quoted + ',"start":{"streamSid":' + quoted
                + ',"callSid":"CA1","customParameters":' + inner + "}}")
    return '{"event":"' + where + '","streamSid":' + quoted + ',"' + where + '":' + inner + "}"


def mutate_token(rng: random.Random, token: str) -> str:
    """Another spelling of a stream token (`v2.<expiry>.<mac>`, or any dotted form whose
    all-digit part is the expiry and last part the MAC), or garbage."""
    parts = token.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    if len(parts) < 3 or not digits:
        return token + rng.choice(NASTY_STRINGS)
    e, expiry, mac = digits[0], parts[digits[0]], parts[-1]

    def spelled(new_expiry: str | None = None, new_mac: str | None = None) -> str:
        out = list(parts)
        if new_expiry is not None:
            out[e] = new_expiry
        if new_mac is not None:
            out[-1] = new_mac
        return ".".join(out)

    arabic = "".join(chr(0x660 + int(d)) for d in expiry)
    return rng.choice([
        spelled("0" + expiry), spelled("00" + expiry), spelled(arabic), spelled("²³"),
        spelled("9" * 5000), spelled("+" + expiry), spelled(" " + expiry), spelled(expiry[:-1]),
        spelled(expiry + "\r\n" + MARK), spelled(new_mac=mac[:-1] + "é"),
        spelled(new_mac=mac + "="), spelled(new_mac=mac[:20] + "\x00" + mac[21:]),
        spelled(new_mac="A" * len(mac)), spelled(new_mac=mac.upper()), token + ".x",
        ".".join(parts[:-1]), "v1" + token[2:], "",
    ])


async def case_twilio(case: Case, target: Target) -> None:
    rng = case.rng
    opened = await open_media(case, target)
    if opened is None:
        return
    conn, params, url = opened
    sid = "MZ" + f"{rng.getrandbits(128):032x}"
    call_sid = case.call_sids[-1]
    replay = rng.random() < 0.1
    token_style = rng.choice(["valid"] * 5 + ["mutated", "missing", "wrong-type", "forged-from"])
    start_params: dict[str, object] = dict(params)
    if token_style == "mutated" and "token" in params:
        start_params["token"] = mutate_token(rng, params["token"])
    elif token_style == "missing":
        start_params.pop("token", None)
    elif token_style == "wrong-type":
        start_params["token"] = weird_value(rng)
    elif token_style == "forged-from":
        start_params["from"] = f"+1555\r\n{MARK}"
    start = json.loads(twilio_json(case, "start", sid, params))
    start["start"]["customParameters"] = start_params
    if rng.random() < 0.2:  # attacker-chosen identities (log context)
        start["start"]["callSid"] = rng.choice([f"{call_sid}\r\n{MARK} x", f"\x1b[31m{call_sid}",
                                                call_sid + "é", "CA" + "1" * 5000])
        start["streamSid"] = start["start"]["streamSid"] = rng.choice(
            [sid, f"{sid}\n{MARK}", "\x1b]0;x\x07"])
    messages: list[str | bytes] = []
    if rng.random() < 0.8:
        messages.append(twilio_json(case, "connected", sid, params))
    messages.append(json.dumps(start))
    sid = start["streamSid"]
    for _ in range(rng.randrange(1, 25)):
        event = rng.choice(["media"] * 6 + ["mark", "dtmf", "stop", "connected", "start"])
        text = twilio_json(case, event, sid, params)
        roll = rng.random()
        if roll < 0.45:
            messages.append(text)
        elif roll < 0.8:
            messages.append(json.dumps(mutate_json(rng, json.loads(text)),
                                       ensure_ascii=rng.random() < 0.5))
        elif roll < 0.87:
            messages.append(deep(rng, sid))
        elif roll < 0.93:
            messages.append(mutate_bytes(rng, enc(text)))
        elif roll < 0.96:
            messages.append(text[:rng.randrange(len(text))])
        else:
            messages.append(text.replace('"event"', '"event":"media","event"', 1))
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, conn, done)
        for message in messages:
            data = message if isinstance(message, bytes) else enc(message)
            await conn.send(ws_frame(rng, 0x1, data), "twilio message")
            await trio.sleep(rng.choice([0, 0, 0, 0.02]))
        await trio.sleep(rng.choice([0.1, 0.5]))
        done.set()
    await conn.close(rng.choice(["fin", "rst", "half"]))
    if replay:  # the same stream again: the URL and start as they were, or the token respelled
        exact = rng.random() < 0.5
        again_url, again_params = url, dict(params)
        if not exact:
            if "token" in params:
                again_params["token"] = mutate_token(rng, params["token"])
            else:  # the token is the URL's last path segment
                head_part, _, token = url.rpartition("/")
                again_url = head_part + "/" + mutate_token(rng, token)
        case.note(f"replaying the stream ({'exactly' if exact else 'token respelled'}): "
                  f"{again_url} {again_params}")
        case.replayed = True
        reopened = await open_media(case, target, again_url, again_params)
        if reopened is not None:
            again = reopened[0]
            start["start"]["customParameters"] = again_params
            await again.send(ws_frame(rng, 0x1, enc(json.dumps(start))), "replayed start")
            await again.read(0.5)
            await again.close()


# -- kind: h2 -----------------------------------------------------------------------------------


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream: int, payload: bytes,
             length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("!I", n)[1:] + bytes([kind, flags]) + struct.pack("!I", stream) + payload


def h2_settings(rng: random.Random) -> bytes:
    pairs = [(4, rng.choice([0, 0, 1, 65535, 2**31 - 1]))] if rng.random() < 0.7 else []
    for _ in range(rng.randrange(0, 4)):
        pairs.append((rng.randrange(0, 10), rng.getrandbits(32)))
    return b"".join(struct.pack("!HI", k, v) for k, v in pairs)


def hpack_block(rng: random.Random, headers: list[tuple[str, str]]) -> bytes:
    from hpack import Encoder

    try:
        return Encoder().encode(headers)
    except Exception:  # an unencodable value: raw garbage instead
        return rng.randbytes(20)


def h2_requests(rng: random.Random) -> list[tuple[bytes, str]]:
    out = []
    stream = 1
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(10)
        path = rng.choice(["/healthz", "/metrics", "/twilio/voice", "/media-stream",
                           "/\x1b[2J" + MARK, "/" + "a" * 4000])
        if op <= 3:
            block = hpack_block(rng, [(":method", "GET"), (":scheme", "http"), (":path", path),
                                      (":authority", "127.0.0.1")])
            out.append((h2_frame(1, 0x5, stream, block), f"HEADERS GET {path[:40]!r}"))
            if rng.random() < 0.4:
                out.append((h2_frame(0, 0x1, stream, b"late"), "DATA on an answered stream"))
            stream += 2
        elif op == 4:
            block = hpack_block(rng, [(":method", "CONNECT"), (":protocol", "websocket"),
                                      (":scheme", "http"), (":path", "/media-stream"),
                                      (":authority", "127.0.0.1"),
                                      ("sec-websocket-version", "13")])
            out.append((h2_frame(1, 0x4, stream, block), "RFC 8441 CONNECT websocket"))
            out.append((h2_frame(0, 0, stream, b"\x81\x85" + rng.randbytes(9)), "DATA frame"))
            stream += 2
        elif op == 5:
            count = rng.choice([10, 200, 1000])
            out.append((h2_frame(6, 0, 0, rng.randbytes(8)) * count, f"{count} PINGs"))
        elif op == 6:
            out.append((h2_frame(8, 0, rng.choice([0, 1, 3]), struct.pack(
                "!I", rng.choice([0, 1, 2**31 - 1]))), "WINDOW_UPDATE"))
        elif op == 7:
            out.append((h2_frame(3, 0, rng.choice([1, 3, 0]), struct.pack("!I", 8)), "RST_STREAM"))
        elif op == 8:
            out.append((h2_frame(7, 0, 0, struct.pack("!II", 0, 0)), "GOAWAY"))
        else:
            out.append((h2_frame(rng.randrange(0, 16), rng.randrange(256),
                                 rng.choice([0, 1, 2, 2**31 - 1]), rng.randbytes(
                                     rng.randrange(0, 40)),
                                 length=rng.choice([None, None, 0, 2**24 - 1])), "random frame"))
    return out


async def case_h2(case: Case, target: Target) -> None:
    rng = case.rng
    conn = await Conn.open(case, target)
    settings = h2_settings(rng)
    if rng.random() < 0.5:  # h2c upgrade
        path = rng.choice(["/healthz", "/metrics", "/twilio/voice", "/media-stream"])
        value = base64.urlsafe_b64encode(settings).rstrip(b"=") if rng.random() < 0.8 else \
            rng.choice([b"!!!", b"", b"A" * 5000])
        upgrade = head(f"GET {path} HTTP/1.1", [
            (b"Host", b"127.0.0.1"), (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Upgrade", b"h2c"), (b"HTTP2-Settings", value)])
        await conn.send(upgrade, "h2c upgrade")
        reply = await conn.read(REPLY_SECONDS if rng.random() < 0.7 else 0.05,
                                until=b"\r\n\r\n")
        if rng.random() < 0.2:  # the ordinary client that leaves early
            await conn.close(rng.choice(["fin", "rst"]))
            return
        if not reply.startswith(b"HTTP/1.1 101") and rng.random() < 0.5:
            await conn.close()
            return
    await conn.send(PREFACE if rng.random() < 0.9 else mutate_bytes(rng, PREFACE), "preface")
    await conn.send(h2_frame(4, 0, 0, settings), "SETTINGS")
    for frame, what in h2_requests(rng):
        await conn.send(frame, what)
        await trio.sleep(rng.choice([0, 0, 0.05]))
    if rng.random() < 0.5:
        await conn.send(h2_frame(4, 1, 0, b""), "SETTINGS ack")
    await conn.read(rng.choice([0.05, 0.5, REPLY_SECONDS]))
    await conn.close(rng.choice(["fin", "rst", "half"]))


CASES: dict[str, Callable[[Case, Target], Awaitable[None]]] = {
    "http": case_http, "upgrade": case_upgrade, "h2": case_h2, "ws": case_ws,
    "twilio": case_twilio}


async def run_case(case: Case, target: Target) -> None:
    case.started = time.time()
    try:
        with trio.move_on_after(CASE_SECONDS):
            await CASES[case.kind](case, target)
    except (OSError, httpx.HTTPError, SimulatorError, trio.BrokenResourceError) as exc:
        case.note(f"ended: {type(exc).__name__}: {exc}")
        if not case.ports:
            case.refused = True
            await trio.sleep(0.1)  # voxd refused the connection: no busy loop
    except Exception as exc:  # the fuzzer's own bug: reported (a failed check), run goes on
        case.fuzzer_error = f"{type(exc).__name__}: {exc}"
        case.note(f"FUZZER ERROR {case.fuzzer_error}")
    finally:
        case.ended = time.time()


# -- voxd in its own process --------------------------------------------------------------------


class Daemon:
    """`voxd serve` with a generated config in `home`, its stderr in home/voxd.log."""

    def __init__(self, home: Path, connections: int) -> None:
        self.home = home
        port = free_port()
        self.origin = f"http://127.0.0.1:{port}"
        self.token = secrets.token_hex(16)
        limit = 8 * connections + 100
        sections = {
            "server": {"listen": f"127.0.0.1:{port}", "public_url": self.origin, "workers": 1,
                       "max_connections": limit, "max_connections_per_address": limit},
            "twilio": {"validate_signatures": True},
            "assistant": {"provider": "echo", "audio": "mulaw"},
            "call": {"stream_token": True},
            "drain": {"timeout_seconds": 5.0},
            "logging": {"level": "info"},
        }
        self.config = home / "voxd.toml"
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            for name, values in sections.items()))
        self.log_path = home / "voxd.log"
        env = {**os.environ, "VOXD_TWILIO_AUTH_TOKEN": self.token, "TMPDIR": str(home)}
        for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                     "JOURNAL_STREAM", "VOXD_STREAM_SECRET", "VOXD_WORKER", "VOXD_WORKER_FD"):
            env.pop(name, None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voxd", "serve", "--config", str(self.config)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if not self.alive():
                    raise RuntimeError(f"voxd serve exited with {self.proc.returncode}: "
                                       f"{self.log_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.origin + "/readyz")).status_code == 200:
                        return
                await trio.sleep(0.05)
        raise RuntimeError("voxd did not become ready within 15 s")

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then wait; kill what has not stopped after 15 s. (exit code, seconds)."""
        started = time.monotonic()
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                code = None
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return code, time.monotonic() - started


TCP_STATES = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT",
              "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def open_sockets(pid: int) -> list[tuple[int, str]]:
    """The TCP connections process `pid` holds open: (remote port, state)."""
    table = {}
    with contextlib.suppress(OSError), open("/proc/net/tcp") as tcp:
        for row in tcp.read().splitlines()[1:]:
            f = row.split()
            table[f[9]] = (int(f[2].split(":")[1], 16), TCP_STATES.get(f[3], f[3]))
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in table:
                    found.append(table[target[8:-1]])
    return found


async def scrape(origin: str) -> dict[str, float] | None:
    """Open descriptors and trio tasks from voxd's /metrics (None if it does not answer)."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(origin + "/metrics")).text
    except httpx.HTTPError:
        return None
    found = {}
    for name in ("process_open_fds", "voxd_trio_tasks", "voxd_calls_active",
                 "voxd_connections_open"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if match is None:
            return None
        found[name] = float(match.group(1))
    return found


async def healthz(origin: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(origin + "/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


# -- good calls ---------------------------------------------------------------------------------


@dataclass
class GoodCall:
    call_sid: str
    frames_sent: int = 0
    error: str = ""
    closed_by: str = ""
    sim_errors: list[str] = field(default_factory=list)


def caller_audio(seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio, int16 at 8 kHz: 0.4 s of speech, then 1.6 s of silence in which the
    echo assistant answers (so no barge-in drops any of its audio: every drop is a fault)."""
    speech = ulaw_decode(np.frombuffer(speech_ulaw(0.4, seed=seed, pauses=False), np.uint8))
    period = np.concatenate([speech.astype(np.int16), np.zeros(int(1.6 * 8000), np.int16)])
    return np.tile(period, max(1, round(seconds / 2.0)))


async def good_call(target: Target, seconds: float, seed: int, calls: list[GoodCall]) -> None:
    simulator = TwilioSimulator(target.webhook_url, auth_token=target.token)
    record = GoodCall(simulator.call_sid)
    calls.append(record)
    try:
        report = await simulator.call(caller_audio(seconds, seed))
        record.frames_sent = len(report.caller_frames)
        record.closed_by = report.closed_by
        record.sim_errors = report.errors
    except (SimulatorError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Finding:
    what: str
    cases: list[Case]
    evidence: str
    files: list[Path] = field(default_factory=list)


@dataclass
class Report:
    options: Options
    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    log_path: Path | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    """Cases run, by kind."""
    accepted: int = 0
    """Cases whose signed media upgrade was accepted (101)."""
    good_calls: int = 0

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        out = [*self.lines, "", f"{'check':{width}}  result  detail"]
        out += [f"{c.name:{width}}  {'ok' if c.ok else 'FAIL':6}  {c.detail}"
                for c in self.checks]
        for f in self.findings:
            out.append("")
            out.append(f"finding: {f.what} (seed {self.options.seed})")
            for case in f.cases[:5]:
                out.append(f"  case {case.index} ({case.kind}): {' | '.join(case.steps[:4])[:400]}")
            if len(f.cases) > 5:
                out.append(f"  ... and {len(f.cases) - 5} more suspect cases")
            out.append("  evidence: " + f.evidence.strip().replace("\n", "\n            ")[:1200])
            if f.files:
                out.append(f"  saved: {', '.join(str(p) for p in f.files[:6])}")
        out.append("")
        out.append("fuzz: all checks passed" if not self.failed else
                   f"fuzz: FAILED (seed {self.options.seed}): {', '.join(self.failed)}")
        return "\n".join(out)


BAD_LINE = re.compile(r"Traceback|internal error|failed \(voxd's bug", re.I)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z ")
SUMMARY = re.compile(r"call_sid=(\S+) \S+ call ended: .*?frames_in=(\d+) frames_out=(\d+) "
                     r"dropped_in=(\d+) dropped_out=(\d+).*reason=(\S+)")


def stamp_of(line: str) -> float | None:
    match = STAMP.match(line)
    if match is None:
        return None
    return calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")) + \
        int(match.group(2)) / 1000


class Fuzzer:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.cases: list[Case] = []
        self.by_port: dict[int, Case] = {}
        self.next_index = 0
        self.died_at: float | None = None
        self.good_done = trio.Event()
        self.level: dict[str, float] | None = None
        """--one-by-one: voxd's figures before the next case."""
        self.leaks: list[tuple[Case, str]] = []
        self.progress = (lambda text: None) if options.quiet else (
            lambda text: print(text, file=sys.stderr, flush=True))

    def new_case(self) -> Case:
        o = self.options
        index = o.replay if o.replay is not None else self.next_index
        self.next_index += 1
        case = make_case(o.seed, index, o.kinds)
        self.cases.append(case)
        return case

    async def fuzz(self, daemon: Daemon, target: Target, end: float) -> None:
        o = self.options
        limit = 1 if o.replay is not None else o.max_cases

        async def worker() -> None:
            while trio.current_time() < end and self.next_index < limit and daemon.alive():
                case = self.new_case()
                await run_case(case, target)
                for port in case.ports:
                    self.by_port[port] = case
                if o.one_by_one:
                    await self.check_case(case, target)

        async with trio.open_nursery() as nursery:
            for _ in range(1 if o.replay is not None or o.one_by_one else o.connections):
                nursery.start_soon(worker)

    async def check_case(self, case: Case, target: Target) -> None:
        """--one-by-one: wait (up to LEAK_SECONDS) for voxd's descriptors and tasks to come
        back to where they were before `case`; a case after which they do not is a leak."""
        before = self.level
        now = None
        deadline = trio.current_time() + LEAK_SECONDS
        while trio.current_time() < deadline:
            now = await scrape(target.origin)
            if now is None or before is None or (
                    now["process_open_fds"] <= before["process_open_fds"]
                    and now["voxd_trio_tasks"] <= before["voxd_trio_tasks"]
                    and now["voxd_connections_open"] <= before["voxd_connections_open"]):
                break
            await trio.sleep(0.25)
        else:
            assert now is not None and before is not None
            self.leaks.append((case, f"after case {case.index}: open fds "
                                     f"{before['process_open_fds']:.0f} -> "
                                     f"{now['process_open_fds']:.0f}, trio tasks "
                                     f"{before['voxd_trio_tasks']:.0f} -> "
                                     f"{now['voxd_trio_tasks']:.0f}, connections open "
                                     f"{before['voxd_connections_open']:.0f} -> "
                                     f"{now['voxd_connections_open']:.0f} after "
                                     f"{LEAK_SECONDS:.0f} s"))
            self.progress(self.leaks[-1][1])
        if now is not None:
            self.level = now

    async def good_calls(self, target: Target, daemon: Daemon, end: float,
                         calls: list[GoodCall]) -> None:
        n = 0
        try:
            while trio.current_time() < end - 2 and daemon.alive():
                seconds = min(self.options.good_call_seconds, max(2.0, end - trio.current_time()))
                await good_call(target, seconds, self.options.seed + n, calls)
                n += 1
        finally:
            self.good_done.set()

    async def watch(self, daemon: Daemon, started: float) -> None:
        shown = started
        while True:
            await trio.sleep(0.2)
            if not daemon.alive() and self.died_at is None:
                self.died_at = time.time()
                self.progress(f"fuzz: voxd DIED (exit {daemon.proc.returncode}) after "
                              f"{len(self.cases)} cases")
            if trio.current_time() - shown >= 10:
                shown = trio.current_time()
                self.progress(f"[{trio.current_time() - started:5.0f}s] cases {len(self.cases)}"
                              f", bytes sent {sum(c.bytes_sent for c in self.cases)}, voxd "
                              f"{'alive' if daemon.alive() else 'DEAD'}")

    def in_flight(self, at: float, slack: float = 0.5) -> list[Case]:
        return [c for c in self.cases if c.started - slack <= at <= (c.ended or at) + slack]


async def run_fuzz(options: Options) -> Report:
    report = Report(options)
    fuzzer = Fuzzer(options)
    home = Path(tempfile.mkdtemp(prefix="voxd-fuzz-"))
    out = options.out or home / "cases"
    daemon = Daemon(home, options.connections)
    report.log_path = options.log_copy or daemon.log_path
    good: list[GoodCall] = []
    base = after = None
    healthy = same_pid = False
    log_before = log_after = 0
    fuzz_seconds = 0.0
    held: list[tuple[int, str]] = []
    try:
        await daemon.ready()
        pid = daemon.proc.pid
        async with httpx.AsyncClient(timeout=10) as client:
            target = Target(daemon.origin, daemon.token, client)
            # Warm-up (first-use allocations, one call through every path), then the baseline.
            await good_call(target, 1.0, options.seed, [])
            await trio.sleep(1.0)
            base = fuzzer.level = await scrape(daemon.origin)
            log_before = daemon.log_size()
            started = trio.current_time()
            seconds = 30.0 if options.replay is not None else options.minutes * 60
            end = started + seconds
            fuzzer.progress(f"fuzz: voxd pid {pid} at {daemon.origin}, seed {options.seed}, "
                            f"{options.connections} connections for {seconds:.0f} s, kinds "
                            f"{','.join(options.kinds)}; log {daemon.log_path}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fuzzer.watch, daemon, started)
                alone = options.replay is not None or options.one_by_one
                if not alone:
                    nursery.start_soon(fuzzer.good_calls, target, daemon, end, good)
                    await trio.sleep(0.5)  # the good call is streaming
                await fuzzer.fuzz(daemon, target, end)
                if alone:
                    await trio.sleep(0.5)
                    nursery.cancel_scope.cancel()
                else:
                    # The good call in progress finishes (good_calls starts no other).
                    await fuzzer.good_done.wait()
                    nursery.cancel_scope.cancel()
            fuzz_seconds = trio.current_time() - started
            log_after = daemon.log_size()
            # Settle: back to the baseline (a leak stays above it).
            deadline = trio.current_time() + options.settle
            while daemon.alive():
                after = await scrape(daemon.origin)
                if (after is not None and base is not None
                        and after["process_open_fds"] <= base["process_open_fds"]
                        and after["voxd_trio_tasks"] <= base["voxd_trio_tasks"]
                        and after["voxd_connections_open"] <= base["voxd_connections_open"]
                        and after["voxd_calls_active"] == 0) or trio.current_time() > deadline:
                    break
                await trio.sleep(1.0)
            healthy = daemon.alive() and await healthz(daemon.origin)
            same_pid = daemon.alive() and daemon.proc.pid == pid
            held = open_sockets(pid) if daemon.alive() else []
    finally:
        stopped, stop_seconds = daemon.stop()
    log = daemon.log_text()
    if options.log_copy is not None:
        options.log_copy.write_text(log)
    judge(report, fuzzer, daemon, log, base, after, good, healthy and same_pid, stopped,
          stop_seconds, log_before, log_after, fuzz_seconds, out, held)
    # The temporary directory goes unless it holds the only copy of the log or saved cases.
    if not options.keep_home or (options.log_copy is not None and options.out is not None):
        shutil.rmtree(home, ignore_errors=True)
    return report


def judge(report: Report, fuzzer: Fuzzer, daemon: Daemon, log: str,
          base: dict[str, float] | None, after: dict[str, float] | None, good: list[GoodCall],
          alive: bool, stopped: int | None, stop_seconds: float, log_before: int,
          log_after: int, fuzz_seconds: float, out: Path,
          held: list[tuple[int, str]]) -> None:
    o = report.options
    add = report.checks.append
    cases = fuzzer.cases
    sent = sum(c.bytes_sent for c in cases)
    kinds = report.kinds = Counter(c.kind for c in cases)
    report.accepted = sum(c.accepted for c in cases)
    report.good_calls = len(good)
    report.lines.append(
        f"fuzz: seed {o.seed}, {o.connections} connections, {fuzz_seconds:.0f} s, "
        f"{len(cases)} cases ({', '.join(f'{k} {v}' for k, v in kinds.most_common())}), "
        f"{sent} bytes sent on {sum(len(c.ports) for c in cases)} connections, "
        f"{len(good)} good calls; {report.accepted} signed media upgrades accepted; "
        f"{sum(c.refused for c in cases)} cases could not connect (or their webhook failed)")

    def save(what: str, suspects: list[Case], evidence: str) -> None:
        files: list[Path] = []
        for case in suspects[:20]:
            files += case.save(out, o.seed, o.kinds, what)
        report.findings.append(Finding(what, suspects, evidence, files))

    # 1. the daemon never died
    died = fuzzer.died_at is not None or not alive
    detail = f"pid {daemon.proc.pid} " + ("alive, /healthz ok" if alive else
                                          f"DEAD or not answering (exit {daemon.proc.poll()})")
    add(Check("daemon alive", not died, detail))
    if died:
        at = fuzzer.died_at or time.time()
        suspects = fuzzer.in_flight(at, slack=1.0)
        tail = "\n".join(log.splitlines()[-12:])
        save("voxd died", suspects, tail)

    # 2. a clean log: no traceback, no internal error
    lines = log.splitlines()
    bad = [i for i, line in enumerate(lines) if BAD_LINE.search(line)]
    first = ""
    if bad:
        record, exceptions = log_record(lines, bad[0])
        inner = [x for x in exceptions if "ExceptionGroup" not in x]
        first = record.strip()[:160] + (f" ... {inner[-1][:100]}" if inner else "")
    add(Check("no traceback", not bad,
              f"{sum('Traceback' in line for line in lines)} tracebacks, "
              f"{sum(bool(re.search('internal error', x, re.I)) for x in lines)} internal "
              f"errors, {sum(bool(re.search('voxd.s bug', x)) for x in lines)} voxd's-bug lines"
              + (f"; first: {first}" if first else "")))
    seen: set[str] = set()
    for i in bad:
        record, exceptions = log_record(lines, i)
        innermost = [x for x in exceptions if "ExceptionGroup" not in x] or exceptions
        key = re.sub(r"\d+", "N", record.split(" ", 2)[-1])[:100] + (innermost[-1][:60]
                                                                    if innermost else "")
        key = re.sub(r"127\.0\.0\.1:N|\(and N more.*", "", key)
        if key in seen:
            continue
        seen.add(key)
        save(f"logged: {record[25:185]}", attribute(fuzzer, record),
             "\n".join([record[:400], *dict.fromkeys(innermost[-3:])]))

    # 3. a log an attacker cannot forge: no raw control characters, no injected lines
    controls = [line for line in lines if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line)]
    forged = [line for line in lines if line.startswith(MARK)]
    add(Check("log not forgeable", not controls and not forged,
              f"{len(controls)} lines with raw control characters, {len(forged)} forged lines"
              + (f"; e.g. {controls[0][:160]!r}" if controls else "")
              + (f"; e.g. {forged[0][:160]!r}" if forged else "")))
    for line in (controls[:1] + forged[:1]):
        record, _ = log_record(lines, lines.index(line))
        save("log line with raw control characters or forged", attribute(fuzzer, record),
             repr(record[:300]) + "\n" + repr(line[:300]))

    # 4. back at the baseline
    if base is None or after is None:
        add(Check("back at baseline", False, "no /metrics figures (voxd not answering)"))
    else:
        ok = (after["process_open_fds"] <= base["process_open_fds"]
              and after["voxd_trio_tasks"] <= base["voxd_trio_tasks"]
              and after["voxd_connections_open"] <= base["voxd_connections_open"]
              and after["voxd_calls_active"] == 0)
        leaked = [(port, state, fuzzer.by_port[port]) for port, state in held
                  if port in fuzzer.by_port]
        add(Check("back at baseline", ok,
                  f"open fds {base['process_open_fds']:.0f} -> {after['process_open_fds']:.0f}, "
                  f"trio tasks {base['voxd_trio_tasks']:.0f} -> {after['voxd_trio_tasks']:.0f}, "
                  f"connections open (voxd's count) {base['voxd_connections_open']:.0f} -> "
                  f"{after['voxd_connections_open']:.0f}, calls active "
                  f"{after['voxd_calls_active']:.0f} ({o.settle:.0f} s to "
                  f"settle); connections of fuzz cases still held: {len(leaked)}"
                  + (" (" + ", ".join(f"{n} {s}" for s, n in Counter(
                      s for _, s, _ in leaked).most_common()) + ")" if leaked else "")))
        if not ok and not leaked:
            report.lines.append("back at baseline failed with no connection of a case still "
                                "open: `--one-by-one` (same --seed and --kinds) checks after "
                                "every case and names the ones that leave something behind")
        if not ok and leaked:
            suspects = list({id(c): c for _, _, c in leaked}.values())
            save("connections still held after the fuzz (leak)", suspects,
                 "; ".join(f"case {c.index} port {p} {s}" for p, s, c in leaked[:20]))

    # 5. the good calls lost nothing
    summaries = {}
    for line in lines:
        match = SUMMARY.search(line)
        if match:
            summaries[match.group(1)] = match.groups()[1:]
    problems = []
    total = 0
    for call in good:
        total += call.frames_sent
        summary = summaries.get(call.call_sid)
        if call.error or call.sim_errors or call.closed_by != "caller":
            why = call.error or "; ".join(call.sim_errors[:2]) or f"ended by {call.closed_by}"
            problems.append(f"{call.call_sid}: {why}")
        elif summary is None:
            problems.append(f"{call.call_sid}: no summary line")
        elif (int(summary[0]) != call.frames_sent or summary[2] != "0" or summary[3] != "0"
              or summary[4] != "caller-hangup"):
            problems.append(f"{call.call_sid}: sent {call.frames_sent}, voxd frames_in "
                            f"{summary[0]} dropped_in {summary[2]} dropped_out {summary[3]} "
                            f"reason {summary[4]}")
    for case, what in fuzzer.leaks:
        save("case left descriptors or tasks behind (leak)", [case], what)
    if o.replay is None and not o.one_by_one:  # these run no good call
        add(Check("good calls lossless", bool(good) and not problems,
                  f"{len(good)} good calls, {total} frames sent, {len(problems)} with a problem"
                  + (f"; e.g. {problems[0]}" if problems else "")))

    # 6. the log is bounded by what was received
    grown = log_after - log_before
    ratio = grown / sent if sent else 0.0
    single = o.replay is not None or o.one_by_one
    add(Check("log bounded", ratio < 1.0 or single,
              f"{grown} bytes of log for {sent} bytes received: {ratio:.3f} per byte"
              + (" (not judged one case at a time: the first refusal of each kind is always "
                 "logged)" if single else "")))
    if ratio >= 1.0:
        by_kind = Counter()
        for c in cases:
            by_kind[c.kind] += c.bytes_sent
        report.lines.append("bytes sent by kind: " + ", ".join(
            f"{k} {v}" for k, v in by_kind.most_common()))

    # 7. a stream token is used once: a case that replayed its stream started at most one call
    started = Counter(re.findall(r"call_sid=(\S+) \S+ call started:", log))
    replays = [c for c in cases if c.replayed]
    twice = [c for c in replays if any(started[sid] > 1 for sid in c.call_sids)]
    add(Check("token single use", not twice,
              f"{len(replays)} streams replayed (exactly or with the token respelled), "
              f"{len(twice)} started a second call"
              + (f", e.g. case {twice[0].index}" if twice else "")))
    if twice:
        save("a replayed stream started a second call", twice,
             "; ".join(f"case {c.index}: {c.steps[-3:]}" for c in twice[:3]))

    # 8. the fuzzer itself worked (a case it could not build or send was not fuzzed)
    broken = [c for c in cases if c.fuzzer_error]
    add(Check("fuzzer ran", not broken,
              f"{len(broken)} cases failed in the fuzzer itself"
              + (f", e.g. case {broken[0].index}: {broken[0].fuzzer_error[:200]}"
                 if broken else "")))
    if broken:
        save("the fuzzer's own error (a bug in bench/fuzz.py, not in voxd)", broken,
             broken[0].fuzzer_error)

    # 9. SIGTERM stops it
    if died:
        stop_detail = f"not running when stopped (exit {stopped})"
    elif stopped is None:
        stop_detail = "did not stop within 15 s of SIGTERM (killed)"
    else:
        stop_detail = f"exit code {stopped} {stop_seconds:.1f} s after SIGTERM (drain timeout 5 s)"
    add(Check("clean stop", stopped == 0 and not died, stop_detail))


EXCEPTION = re.compile(r"^[ |+]*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Group)\w*: .*)$")


def log_record(lines: list[str], i: int) -> tuple[str, list[str]]:
    """The log record line `i` belongs to (the last stamped line up to it) and the exception
    lines of its traceback (outermost first)."""
    j = i
    while j > 0 and STAMP.match(lines[j]) is None:
        j -= 1
    k = j + 1
    while k < len(lines) and STAMP.match(lines[k]) is None:
        k += 1
    found = [m.group(1).strip()[:300] for x in lines[j + 1:k] if (m := EXCEPTION.match(x))]
    return lines[j], found


def attribute(fuzzer: Fuzzer, record: str) -> list[Case]:
    """The case(s) a log record is about: by the client port it names, by the call, or by
    the time (the cases in flight then)."""
    for port in re.findall(r"127\.0\.0\.1:(\d+)", record):
        case = fuzzer.by_port.get(int(port))
        if case is not None:
            return [case]
    for sid in re.findall(r"call_sid=(CA[0-9a-f]{32})", record):
        found = [c for c in fuzzer.cases if sid in c.call_sids]
        if found:
            return found
    at = stamp_of(record)
    return fuzzer.in_flight(at) if at is not None else []


def signature(finding: Finding) -> str:
    """What identifies a finding in a replay: the innermost exception's class, or the kind of
    failure."""
    if finding.what == "voxd died" or finding.what.startswith("connections still held"):
        return finding.what
    classes = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)\w*): ", finding.evidence, re.M)
    return classes[-1] if classes else re.sub(r"\d+", "N", finding.what[:60])


async def triage(report: Report, budget: float) -> None:
    """Replay the suspects of each finding that has several, one by one against a fresh
    daemon, to name the case(s) that cause it alone (within `budget` seconds in all)."""
    options = report.options
    started = time.monotonic()
    for finding in report.findings:
        if len(finding.cases) <= 1:
            continue
        wanted = signature(finding)
        hint = "h2" if "h2" in finding.evidence else "ws" if "websocket" in \
            finding.evidence.lower() else ""
        suspects = sorted(finding.cases, key=lambda c: c.kind != hint)
        culprits, tried = [], 0
        for case in suspects:
            if time.monotonic() - started > budget:
                break
            tried += 1
            one = Options(seed=options.seed, kinds=options.kinds, replay=case.index,
                          quiet=True, connections=1, triage=False, settle=3.0,
                          keep_home=False)
            result = await run_fuzz(one)
            if any(signature(f) == wanted for f in result.findings):
                culprits.append(case)
                break
        if culprits:
            finding.cases = culprits
        report.lines.append(
            f"triage of '{finding.what[:70]}': replayed {tried} of {len(suspects)} suspects "
            "alone: " + (f"case {culprits[0].index} ({culprits[0].kind}) does it by itself"
                         if culprits else "none does it alone (timing, or a combination)"))


async def main_async(options: Options) -> Report:
    report = await run_fuzz(options)
    if options.triage and options.replay is None and report.findings:
        await triage(report, budget=90.0)
    return report


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=8, help="fuzz clients at once")
    parser.add_argument("--max-cases", type=int, default=1_000_000)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--replay", type=int, help="send only this case (same --seed, --kinds)")
    parser.add_argument("--out", type=Path, help="where to save suspect cases' bytes")
    parser.add_argument("--log", type=Path, help="keep voxd's log here")
    parser.add_argument("--good-call-seconds", type=float, default=8.0)
    parser.add_argument("--one-by-one", action="store_true",
                        help="one case at a time, each followed by a leak check (no good call)")
    parser.add_argument("--no-triage", action="store_true",
                        help="do not replay a finding's suspect cases one by one")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {','.join(KINDS)}")
    return Options(seed=args.seed, minutes=args.minutes, connections=args.connections,
                   max_cases=args.max_cases, kinds=kinds, replay=args.replay, out=args.out,
                   log_copy=args.log, good_call_seconds=args.good_call_seconds,
                   triage=not args.no_triage, one_by_one=args.one_by_one)


def main() -> int:
    options = parse_args()
    started = time.monotonic()
    report = trio.run(main_async, options)
    print(report.render())
    print(f"(wall time {time.monotonic() - started:.0f} s; voxd's log: {report.log_path})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

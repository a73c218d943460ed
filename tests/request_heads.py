"""Request-shaped input for property tests of the front door's request-head parsing.

`requests()` draws an HTTP/1.x request head (a method, a target, a version, header lines ending
in CRLF, the blank line) and then, most of the time, mangles it the ways scanners and broken
clients do. Each example carries what voxd's parser must make of it: `Expect.head` when it is
well formed (the fields routing needs), `Expect.error` (a fragment of the HeadError's message)
when it must be refused, or neither when a random edit leaves either outcome possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from voxd.net.request_head import RequestHead

METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"]
PATHS = ["/", "/twilio/voice", "/twilio/stream-ended", "/media-stream", "/media-stream/v3.x",
         "/healthz", "/readyz", "/metrics", "/calls", "/nope", "//media-stream"]
SPECIAL = {"upgrade", "content-length", "transfer-encoding"}
"""Header names whose values routing reads (other names are drawn apart from these)."""


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def head(self) -> bytes:
        lines = [b" ".join((self.method, self.target, self.version))]
        lines += [name + b": " + value for name, value in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def expected(self) -> RequestHead:
        values = {name.lower(): value.strip() for name, value in self.headers}
        upgrade = values.get(b"upgrade", b"").lower()
        length = values.get(b"content-length", b"0")
        return RequestHead(self.method.decode(), self.target.split(b"?")[0].decode(),
                           upgrade == b"websocket", upgrade.decode(), int(length),
                           b"transfer-encoding" in values)


@dataclass
class Example:
    """Bytes to send (a head, and a body when its Content-Length can be trusted) and what the
    parser must make of the head."""

    data: bytes
    head_bytes: int
    how: str
    """How it was made ("well formed", or the mangling)."""
    head: RequestHead | None = None
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Example({self.how}: {self.data[:self.head_bytes]!r})"


token = st.from_regex(rb"[A-Za-z0-9!#$&+.^_`|~-]{1,16}", fullmatch=True)
value = st.from_regex(rb"[ -~]{0,40}", fullmatch=True)
names = token.filter(lambda n: n.lower() not in SPECIAL)
targets = st.builds(
    lambda path, query: path + query,
    st.sampled_from([p.encode() for p in PATHS])
    | st.from_regex(rb"/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,40}", fullmatch=True),
    st.sampled_from([b""]) | st.from_regex(rb"\?[A-Za-z0-9=&%._-]{0,30}", fullmatch=True))


@st.composite
def well_formed(draw: st.DrawFn) -> Request:
    """A request head voxd's parser must accept, with routing's headers sometimes in it."""
    headers = [(b"Host", b"x")] if draw(st.booleans()) else []
    headers += draw(st.lists(st.tuples(names, value), max_size=5))
    if draw(st.booleans()):
        headers.append((draw(st.sampled_from([b"Upgrade", b"upgrade", b"UPGRADE"])),
                        draw(st.sampled_from([b"websocket", b"WebSocket", b" websocket ",
                                              b"h2c", b"TLS/1.2", b""]))))
        if draw(st.booleans()):
            headers += [(b"Connection", b"Upgrade"), (b"Sec-WebSocket-Version", b"13"),
                        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")]
    body = b""
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        body = b"x" * draw(st.integers(0, 300))
        headers.append((draw(st.sampled_from([b"Content-Length", b"content-length"])),
                        str(len(body)).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    headers = draw(st.permutations(headers))
    return Request(draw(st.sampled_from([m.encode() for m in METHODS])), draw(targets),
                   draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])), list(headers), body)


def _with_header(request: Request, name: bytes, content: bytes) -> Request:
    return Request(request.method, request.target, request.version,
                   [*request.headers, (name, content)])


@st.composite
def requests(draw: st.DrawFn) -> Example:
    """A well-formed request head, or (three times in four) one mangled."""
    request = draw(well_formed())
    head = request.head()
    how = draw(st.sampled_from(["well formed", "ambiguous length", "length and chunked",
                                "bad length", "bad method", "bad request line", "bare LF",
                                "edited bytes"]))
    lengths = [v for n, v in request.headers if n.lower() == b"content-length"]
    if how == "ambiguous length":
        other = str(int(lengths[0]) + 1 if lengths else 7).encode()
        bad = _with_header(_with_header(request, b"Content-Length", other),
                           b"Content-Length", other + b", " + (lengths or [b"8"])[0])
        return Example(bad.head(), len(bad.head()), how, error="ambiguous body length")
    if how == "length and chunked":
        bad = _with_header(_with_header(request, b"Transfer-Encoding", b"chunked"),
                           b"Content-Length", b"5")
        if lengths:
            bad.headers = [h for h in bad.headers if h[0].lower() != b"content-length"] + \
                [(b"Content-Length", lengths[0])]
        return Example(bad.head(), len(bad.head()), how, error="ambiguous body length")
    if how == "bad length":
        length = draw(st.sampled_from([b"-1", b"12a", b"0x10", b"\xef\xbc\x91\xef\xbc\x92",
                                       b"1" * 13, b"", b"+5", b"1 2"]))
        bad = Request(request.method, request.target, request.version,
                      [h for h in request.headers
                       if h[0].lower() not in (b"content-length", b"transfer-encoding")]
                      + [(b"Content-Length", length)])
        return Example(bad.head(), len(bad.head()), how, error="Content-Length")
    if how == "bad method":
        method = draw(st.sampled_from([b"G3T", b"PO-ST", b"GET\x00", b"\xc3\x89T\xc3\x89",
                                       b"{GET}"]))
        bad = Request(method, request.target, request.version, request.headers)
        return Example(bad.head(), len(bad.head()), how, error="bad method")
    if how == "bad request line":
        line = request.method + b" " + request.target + b" " + request.version
        mangled = draw(st.sampled_from([
            line.replace(b" ", b"  ", 1),  # two spaces
            request.method + b" " + request.target,  # no version (HTTP/0.9)
            request.method + b" " + request.target + b" HTTP/2.0",
            request.method + b" " + request.target + b" http/1.1",
            request.method + b"  " + request.version,  # no target
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
            line.replace(b" ", b"\t")]))
        data = mangled + head[head.index(b"\r\n"):]
        return Example(data, len(data), how, error="not an HTTP/1.x request line")
    if how == "bare LF":  # one line break a lone LF: two lines run together for the parser
        breaks = [i for i in range(len(head) - 4) if head[i:i + 2] == b"\r\n"]
        if breaks:
            at = draw(st.sampled_from(breaks))
            data = head[:at] + head[at + 1:]
            return Example(data, len(data), how)
    if how == "edited bytes":
        data = bytearray(head[:-4])
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            if draw(st.booleans()) and at < len(data):
                del data[at]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=3))
        data += b"\r\n\r\n"
        return Example(bytes(data), len(data), how)
    return Example(head + request.body, len(head), "well formed", head=request.expected())

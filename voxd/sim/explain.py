"""What went wrong when the simulator reached for a URL, said in one line a person can act on
(and SimulatorError, the error that carries it).

httpx and trio-websocket wrap the real cause (an ssl.SSLError, a socket.gaierror, a refused
connection inside an exception group) in exceptions whose own text is often empty; this finds
the cause and names it. Nothing here does I/O."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from html import unescape
from urllib.parse import urlsplit

import httpx
import trio

from voxd.errors import VoxdError
from voxd.observability.untrusted import show

EXCERPT = 100
"""Characters of a response body quoted in an error."""


class SimulatorError(VoxdError):
    """The simulated call could not be placed or went wrong; the message says how."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, what it was raised from or during, and the members of exception groups, once
    each, outermost first."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def _text(exc: BaseException) -> str:
    """The exception's message, or its type's name when the message is empty."""
    return str(exc).strip() or type(exc).__name__


def _where(url: str) -> tuple[str, str]:
    """(host, host:port) of a URL, the port defaulted from the scheme."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme in ("https", "wss") else 80
    return host, f"{host}:{port}"


def connection_problem(exc: BaseException, url: str, timeout: float | None = None) -> str:
    """Why connecting to (or asking) `url` failed, in words: TLS spoken to a plain-HTTP port,
    a name that does not resolve, a refused connection, a timeout; else the innermost cause's
    message (never empty)."""
    host, address = _where(url)
    secure = urlsplit(url).scheme in ("https", "wss")
    within = f" within {timeout:g} s" if timeout else ""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (f"the TLS certificate of {address} is not trusted "
                    f"({cause.verify_message or _text(cause)})")
        if isinstance(cause, ssl.SSLError):
            if any(sign in str(cause) for sign in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
                                                   "RECORD_LAYER", "PACKET_LENGTH")):
                return (f"TLS handshake failed: {address} does not speak TLS (is it a plain-HTTP "
                        f"port? then use {'http' if url.startswith('https') else 'ws'}://)")
            return f"TLS handshake with {address} failed ({cause.reason or _text(cause)})"
        if isinstance(cause, socket.gaierror):
            return f"the host name {host} is not resolved ({cause.strerror or _text(cause)})"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused: nothing listens on {address}"
        if isinstance(cause, httpx.ConnectTimeout):
            hint = (" (TLS to a plain-HTTP port can hang like this: is it http/ws?)"
                    if secure else "")
            return f"no connection to {address}{within} (timed out){hint}"
        if isinstance(cause, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
            return f"connected to {address}, but no answer came{within} (timed out)"
        if isinstance(cause, (trio.TooSlowError, TimeoutError)) \
                or type(cause).__name__ == "ConnectionTimeout":
            hint = (" (TLS to a plain-HTTP port can hang like this: is it http/ws?)"
                    if secure else "")
            return f"no answer from {address}{within} (timed out){hint}"
        if isinstance(cause, httpx.RemoteProtocolError):
            return f"{address} broke the HTTP exchange ({_text(cause)})"
        if isinstance(cause, ConnectionResetError):
            return f"{address} reset the connection"
    innermost = list(_causes(exc))
    for cause in reversed(innermost):
        if str(cause).strip():
            return str(cause).strip()
    return type(exc).__name__


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.S | re.I)


def body_excerpt(body: str, limit: int = EXCERPT) -> str:
    """A response body cut to one short, escaped line: an HTML page's title (or its text
    without the tags), whitespace collapsed."""
    title = _TITLE.search(body)
    text = title.group(1) if title else body
    if "<" in text and ">" in text:
        text = _TAG.sub(" ", text)
    text = " ".join(unescape(text).split())
    return show(text, limit)


def status_problem(what: str, url: str, status: int, reason: str, body: str) -> str:
    """`what` (e.g. "webhook") answered an HTTP error: the status and a short excerpt."""
    excerpt = body_excerpt(body)
    if excerpt:
        return f"{what} answered HTTP {status}: {excerpt}"
    return f"{what} answered HTTP {status} {reason} (empty body) at {url}".replace("  ", " ")


def same_origin(stream_url: str, webhook_url: str) -> bool:
    """Does the TwiML's stream URL point at the host and port the webhook was asked at?"""
    return _where(stream_url)[1] == _where(webhook_url)[1]


def elsewhere_hint(stream_url: str, webhook_url: str) -> str:
    """A hint when the stream goes to a host other than the webhook's ("" when it does not):
    voxd derives the stream URL from server.public_url."""
    if not webhook_url or same_origin(stream_url, webhook_url):
        return ""
    parts = urlsplit(stream_url)
    return (f"; the TwiML sends the stream to {show(f'{parts.scheme}://{parts.netloc}', 80)}, "
            f"not to the webhook's {_where(webhook_url)[1]}: is server.public_url right?")


def url_problem(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why `url` cannot be a webhook URL (None when it can): not http(s), no host, a port out
    of range."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad port, an unclosed [IPv6 bracket
        return f"{exc} in {show(url, 120)}"
    if parts.scheme not in schemes:
        return f"not an {' or '.join(s + '://' for s in schemes)} URL: {show(url, 120)}"
    if not parts.hostname:
        return f"no host in {show(url, 120)}"
    if port == 0:
        return f"port 0 in {show(url, 120)}"
    return None

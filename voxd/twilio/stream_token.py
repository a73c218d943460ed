"""Per-call stream tokens, sans-I/O: the webhook proves to the media endpoint that it sent
this call there, with these parameters; the token is checked at the WebSocket upgrade.

The webhook puts the token in the stream URL's path, `wss://HOST/media-stream/<token>`, and the
call's other facts (`from`, `to`, ...) in `<Parameter>`s. Twilio signs the exact URL it
connects to (X-Twilio-Signature), so every call's upgrade signature differs, and a leaked
signed URL is worth one call for at most the token's life.

    v3.<CallSid>.<expiry: 10 digits>.<parameters digest: 22 chars>.<MAC: 43 chars>

The MAC is HMAC-SHA256(stream secret) over everything before it, so the upgrade alone
verifies the token (before the socket is accepted, counted or logged about). The parameters
digest is an HMAC of every `<Parameter>` (names and values): at `start`, the stream must carry
the token's CallSid and exactly those parameters, or it is refused.

One canonical form: fixed lengths, ASCII only, so no two spellings of one token exist; anything
else (non-ASCII, control characters, other digits, any length) is refused as malformed before
any other work. Nothing is stored: any worker or host with the same secret verifies. Single use
is enforced at the upgrade, keyed on the MAC (`voxd.shared_state`: this process, this host's
workers, or every host).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from voxd.errors import ProtocolError

VERSION: Final = "v3"
EXPIRY_DIGITS: Final = 10
DIGEST_CHARS: Final = 22  # 128 bits of HMAC-SHA256 in unpadded URL-safe base64
MAC_CHARS: Final = 43  # all 256 bits
CALL_SID: Final = re.compile(r"CA[0-9a-f]{32}")
"""Twilio's CallSid: CA and 32 lower-case hex digits."""
_FORM: Final = re.compile(rf"v3\.(CA[0-9a-f]{{32}})\.([0-9]{{{EXPIRY_DIGITS}}})\."
                          rf"([A-Za-z0-9_-]{{{DIGEST_CHARS}}})\.([A-Za-z0-9_-]{{{MAC_CHARS}}})")
LENGTH: Final = len(VERSION) + 34 + EXPIRY_DIGITS + DIGEST_CHARS + MAC_CHARS + 4


class TokenRejected(ProtocolError):
    """The stream's token is missing, malformed, forged, expired, used, or its stream is
    another call's or carries other parameters; `kind` names which, in one word."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class StreamPass:
    """What a verified token proves: the webhook sent `call_sid` here, with the parameters
    whose digest is `digest`, until `expiry`. `mac` is the token's identity (single use)."""

    call_sid: str
    expiry: int
    digest: str
    mac: str

    def check_stream(self, secret: bytes, call_sid: str,
                     parameters: Mapping[str, str]) -> None:
        """At `start`: the stream is this token's call, with exactly its parameters."""
        if call_sid != self.call_sid:
            raise TokenRejected("call", "the stream's CallSid is not the one its token was "
                                "issued for")
        if not hmac.compare_digest(self.digest.encode(), _digest(secret, parameters).encode()):
            raise TokenRejected("parameters", "the stream's parameters were changed, added "
                                "or dropped")


def _b64(digest: bytes, chars: int) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:chars]


def _digest(secret: bytes, parameters: Mapping[str, str]) -> str:
    signed = json.dumps(sorted(parameters.items()), ensure_ascii=True, separators=(",", ":"))
    mac = hmac.new(secret, b"parameters|" + signed.encode(), hashlib.sha256).digest()
    return _b64(mac, DIGEST_CHARS)


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, b"stream|" + body.encode(), hashlib.sha256).digest(), MAC_CHARS)


def issue(secret: bytes, call_sid: str, parameters: Mapping[str, str], now: float,
          ttl: float) -> str:
    """A token for `call_sid` (Twilio's form, see CALL_SID) with exactly these stream
    `parameters`, valid until now + ttl."""
    if not CALL_SID.fullmatch(call_sid):
        raise ValueError(f"not a CallSid: {call_sid[:40]!r}")
    body = f"{VERSION}.{call_sid}.{int(now + ttl):0{EXPIRY_DIGITS}d}.{_digest(secret, parameters)}"
    return f"{body}.{_mac(secret, body)}"


def verify(secret: bytes, token: str, now: float) -> StreamPass:
    """Check a token from a stream URL's path; TokenRejected saying why (never any other
    exception, whatever the input)."""
    if not token:
        raise TokenRejected("missing", "no stream token (the stream was not set up by this "
                            "service's webhook)")
    match = _FORM.fullmatch(token) if len(token) == LENGTH else None
    if match is None:
        raise TokenRejected("malformed", "malformed stream token")
    call_sid, expiry, digest, mac = match.groups()
    if not hmac.compare_digest(mac.encode(), _mac(secret, token[: -MAC_CHARS - 1]).encode()):
        raise TokenRejected("forged", "stream token is forged")
    if now > int(expiry):
        raise TokenRejected("expired", f"stream token expired {now - int(expiry):.0f}s ago")
    return StreamPass(call_sid, int(expiry), digest, mac)


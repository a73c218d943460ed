"""Per-call stream tokens, sans-I/O: the webhook proves to the media endpoint that it sent
this call there.

`issue` puts HMAC-SHA256(stream secret, "CallSid|expiry") in a `<Parameter name="token">`;
Twilio hands it back in `start.customParameters`; `verify` accepts it only for that CallSid and
before its expiry. Nothing is stored, so any worker or host with the same secret can verify.
Single use is enforced per process by `UsedTokens` (a stream reconnecting elsewhere within
the token's short life is not caught: keep stream_token_ttl short).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from voxd.errors import ProtocolError

VERSION = "v1"


class TokenRejected(ProtocolError):
    """The stream's token is missing, forged, for another call, expired or used."""


def _mac(secret: bytes, call_sid: str, expiry: int) -> str:
    digest = hmac.new(secret, f"{call_sid}|{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, call_sid: str, now: float, ttl: float) -> str:
    """A token for `call_sid`, valid until now + ttl."""
    expiry = int(now + ttl)
    return f"{VERSION}.{expiry}.{_mac(secret, call_sid, expiry)}"


def verify(secret: bytes, token: str | None, call_sid: str, now: float) -> int:
    """Check a token for `call_sid`; returns its expiry, or raises TokenRejected saying why."""
    if not token:
        raise TokenRejected("no stream token (the stream was not set up by this service's "
                            "webhook)")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        raise TokenRejected("malformed stream token")
    expiry = int(parts[1])
    if not hmac.compare_digest(parts[2], _mac(secret, call_sid, expiry)):
        raise TokenRejected("stream token is forged or belongs to another call")
    if now > expiry:
        raise TokenRejected(f"stream token expired {now - expiry:.0f}s ago")
    return expiry


class UsedTokens:
    """Tokens already used in this process, remembered until they expire (bounded by that)."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def claim(self, token: str, expiry: int, now: float) -> None:
        """Mark `token` used; TokenRejected if it was already."""
        if len(self._used) > 1000:
            self._used = {t: e for t, e in self._used.items() if e >= now}
        if token in self._used:
            raise TokenRejected("stream token was already used (a replayed stream)")
        self._used[token] = expiry

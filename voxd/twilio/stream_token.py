"""Per-call stream tokens, sans-I/O: the webhook proves to the media endpoint that it sent
this call there, with these parameters.

`issue` puts `v2.<expiry>.<mac>` in a `<Parameter name="token">`; Twilio hands it back in
`start.customParameters` with the call's other parameters. The MAC is HMAC-SHA256(stream
secret) over the CallSid, the expiry and every other custom parameter (names and values), so a
stream with a changed caller number, or any parameter added or dropped, is refused.

One canonical form: the expiry is exactly EXPIRY_DIGITS ASCII digits and the MAC exactly
MAC_CHARS URL-safe base64 characters, so no two spellings of one token exist. Anything else
(non-ASCII, control characters, any length) is refused as malformed before any other work.
Nothing is stored: any worker or host with the same secret verifies. Single use is enforced
by `UsedTokens`, keyed on the MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Final

from voxd.errors import ProtocolError

VERSION: Final = "v2"
EXPIRY_DIGITS: Final = 10
MAC_CHARS: Final = 43  # 32 bytes of SHA-256 in unpadded URL-safe base64
TOKEN_PARAMETER: Final = "token"
_FORM: Final = re.compile(rf"v2\.([0-9]{{{EXPIRY_DIGITS}}})\.([A-Za-z0-9_-]{{{MAC_CHARS}}})")
_LONGEST: Final = len(VERSION) + EXPIRY_DIGITS + MAC_CHARS + 2


class TokenRejected(ProtocolError):
    """The stream's token is missing, malformed, forged, for another call or other
    parameters, expired or used."""


def _mac(secret: bytes, call_sid: str, expiry: str, parameters: Mapping[str, str]) -> str:
    signed = json.dumps([call_sid, expiry, sorted(parameters.items())], ensure_ascii=True,
                        separators=(",", ":"))
    digest = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, call_sid: str, parameters: Mapping[str, str], now: float,
          ttl: float) -> str:
    """A token for `call_sid` with exactly these other stream `parameters`, valid until
    now + ttl."""
    expiry = f"{int(now + ttl):0{EXPIRY_DIGITS}d}"
    return f"{VERSION}.{expiry}.{_mac(secret, call_sid, expiry, parameters)}"


def verify(secret: bytes, call_sid: str, custom_parameters: Mapping[str, str],
           now: float) -> tuple[str, int]:
    """Check the token among a stream's `custom_parameters` for `call_sid` and the other
    parameters; returns (MAC, expiry), the MAC being the token's identity for single use.
    TokenRejected saying why otherwise (never any other exception, whatever the input)."""
    token = custom_parameters.get(TOKEN_PARAMETER)
    if not token:
        raise TokenRejected("no stream token (the stream was not set up by this service's "
                            "webhook)")
    match = _FORM.fullmatch(token) if isinstance(token, str) and len(token) <= _LONGEST \
        else None
    if match is None:
        raise TokenRejected("malformed stream token")
    expiry, mac = match.groups()
    parameters = {k: v for k, v in custom_parameters.items() if k != TOKEN_PARAMETER}
    if not hmac.compare_digest(mac.encode(), _mac(secret, call_sid, expiry, parameters).encode()):
        raise TokenRejected("stream token is forged, belongs to another call, or the stream's "
                            "parameters were changed")
    if now > int(expiry):
        raise TokenRejected(f"stream token expired {now - int(expiry):.0f}s ago")
    return mac, int(expiry)


class UsedTokens:
    """Tokens already used in this process (by MAC), remembered until they expire."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def claim(self, mac: str, expiry: int, now: float) -> None:
        """Mark the token with this MAC used; TokenRejected if it was already."""
        if len(self._used) > 1000:
            self._used = {t: e for t, e in self._used.items() if e >= now}
        if mac in self._used:
            raise TokenRejected("stream token was already used (a replayed stream)")
        self._used[mac] = expiry

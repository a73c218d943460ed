"""Per-call stream tokens: bound to the call, short-lived, single use, verifiable anywhere."""

from __future__ import annotations

import pytest

from voxd.twilio.stream_token import TokenRejected, UsedTokens, issue, verify

SECRET = b"stream-secret"


def test_a_token_verifies_for_its_call_until_it_expires():
    token = issue(SECRET, "CA1", now=1000.0, ttl=60)
    assert verify(SECRET, token, "CA1", now=1059.0) == 1060
    with pytest.raises(TokenRejected, match="expired"):
        verify(SECRET, token, "CA1", now=1061.0)


@pytest.mark.parametrize(("token", "call", "secret", "why"), [
    (None, "CA1", SECRET, "no stream token"),
    ("", "CA1", SECRET, "no stream token"),
    ("garbage", "CA1", SECRET, "malformed"),
    ("v2.1060.abc", "CA1", SECRET, "malformed"),
    (issue(SECRET, "CA1", 1000.0, 60), "CA2", SECRET, "another call"),
    (issue(b"other secret", "CA1", 1000.0, 60), "CA1", SECRET, "forged"),
    (issue(SECRET, "CA1", 1000.0, 60).replace(".1060.", ".9999."), "CA1", SECRET, "forged"),
])
def test_bad_tokens_are_refused_with_a_reason(token, call, secret, why):
    with pytest.raises(TokenRejected, match=why):
        verify(secret, token, call, now=1001.0)


def test_a_token_is_used_once():
    used = UsedTokens()
    token = issue(SECRET, "CA1", 1000.0, 60)
    used.claim(token, 1060, now=1001.0)
    with pytest.raises(TokenRejected, match="already used"):
        used.claim(token, 1060, now=1002.0)

"""Per-call stream tokens: bound to the call and its parameters, short-lived, single use,
one canonical form, and refused cleanly whatever the input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.twilio.stream_token import TokenRejected, UsedTokens, issue, verify

SECRET = b"stream-secret"
PARAMS = {"from": "+15550001111", "to": "+15550002222"}


def stream(token: object, **params: str) -> dict:
    return {**PARAMS, **params, "token": token}


def test_a_token_verifies_for_its_call_until_it_expires():
    token = issue(SECRET, "CA1", PARAMS, now=1000.0, ttl=60)
    mac, expiry = verify(SECRET, "CA1", stream(token), now=1059.0)
    assert expiry == 1060 and token.endswith(mac)
    with pytest.raises(TokenRejected, match="expired"):
        verify(SECRET, "CA1", stream(token), now=1061.0)


def test_the_token_has_one_canonical_form():
    token = issue(SECRET, "CA1", PARAMS, now=1000.0, ttl=60)
    version, expiry, mac = token.split(".")
    assert (version, expiry) == ("v2", "0000001060") and len(mac) == 43
    # The same expiry spelled otherwise is another token, and not a valid one.
    for spelling in ("00000001060", "1060", "\u0660" * 6 + "1060"):
        with pytest.raises(TokenRejected, match="malformed"):
            verify(SECRET, "CA1", stream(f"v2.{spelling}.{mac}"), now=1001.0)


@pytest.mark.parametrize(("token", "call", "params", "secret", "why"), [
    (None, "CA1", {}, SECRET, "no stream token"),
    ("", "CA1", {}, SECRET, "no stream token"),
    ("garbage", "CA1", {}, SECRET, "malformed"),
    ("v1.1060.abc", "CA1", {}, SECRET, "malformed"),
    ("v2.0000001060." + "é" * 43, "CA1", {}, SECRET, "malformed"),
    ("v2.0000001060." + "A" * 42 + "\n", "CA1", {}, SECRET, "malformed"),
    ("x" * 1_000_000, "CA1", {}, SECRET, "malformed"),
    (issue(SECRET, "CA1", PARAMS, 1000.0, 60), "CA2", {}, SECRET, "another call"),
    (issue(b"other secret", "CA1", PARAMS, 1000.0, 60), "CA1", {}, SECRET, "forged"),
    (issue(SECRET, "CA1", PARAMS, 1000.0, 60).replace(".0000001060.", ".0000009999."), "CA1",
     {}, SECRET, "forged"),
    (issue(SECRET, "CA1", PARAMS, 1000.0, 60), "CA1", {"from": "+15559999999"}, SECRET,
     "parameters were changed"),
    (issue(SECRET, "CA1", PARAMS, 1000.0, 60), "CA1", {"extra": "1"}, SECRET,
     "parameters were changed"),
])
def test_bad_tokens_are_refused_with_a_reason(token, call, params, secret, why):
    with pytest.raises(TokenRejected, match=why):
        verify(secret, call, stream(token, **params), now=1001.0)


def test_a_dropped_parameter_is_refused():
    token = issue(SECRET, "CA1", PARAMS, 1000.0, 60)
    with pytest.raises(TokenRejected, match="parameters were changed"):
        verify(SECRET, "CA1", {"from": PARAMS["from"], "token": token}, now=1001.0)


def test_a_token_is_used_once():
    used = UsedTokens()
    token = issue(SECRET, "CA1", PARAMS, 1000.0, 60)
    mac, expiry = verify(SECRET, "CA1", stream(token), now=1001.0)
    used.claim(mac, expiry, now=1001.0)
    with pytest.raises(TokenRejected, match="already used"):
        used.claim(mac, expiry, now=1002.0)


@given(token=st.text(max_size=200), call=st.text(max_size=40),
       params=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4))
def test_any_string_is_refused_cleanly(token, call, params):
    """Whatever arrives as a token (any characters, any length): TokenRejected, nothing
    else, and never accepted without the secret."""
    with pytest.raises(TokenRejected):
        verify(SECRET, call, {**params, "token": token}, now=1001.0)


@given(call=st.text(max_size=40),
       params=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "token"),
                              st.text(max_size=20), max_size=4))
def test_any_call_and_parameters_round_trip(call, params):
    token = issue(SECRET, call, params, 1000.0, 60)
    assert verify(SECRET, call, {**params, "token": token}, now=1001.0)[1] == 1060

"""Per-call stream tokens: verified from the stream URL alone, bound to the call and its
parameters, short-lived, single use, one canonical form, refused cleanly whatever the input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.shared_state import LocalTokens
from voxd.twilio.stream_token import TokenRejected, issue, verify

SECRET = b"stream-secret"
CALL = "CA" + "1" * 32
OTHER = "CA" + "2" * 32
PARAMS = {"from": "+15550001111", "to": "+15550002222"}


def test_a_token_verifies_until_it_expires_and_names_its_call():
    token = issue(SECRET, CALL, PARAMS, now=1000.0, ttl=60)
    stream_pass = verify(SECRET, token, now=1059.0)
    assert (stream_pass.call_sid, stream_pass.expiry) == (CALL, 1060)
    assert token.endswith(stream_pass.mac)
    stream_pass.check_stream(SECRET, CALL, PARAMS)
    with pytest.raises(TokenRejected, match="expired"):
        verify(SECRET, token, now=1061.0)


def test_the_token_has_one_canonical_form():
    token = issue(SECRET, CALL, PARAMS, now=1000.0, ttl=60)
    version, call, expiry, digest, mac = token.split(".")
    assert (version, call, expiry, len(digest), len(mac)) == ("v3", CALL, "0000001060", 22, 43)
    for spelling in ("00000001060", "1060", "\u0660" * 6 + "1060"):
        with pytest.raises(TokenRejected, match="malformed"):
            verify(SECRET, token.replace(".0000001060.", f".{spelling}."), now=1001.0)


@pytest.mark.parametrize(("token", "why"), [
    ("", "no stream token"),
    ("garbage", "malformed"),
    ("v2.0000001060." + "A" * 43, "malformed"),
    (issue(SECRET, CALL, PARAMS, 1000.0, 60).replace("CA1", "CA2", 1), "forged"),
    (issue(SECRET, CALL, PARAMS, 1000.0, 60).replace(".0000001060.", ".0000009999."),
     "forged"),
    (issue(b"other secret", CALL, PARAMS, 1000.0, 60), "forged"),
    (issue(SECRET, CALL, PARAMS, 1000.0, 60)[:-1] + "é", "malformed"),
    (issue(SECRET, CALL, PARAMS, 1000.0, 60) + "\n", "malformed"),
    ("x" * 1_000_000, "malformed"),
])
def test_bad_tokens_are_refused_with_a_reason(token, why):
    with pytest.raises(TokenRejected, match=why):
        verify(SECRET, token, now=1001.0)


@pytest.mark.parametrize(("call", "params", "why"), [
    (OTHER, PARAMS, "not the one its token was issued for"),
    (CALL, {**PARAMS, "from": "+15559999999"}, "parameters were changed"),
    (CALL, {**PARAMS, "extra": "1"}, "parameters were changed"),
    (CALL, {"from": PARAMS["from"]}, "parameters were changed"),
])
def test_the_stream_must_be_the_tokens_call_with_its_parameters(call, params, why):
    stream_pass = verify(SECRET, issue(SECRET, CALL, PARAMS, 1000.0, 60), now=1001.0)
    with pytest.raises(TokenRejected, match=why):
        stream_pass.check_stream(SECRET, call, params)


def test_a_token_is_used_once():
    used = LocalTokens()
    stream_pass = verify(SECRET, issue(SECRET, CALL, PARAMS, 1000.0, 60), now=1001.0)
    used.claim_now(stream_pass.mac, stream_pass.expiry, now=1001.0)
    with pytest.raises(TokenRejected, match="already used"):
        used.claim_now(stream_pass.mac, stream_pass.expiry, now=1002.0)


def test_only_a_callsid_gets_a_token():
    with pytest.raises(ValueError, match="not a CallSid"):
        issue(SECRET, "CA1\r\nX", PARAMS, 1000.0, 60)


@given(token=st.text(max_size=300))
def test_any_string_is_refused_cleanly(token):
    """Whatever arrives as a token (any characters, any length): TokenRejected, nothing else,
    and never accepted without the secret."""
    with pytest.raises(TokenRejected):
        verify(SECRET, token, now=1001.0)


@given(call=st.from_regex(r"CA[0-9a-f]{32}", fullmatch=True),
       params=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
       other=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4))
def test_any_call_and_parameters_round_trip_and_others_do_not(call, params, other):
    stream_pass = verify(SECRET, issue(SECRET, call, params, 1000.0, 60), now=1001.0)
    stream_pass.check_stream(SECRET, call, params)
    if other != params:
        with pytest.raises(TokenRejected):
            stream_pass.check_stream(SECRET, call, other)

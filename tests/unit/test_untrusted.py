"""What comes from outside, made safe: log values escaped and bounded, peers counted per
network, request framing refused when ambiguous, secrets out of the environment."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxd.config import Secret, Secrets, scrub_environment
from voxd.net.front import address_key
from voxd.net.request_head import HeadError, parse_head
from voxd.observability.untrusted import show


@pytest.mark.parametrize(("value", "shown"), [
    ("+15550001111", "+15550001111"),
    ("a\r\nINFO voxd forged line", "a\\x0d\\x0aINFO voxd forged line"),
    ("\x1b]0;pwned\x07\x1b[2J", "\\x1b]0;pwned\\x07\\x1b[2J"),
    ("back\\slash", "back\\\\slash"),
    ("\u2028\x85\x7f", "\\u2028\\x85\\x7f"),
    ("x" * 100, "x" * 80 + "...(100 chars)"),
])
def test_values_from_outside_are_escaped_and_cut(value, shown):
    assert show(value) == shown


@given(st.text(max_size=2000))
def test_a_shown_value_is_one_bounded_printable_line(value):
    text = show(value, 50)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert len(text) <= 50 * 6 + 20  # at most \uXXXX per character, and the cut note


@pytest.mark.parametrize(("host", "key"), [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb:cccc:dddd:eeee", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_ipv6_peers_count_per_network(host, key):
    assert address_key(host, 64) == key


def test_the_ipv6_prefix_is_configurable():
    assert address_key("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert address_key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1/128"


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n",
])
def test_ambiguous_or_bad_body_framing_is_refused(head):
    with pytest.raises(HeadError):
        parse_head(head)


def test_the_head_tells_upgrades_and_bodies():
    head = parse_head(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n")
    assert (head.upgrade, head.websocket) == ("h2c", False)
    head = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
    assert (head.content_length, head.chunked) == (12, False)
    assert parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").chunked


def test_secrets_leave_the_environment_and_a_reload_keeps_them():
    env = {"VAPI_API_KEY": "k", "VOXD_TWILIO_AUTH_TOKEN": "t", "HOME": "/root"}
    scrub_environment(env)
    assert env == {"HOME": "/root"}
    before = Secrets(twilio_auth_token=Secret("t"), vapi_api_key=Secret("k"),
                     stream_secret=Secret("s"), stream_secret_generated=True)
    after = Secrets(vapi_api_key=Secret("rotated")).filled_from(before)
    assert after.twilio_auth_token == Secret("t") and after.vapi_api_key == Secret("rotated")
    assert after.stream_secret == Secret("s")  # tokens already given out stay valid
    configured = Secrets(stream_secret=Secret("new"), stream_secret_generated=False)
    assert configured.filled_from(before).stream_secret == Secret("new")

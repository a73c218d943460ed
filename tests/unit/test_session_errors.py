"""Errors reach the call's end reason also when trio wraps them in exception groups."""

from __future__ import annotations

from voxd.call.session import _voxd_error
from voxd.errors import CallerDisconnected, ProtocolError, UpstreamError


def test_a_plain_error_is_itself():
    error = UpstreamError("x")
    assert _voxd_error(error) is error


def test_errors_inside_nested_groups_are_found():
    error = UpstreamError("dropped")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    assert _voxd_error(group) is error
    both = ExceptionGroup("g", [CallerDisconnected("a"), ProtocolError("b")])
    assert isinstance(_voxd_error(both), CallerDisconnected)


def test_a_group_with_anything_else_is_not_swallowed():
    mixed = ExceptionGroup("g", [UpstreamError("x"), ValueError("bug")])
    assert _voxd_error(mixed) is None
    assert _voxd_error(ValueError("bug")) is None

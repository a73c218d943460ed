"""The one exception family of voxd; each maps to one clear log line or CLI message."""

from __future__ import annotations


class VoxdError(Exception):
    """Base of every error voxd raises on purpose."""


class ConfigError(VoxdError):
    """The configuration is invalid; `problems` holds one "key: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ProtocolError(VoxdError):
    """A peer sent something its protocol does not allow; the message says what."""


class UpstreamError(VoxdError):
    """The assistant's service failed (refused, dropped, answered garbage)."""

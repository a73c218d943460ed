"""The one exception family of voxd; each maps to one clear log line or CLI message.

    VoxdError
    ├── ConfigError          the configuration is invalid (names the key)
    ├── PeerError            the other side of a connection did something: never voxd's bug
    │   ├── ProtocolError    it sent what its protocol forbids (net: MessageTooBig,
    │   │                    HandshakeError, HeadError; Twilio's media protocol; tokens)
    │   └── TransportError   its connection closed, reset or broke (net: ConnectionClosed)
    ├── CallerDisconnected   the Twilio side of a call is gone (mapped at the Twilio boundary)
    ├── UpstreamError        the assistant failed (mapped at the assistant boundary)
    └── LocalMisuse          voxd used one of its own objects out of order: a bug

Exceptions cross a boundary only after `ErrorMap` has turned them into this family, in one
place per boundary: the Twilio socket (`voxd.twilio.media_socket`) and the assistant's socket
(`voxd.providers.ws_upstream`) each have exactly one table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType


class VoxdError(Exception):
    """Base of every error voxd raises on purpose."""


class ConfigError(VoxdError):
    """The configuration is invalid; `problems` holds one "key: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class PeerError(VoxdError):
    """A peer (Twilio, an assistant, any client) broke its side of a connection."""


class ProtocolError(PeerError):
    """A peer sent something its protocol does not allow; the message says what."""


class TransportError(PeerError):
    """A connection closed, was reset, or broke under a read or write."""


class CallerDisconnected(VoxdError):
    """Twilio's side of a call is gone (its socket closed without a `stop` message)."""


class UpstreamError(VoxdError):
    """The assistant's service failed (refused, dropped, stalled, answered garbage)."""


class LocalMisuse(VoxdError):
    """voxd called one of its own objects out of order: a bug, never a peer's doing."""


Mapping = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...],
                         Callable[[BaseException], VoxdError]]]


class ErrorMap:
    """A boundary's one table from the exceptions that may cross it to voxd's family.

    `with boundary:` around a send or receive re-raises a listed exception as the error its row
    makes (first matching row wins); anything unlisted passes unchanged (a bug is not disguised
    as a peer's failure). A class, not a generator context manager: it sits on the per-frame
    path, where entering costs about 0.1 us.
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: Mapping) -> None:
        self._rows = tuple(rows)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None or not isinstance(exc, Exception):
            return  # nothing raised, or a cancellation/KeyboardInterrupt: never mapped
        for types, make in self._rows:
            if isinstance(exc, types):
                raise make(exc) from None


EXIT_INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""


def is_interrupt(exc: BaseException) -> bool:
    """A KeyboardInterrupt, alone or inside exception groups only of them (a Ctrl-C that came
    before the signal receiver was up, or a second one during the cancellation)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(KeyboardInterrupt)[1]
        return rest is None
    return False

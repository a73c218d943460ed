"""What the running daemon serves with: the calls in progress (kept across reloads) and the
`Runtime` of one configuration (replaced as a whole on reload).

A live call keeps the Runtime it started with (settings, provider). A Runtime replaced by a
reload is retired: its provider is closed once its last call and its last background task
have ended, so nothing it holds (an HTTP pool, an early-created assistant call) is dropped
while still in use, and nothing leaks after.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from twilio.request_validator import RequestValidator

from voxd.background import Background
from voxd.call.phone import PhoneLeg
from voxd.config import Settings
from voxd.outbound import RateLimit, calls_api, unavailable
from voxd.providers import build_provider
from voxd.providers.base import EarlyStarts, Provider
from voxd.shared_state import AfterStream, LocalAfterStream, LocalTokens, RedisState, TokenLedger
from voxd.twilio.rest import CallControl, Calls

if TYPE_CHECKING:
    from voxd.call.session import CallSession

log = logging.getLogger("voxd.runtime")

CLOSE_SECONDS = 5.0
"""Longest a retired provider may take to close."""


class LiveCalls:
    """What every Runtime shares across reloads: the calls in progress (capacity, readiness,
    draining), the stream tokens used, and the work providers started early for calls."""

    def __init__(self, on_change: Callable[[LiveCalls], None] | None = None,
                 used_tokens: TokenLedger | None = None,
                 shared: RedisState | None = None, after: AfterStream | None = None,
                 answered: AfterStream | None = None) -> None:
        self.sessions: set[CallSession] = set()
        self.draining = False
        self.last_ended = float("-inf")
        """When the last call ended (trio's clock)."""
        self.used_tokens: TokenLedger = used_tokens or LocalTokens()
        """Used stream tokens: this process's, this host's workers', or every host's."""
        self.shared = shared
        """The Redis several hosts share (`[state] redis_url`), if any."""
        self.early = EarlyStarts(remote=shared)
        self.after: AfterStream = after or LocalAfterStream()
        """What each call's `<Connect action>` request is answered (see `call.phone`)."""
        self.answered: AfterStream = answered or LocalAfterStream()
        """Outbound calls' answering-machine results not yet taken by their call."""
        self.dial_rate = RateLimit()
        """Outbound calls created by this process (`POST /calls`), across reloads."""
        self.on_change = on_change
        self._idle = trio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: CallSession) -> None:
        """Count a call in."""
        self.sessions.add(session)
        if self._idle.is_set():
            self._idle = trio.Event()
        if self.on_change is not None:
            self.on_change(self)

    def session(self, call_sid: str) -> CallSession | None:
        """The call in progress in this process with this CallSid, if any."""
        for session in self.sessions:
            if session.call is not None and session.call.call_sid == call_sid:
                return session
        return None

    def discard(self, session: CallSession) -> None:
        """Count a call out."""
        self.sessions.discard(session)
        self.last_ended = trio.current_time()
        if not self.sessions:
            self._idle.set()
        if self.on_change is not None:
            self.on_change(self)

    async def wait_idle(self) -> None:
        """Return once no call is in progress."""
        await self._idle.wait()


@dataclass(eq=False)
class Runtime:
    """One configuration's settings, provider and helpers; replaced as a whole on reload."""

    settings: Settings
    provider: Provider
    background: Background
    validator: RequestValidator | None = None
    phone: PhoneLeg | None = None
    outbound: Calls | None = None
    """Creates outbound calls (with the auth token and twilio.account_sid)."""
    live: LiveCalls = field(default_factory=LiveCalls)
    users: int = 0
    """Calls and background tasks using this runtime."""
    retired: bool = False
    closed: bool = False

    @property
    def calls(self) -> set[CallSession]:
        """The calls in progress (of every runtime)."""
        return self.live.sessions

    def call_started(self, session: CallSession) -> None:
        """Count a call in (for capacity, readiness and draining)."""
        self.users += 1
        self.live.add(session)

    def call_ended(self, session: CallSession) -> None:
        """Count a call out."""
        self.live.discard(session)
        self._release()

    def not_ready(self) -> str | None:
        """Why no new call is taken ("draining", "at capacity": /readyz 503), or None."""
        if self.live.draining:
            return "draining"
        if len(self.live) >= self.settings.config.call.max_concurrent_calls:
            return "at capacity"
        return None

    async def wait_idle(self) -> None:
        """Return once no call is in progress."""
        await self.live.wait_idle()

    def start(self, what: str, call_sid: str, fn: Callable[..., Awaitable[Any]],
              *args: Any) -> None:
        """Run provider work that outlives the request (see `voxd.background`); this runtime
        stays open until it ends."""
        self.users += 1
        try:
            self.background.start(what, call_sid, fn, *args, on_done=self._release)
        except BaseException:
            self.users -= 1
            raise

    def retire(self) -> None:
        """A reload replaced this runtime: close its provider once nothing uses it."""
        self.retired = True
        self._release(0)

    def _release(self, count: int = 1) -> None:
        self.users -= count
        if self.retired and self.users == 0 and not self.closed and self.background.accepting:
            self.closed = True
            self.background.start("closing the provider replaced by a reload", "",
                                  self.aclose)

    async def aclose(self) -> None:
        """Close the provider (within CLOSE_SECONDS, even while being cancelled)."""
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
            await self.provider.aclose()

    @classmethod
    def from_settings(cls, settings: Settings, live: LiveCalls, background: Background) -> Runtime:
        """Build the provider and signature validator the settings ask for."""
        token = settings.secrets.twilio_auth_token
        validate = settings.config.twilio.validate_signatures and token is not None
        rest = settings.config.twilio.rest_call_control and token is not None
        control = CallControl(settings) if token is not None else None
        return cls(
            settings=settings,
            provider=build_provider(settings, live.early),
            background=background,
            validator=RequestValidator(token.reveal()) if validate and token else None,
            phone=PhoneLeg(settings, control if rest else None, live.after, live.answered),
            outbound=calls_api(settings, control) if unavailable(settings) is None else None,
            live=live,
        )

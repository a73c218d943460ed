"""Twilio's REST API, the calls resource: hang up a live call, or replace its TwiML (the
fallback after a failure, a `<Dial>` for a transfer); create an outbound call and read how it
went.

Used whenever voxd has the Twilio auth token (and `twilio.rest_call_control` is not false).
The account named in each request is `twilio.account_sid`, or else the call's own (Twilio
gives it with every call), so the auth token voxd already has for signatures is enough.

The `twilio` package's client is synchronous, so every request runs in a worker thread and the
event loop never waits on the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from voxd.config import ACCOUNT_SID, Settings
from voxd.errors import VoxdError
from voxd.observability.untrusted import show
from voxd.twilio.stream_token import CALL_SID

log = logging.getLogger("voxd.twilio.rest")
T = TypeVar("T")

REQUEST_TIMEOUT = 3.0
MAX_ACCOUNTS = 8
"""Clients (each with its own connection pool) kept for the accounts calls came from."""


class CallControl:
    """Redirects or hangs up live calls."""

    def __init__(self, settings: Settings) -> None:
        token = settings.secrets.twilio_auth_token
        assert token is not None  # built only with the auth token (Runtime.from_settings)
        self._token = token.reveal()
        self._account = settings.config.twilio.account_sid
        self._base_url = settings.config.twilio.api_base_url.rstrip("/")
        self._clients: dict[str, Client] = {}

    def _client(self, account_sid: str) -> Client:
        client = self._clients.get(account_sid)
        if client is None:
            if len(self._clients) >= MAX_ACCOUNTS:
                self._clients.pop(next(iter(self._clients)))
            client = Client(account_sid, self._token,
                            http_client=TwilioHttpClient(timeout=REQUEST_TIMEOUT))
            client.api.base_url = self._base_url
            self._clients[account_sid] = client
        return client

    async def redirect(self, account_sid: str, call_sid: str, twiml: str, what: str) -> bool:
        """Replace the live call's TwiML (`what` names it in the log); True if Twilio
        accepted it."""
        return await self._update(account_sid, call_sid, what, twiml=twiml)

    async def hang_up(self, account_sid: str, call_sid: str) -> bool:
        """End the live call; True if Twilio accepted it."""
        return await self._update(account_sid, call_sid, "hang up", status="completed")

    async def _update(self, account_sid: str, call_sid: str, what: str, **fields: str) -> bool:
        account = self._account or account_sid
        if not ACCOUNT_SID.fullmatch(account):
            log.warning("Twilio REST: cannot %s: the call came with no account SID (set "
                        "twilio.account_sid)", what)
            return False
        if not CALL_SID.fullmatch(call_sid):  # it goes into the request's path
            log.warning("Twilio REST: cannot %s: the call's SID is not Twilio's form", what)
            return False
        client = self._client(account)

        def update() -> None:
            client.api.v2010.accounts(account).calls(call_sid).update(**fields)

        try:
            with trio.fail_after(REQUEST_TIMEOUT + 0.5):
                await trio.to_thread.run_sync(update, abandon_on_cancel=True)
        except Exception as exc:  # the boundary: whatever the client raises is a failed request
            log.warning("Twilio REST: could not %s: %s", what, _short(exc))
            return False
        log.info("Twilio REST: %s done", what)
        return True


class TwilioRefused(VoxdError):
    """A calls-resource request did not go through: Twilio refused it (its message, code and
    HTTP status), did not answer in time, or could not be reached (`status` None)."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None,
                 *, uncertain: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.uncertain = uncertain
        """The request may have been carried out (no answer came): a create may have
        placed the call."""

    @property
    def transient(self) -> bool:
        """Asking again later may work (Twilio unreachable, overloaded or failing)."""
        return self.status is None or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class CallState:
    """An outbound call as Twilio's calls resource reports it."""

    status: str
    answered_by: str
    duration: str


def _account(settings: Settings) -> str:
    account = settings.config.twilio.account_sid
    if not account:
        raise TwilioRefused("twilio.account_sid: required for outbound calls (the account that "
                            "places them)")
    return account


class Calls:
    """Creates outbound calls (and reads their state) for `twilio.account_sid`."""

    def __init__(self, settings: Settings, control: CallControl) -> None:
        self._account = _account(settings)
        self._client = control._client(self._account)

    async def create(self, **fields: object) -> str:
        """Create a call (`fields` as the twilio library's `calls.create` takes them); its
        CallSid, or TwilioRefused."""
        def create() -> str:
            return str(self._client.api.v2010.accounts(self._account).calls.create(**fields).sid)

        sid = await self._request(create, "create the call")
        if not CALL_SID.fullmatch(sid):
            raise TwilioRefused(f"Twilio answered a CallSid not of its form: {show(sid, 40)}")
        return sid

    async def state(self, call_sid: str) -> CallState:
        """How the call stands now; TwilioRefused if Twilio cannot say."""
        def fetch() -> CallState:
            call = self._client.api.v2010.accounts(self._account).calls(call_sid).fetch()
            return CallState(str(call.status or ""), str(call.answered_by or ""),
                             str(call.duration or ""))

        return await self._request(fetch, "read the call")

    async def _request(self, request: Callable[[], T], what: str) -> T:
        """Run the request in a worker thread, shielded (a client that leaves must not lose
        the answer of a create that Twilio carries out anyway) within its deadline."""
        try:
            with trio.CancelScope(shield=True), trio.fail_after(REQUEST_TIMEOUT + 0.5):
                answer = await trio.to_thread.run_sync(request, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise TwilioRefused(f"no answer from Twilio within {REQUEST_TIMEOUT + 0.5:g} s "
                                f"to {what}: it may have been done", uncertain=True) from None
        except TwilioRestException as exc:
            message = show(str(exc.msg or "").strip().splitlines()[0] if exc.msg else "", 300)
            raise TwilioRefused(f"Twilio refused to {what}: {message or 'no reason given'}"
                                + (f" (code {exc.code})" if exc.code else ""),
                                exc.code, exc.status) from None
        except Exception as exc:  # the boundary: the network, an odd answer
            raise TwilioRefused(f"could not {what}: {_short(exc)}") from None
        return answer


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return show(f"{type(exc).__name__}: {text[0] if text else ''}", 300)

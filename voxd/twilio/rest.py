"""Live-call control over Twilio's REST API: hang up a call, or replace its TwiML (the fallback
after a failure, a `<Dial>` for a transfer).

Used whenever voxd has the Twilio auth token (and `twilio.rest_call_control` is not false).
The account named in each request is `twilio.account_sid`, or else the call's own (Twilio
gives it with every call), so the auth token voxd already has for signatures is enough.

The `twilio` package's client is synchronous, so every request runs in a worker thread and the
event loop never waits on the network.
"""

from __future__ import annotations

import logging

import trio
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from voxd.config import ACCOUNT_SID, Settings
from voxd.observability.untrusted import show
from voxd.twilio.stream_token import CALL_SID

log = logging.getLogger("voxd.twilio.rest")

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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return show(f"{type(exc).__name__}: {text[0] if text else ''}", 300)

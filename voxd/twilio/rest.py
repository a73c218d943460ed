"""Live-call control over Twilio's REST API (optional: `twilio.rest_call_control`).

The `twilio` package's client is synchronous, so every request runs in a worker thread and the
event loop never waits on the network. Used at the end of a call: redirect the live call to the
fallback TwiML after an assistant failure, or hang up after the assistant ended normally (so
the fallback after `</Connect>` does not play after a goodbye).
"""

from __future__ import annotations

import logging

import trio
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from voxd.config import Settings

log = logging.getLogger("voxd.twilio.rest")

REQUEST_TIMEOUT = 3.0


class CallControl:
    """Redirects or hangs up live calls; built only when rest_call_control is configured."""

    def __init__(self, settings: Settings) -> None:
        token = settings.secrets.twilio_auth_token
        assert token is not None  # config.check_settings requires it for rest_call_control
        self._client = Client(settings.config.twilio.account_sid, token.reveal(),
                              http_client=TwilioHttpClient(timeout=REQUEST_TIMEOUT))
        self._client.api.base_url = settings.config.twilio.api_base_url.rstrip("/")

    async def redirect(self, call_sid: str, twiml: str) -> bool:
        """Replace the live call's TwiML; True if Twilio accepted it."""
        return await self._update(call_sid, "redirect to the fallback", twiml=twiml)

    async def hang_up(self, call_sid: str) -> bool:
        """End the live call; True if Twilio accepted it."""
        return await self._update(call_sid, "hang up", status="completed")

    async def _update(self, call_sid: str, what: str, **fields: str) -> bool:
        def update() -> None:
            self._client.calls(call_sid).update(**fields)

        try:
            with trio.fail_after(REQUEST_TIMEOUT + 0.5):
                await trio.to_thread.run_sync(update, abandon_on_cancel=True)
        except (TwilioException, OSError, trio.TooSlowError) as exc:
            log.warning("Twilio REST: could not %s: %s", what, _short(exc))
            return False
        log.info("Twilio REST: %s done", what)
        return True


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]

"""A simulated Twilio REST API: the one resource voxd uses, updating a live call, and it drives
the simulated calls it knows.

    rest = SimulatedRest(account_sid, auth_token)          # account_sid="" -> a random AC...
    await nursery.start(rest.serve)                        # -> rest.base_url, on 127.0.0.1:0
    sim = TwilioSimulator(webhook, auth_token=auth_token, rest=rest)
    report = await sim.call(audio)                         # its call is linked while it runs

voxd is pointed at it with `twilio.api_base_url = rest.base_url` (and `twilio.account_sid =
rest.account_sid`, or nothing: voxd then names the account each call came from, and a linked
simulator's calls come from `rest.account_sid`).

`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`, HTTP Basic auth with the account
SID and the auth token (else 401 with Twilio's JSON error body, code 20003), form fields:
- `Status=completed`: Twilio hangs up. A linked call's stream gets `stop` and is closed; nothing
  runs after it.
- `Twiml=<Response>...</Response>`: Twilio replaces the call's TwiML. A linked call's stream
  gets `stop` and is closed, and that TwiML is what runs next (`CallReport.next_twiml`).
- `Url=...`: recorded and accepted, nothing more (the simulator fetches no TwiML from it).
Every authenticated update is recorded in `updates` (`{"account", "call_sid", **form}`) and
sets `updated`. A CallSid no simulator has linked answers 404 (code 20404), unless the API was
made with `record_unknown_calls=True` (then the update is recorded and answered 200, as the
older test fake did); a linked call that is over answers 400 (code 21220, "not in-progress").
"""

from __future__ import annotations

import base64
import binascii
import secrets
import xml.etree.ElementTree as ET
from typing import Any, Protocol

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio

API_VERSION = "2010-04-01"
ERROR_DOCS = "https://www.twilio.com/docs/errors/"


class CallNotInProgress(Exception):
    """The linked call is over: Twilio refuses to update it."""


class ControlledCall(Protocol):
    """A live simulated call the API can drive (TwilioSimulator's linked call)."""

    async def rest_update(self, hang_up: bool, twiml: str | None) -> str:
        """Hang up (`hang_up`) or replace the TwiML (`twiml`); returns the call's status
        afterwards ("completed" or "in-progress"); raises CallNotInProgress."""
        ...


JsonAnswer = tuple[dict[str, Any], int, dict[str, str]]


def _error(status: int, code: int, message: str, **extra: str) -> JsonAnswer:
    """An error the way Twilio's API words them."""
    body: dict[str, Any] = {"code": code, "message": message,
                            "more_info": f"{ERROR_DOCS}{code}", "status": status, **extra}
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else {}
    return body, status, headers


class SimulatedRest:
    """Twilio's Calls update API on 127.0.0.1, for one account (see the module docstring).

    Link a simulator with `TwilioSimulator(..., rest=this)` (it calls `link`/`unlink` around
    its call); anything else implementing ControlledCall can be linked by CallSid too.
    `auth_token` may be changed while serving (each request is checked against the current
    one)."""

    def __init__(self, account_sid: str = "", auth_token: str = "", *,
                 record_unknown_calls: bool = False) -> None:
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token
        self.record_unknown_calls = record_unknown_calls
        self.updates: list[dict[str, Any]] = []
        """Every authenticated update, in order: {"account", "call_sid", **form}."""
        self.updated = trio.Event()
        """Set by the first update (and stays set)."""
        self.refused = 0
        """Requests refused for their credentials (401)."""
        self.base_url = ""
        self._calls: dict[str, ControlledCall] = {}
        self._over: set[str] = set()

    def link(self, call_sid: str, call: ControlledCall) -> None:
        """Updates to `call_sid` drive `call` from now on."""
        self._over.discard(call_sid)
        self._calls[call_sid] = call

    def unlink(self, call_sid: str) -> None:
        """The call is over: later updates to it are refused (21220)."""
        if self._calls.pop(call_sid, None) is not None:
            self._over.add(call_sid)

    def _authenticated(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic" or not self.auth_token:
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (secrets.compare_digest(user, self.account_sid)
                and secrets.compare_digest(password, self.auth_token))

    async def update_call(self, account: str, call_sid: str, auth: str | None,
                          form: dict[str, str]) -> JsonAnswer:
        """One `POST .../Calls/{call_sid}.json`: the JSON answer, its HTTP status, headers."""
        path = f"/{API_VERSION}/Accounts/{account}/Calls/{call_sid}.json"
        if not self._authenticated(auth):
            self.refused += 1
            return _error(401, 20003, "Authenticate",
                          detail="Your AccountSid or AuthToken was incorrect.")
        if account != self.account_sid:
            return _error(404, 20404, f"The requested resource {path} was not found")
        self.updates.append({"account": account, "call_sid": call_sid, **form})
        self.updated.set()
        status, twiml, url = form.get("Status"), form.get("Twiml"), form.get("Url")
        if twiml is not None and url is not None:
            return _error(400, 21220, "Twiml and Url are mutually exclusive")  # not documented
        if status is not None and status not in ("completed", "canceled"):
            return _error(400, 21218, f"Invalid Status: {status}")  # code not documented
        if twiml is not None:
            try:
                root = ET.fromstring(twiml)
            except ET.ParseError as exc:
                return _error(400, 12100, f"Document parse failure: {exc}")
            if root.tag != "Response":
                return _error(400, 12100, f"Document parse failure: <{root.tag}> is not "
                                          "<Response>")
        call = self._calls.get(call_sid)
        if call is None:
            if call_sid in self._over:
                return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
            if not self.record_unknown_calls:
                return _error(404, 20404, f"The requested resource {path} was not found")
            state = "completed" if status == "completed" else "in-progress"
        elif status == "completed" or twiml is not None:
            try:
                state = await call.rest_update(status == "completed", twiml)
            except CallNotInProgress:
                return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        else:
            state = "in-progress"  # Url= (not fetched), Status=canceled, other fields
        return {"sid": call_sid, "account_sid": account, "status": state,
                "direction": "inbound", "api_version": API_VERSION, "uri": path}, 200, {}

    def app(self) -> QuartTrio:
        app = QuartTrio("voxd-simulated-twilio-rest")

        @app.post(f"/{API_VERSION}/Accounts/<account>/Calls/<call_sid>.json")
        async def update(account: str, call_sid: str) -> JsonAnswer:
            form = {k: v for k, v in (await request.form).items()}
            return await self.update_call(account, call_sid,
                                          request.headers.get("Authorization"), form)

        @app.errorhandler(404)
        async def not_found(_: Exception) -> JsonAnswer:
            return _error(404, 20404, f"The requested resource {request.path} was not found")

        @app.errorhandler(405)
        async def not_allowed(_: Exception) -> JsonAnswer:
            return _error(405, 20004, "Method not allowed")

        return app

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED, *,
                    bind: str = "127.0.0.1:0") -> None:
        """Serve until cancelled; `task_status.started(base_url)` once listening."""
        config = HypercornConfig()
        config.bind = [bind]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, self.app(), config)
            self.base_url = binds[0]
            task_status.started(self.base_url)

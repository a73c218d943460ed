"""A simulated Twilio REST API: the Calls resource voxd uses (create, fetch, update), and it
drives the simulated calls it knows, inbound and outbound.

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

`POST /2010-04-01/Accounts/{AccountSid}/Calls.json` (same auth) places an outbound call and
answers 201 with the call resource (`status` "queued", `direction` "outbound-api"). Form
fields: `To`, `From` (required: 400 with code 21201 / 21603), `Url` (required unless `Twiml`;
400, code 21205) and `Method`; `StatusCallback`, `StatusCallbackMethod`, `StatusCallbackEvent`
(repeated: initiated, ringing, answered, completed; `completed` alone when none are given);
`MachineDetection` (Enable | DetectMessageEnd), `MachineDetectionTimeout`, `AsyncAmd`,
`AsyncAmdStatusCallback`, `AsyncAmdStatusCallbackMethod`; `Timeout` (ring seconds, 60 by
default, times `ring_timeout_scale`). Other fields are recorded and ignored. Every accepted
create is recorded in `created` (`{"account", "sid", **form}`, a given `StatusCallbackEvent`
as a list) and sets `placed`. The call is then placed in the background (a task of `serve`'s
nursery) to the callee `callees[To]`, else `default_callee` (a `voxd.sim.callee.Callee`:
human, voicemail, busy, no-answer or failed), as Twilio would: status callbacks, answering
machine detection, and once answered the voice webhook and the media stream of a linked
TwilioSimulator (so voxd's updates drive it). Its progress is `outbound[CallSid]` (an
`OutboundCall`: `status`, `answered_by`, `callbacks`, `report`, `errors`), and
`await rest.wait_over(CallSid)` waits for its end. Before it is answered, an update with
`Status=canceled` or `completed` cancels it, and `Twiml=` replaces what runs on answer.

`GET /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` answers an outbound call's
resource with its current `status` (queued, ringing, in-progress, completed, busy, no-answer,
failed, canceled), `answered_by` and, once over, `duration`; a linked inbound call is
"in-progress", and "completed" once over.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import request
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict

from voxd.sim.callee import (
    AMD_MODES,
    STATUS_EVENTS,
    Callee,
    OutboundCall,
    OutboundRequest,
    rfc2822,
)

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


class _Refused(Exception):
    """A create Twilio refuses: `answer` is the error it answers."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.answer = _error(status, code, message)


def _seconds(form: MultiDict[str, str], name: str, default: float) -> float:
    text = form.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) == 0:
        raise _Refused(400, 20001, f"{name} must be a positive integer, not {text!r}")
    return float(text)


def _method(form: MultiDict[str, str], name: str) -> str:
    method = (form.get(name) or "POST").upper()
    if method not in ("GET", "POST"):
        raise _Refused(400, 20001, f"{name} must be GET or POST, not {method!r}")
    return method


def _checked_twiml(twiml: str) -> str:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        raise _Refused(400, 12100, f"Document parse failure: {exc}") from None
    if root.tag != "Response":
        raise _Refused(400, 12100, f"Document parse failure: <{root.tag}> is not <Response>")
    return twiml


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _Refused(400, 20001, f"Invalid {name} {value!r}: expected one of "
                                   f"{', '.join(choices)}")
    return value


def outbound_request(form: MultiDict[str, str]) -> OutboundRequest | JsonAnswer:
    """A create's form checked as Twilio checks it: the request, or the error to answer."""
    try:
        return _outbound_request(form)
    except _Refused as refused:
        return refused.answer


def _outbound_request(form: MultiDict[str, str]) -> OutboundRequest:
    to, from_ = form.get("To", "").strip(), form.get("From", "").strip()
    url, twiml = form.get("Url", "").strip(), form.get("Twiml")
    if not to:
        raise _Refused(400, 21201, "No 'To' number is specified")
    if not from_:
        raise _Refused(400, 21603, "A 'From' phone number is required.")
    if twiml is None and not url:
        raise _Refused(400, 21205, "Url parameter is required.")
    parts = urlsplit(url)
    if url and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise _Refused(400, 21205, f"Url is not a valid URL: {url}")
    detection = form.get("MachineDetection", "").strip()
    return OutboundRequest(
        to=to, from_=from_, url=url, method=_method(form, "Method"),
        twiml=None if twiml is None else _checked_twiml(twiml),
        status_callback=form.get("StatusCallback", "").strip(),
        status_callback_method=_method(form, "StatusCallbackMethod"),
        status_events=tuple(_choice(event.strip().lower(), "StatusCallbackEvent",
                                    STATUS_EVENTS)
                            for event in form.getlist("StatusCallbackEvent")),
        machine_detection=detection and _choice(detection, "MachineDetection", AMD_MODES),
        async_amd=_choice(form.get("AsyncAmd", "false").strip().lower(), "AsyncAmd",
                          ("true", "false")) == "true",
        amd_callback=form.get("AsyncAmdStatusCallback", "").strip(),
        amd_callback_method=_method(form, "AsyncAmdStatusCallbackMethod"),
        amd_timeout=_seconds(form, "MachineDetectionTimeout", 30.0),
        timeout=_seconds(form, "Timeout", 60.0))


class SimulatedRest:
    """Twilio's Calls update API on 127.0.0.1, for one account (see the module docstring).

    Link a simulator with `TwilioSimulator(..., rest=this)` (it calls `link`/`unlink` around
    its call); anything else implementing ControlledCall can be linked by CallSid too.
    `auth_token` may be changed while serving (each request is checked against the current
    one)."""

    def __init__(self, account_sid: str = "", auth_token: str = "", *,
                 record_unknown_calls: bool = False,
                 callees: Mapping[str, Callee] | None = None,
                 default_callee: Callee | None = None, ring_timeout_scale: float = 1.0) -> None:
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token
        self.record_unknown_calls = record_unknown_calls
        self.callees = dict(callees or {})
        """Who answers an outbound call, by its `To` (else `default_callee`)."""
        self.default_callee = default_callee or Callee()
        """Who answers the other outbound calls (a human by default)."""
        self.ring_timeout_scale = ring_timeout_scale
        """A create's `Timeout` is multiplied by this (0.01: a 60 s ring gives up in 0.6 s)."""
        self.created: list[dict[str, Any]] = []
        """Every accepted create, in order: {"account", "sid", **form}."""
        self.placed = trio.Event()
        """Set by the first accepted create (and stays set)."""
        self.outbound: dict[str, OutboundCall] = {}
        """The outbound calls, by CallSid."""
        self._nursery: trio.Nursery | None = None
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

    async def wait_over(self, call_sid: str) -> OutboundCall:
        """The outbound call `call_sid` once it is over (KeyError if no create made it)."""
        call = self.outbound[call_sid]
        await call.over.wait()
        return call

    def _refused(self, account: str, auth: str | None, path: str) -> JsonAnswer | None:
        """The error to answer a request with bad credentials or for another account."""
        if not self._authenticated(auth):
            self.refused += 1
            return _error(401, 20003, "Authenticate",
                          detail="Your AccountSid or AuthToken was incorrect.")
        if account != self.account_sid:
            return _error(404, 20404, f"The requested resource {path} was not found")
        return None

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
        refused = self._refused(account, auth, path)
        if refused is not None:
            return refused
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
        outbound = self.outbound.get(call_sid)
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
        elif status == "canceled" and outbound is not None and outbound.status in ("queued",
                                                                                   "ringing"):
            state = await outbound.rest_update(True, None)
        else:
            state = "in-progress"  # Url= (not fetched), Status=canceled, other fields
        if outbound is not None:
            return {**self._resource(outbound), "status": state}, 200, {}
        return {"sid": call_sid, "account_sid": account, "status": state,
                "direction": "inbound", "api_version": API_VERSION, "uri": path}, 200, {}

    def create_call(self, account: str, auth: str | None,
                    form: MultiDict[str, str]) -> JsonAnswer:
        """One `POST .../Calls.json`: places the call in the background (in `serve`'s
        nursery); the JSON answer, its HTTP status, headers."""
        refused = self._refused(account, auth, f"/{API_VERSION}/Accounts/{account}/Calls.json")
        if refused is not None:
            return refused
        checked = outbound_request(form)
        if not isinstance(checked, OutboundRequest):
            return checked
        assert self._nursery is not None, "create_call is served by SimulatedRest.serve"
        sid = "CA" + secrets.token_hex(16)
        call = OutboundCall(sid, account, checked, self.callees.get(checked.to,
                                                                    self.default_callee), self)
        fields: dict[str, Any] = form.to_dict()
        if "StatusCallbackEvent" in form:
            fields["StatusCallbackEvent"] = form.getlist("StatusCallbackEvent")
        self.created.append({"account": account, "sid": sid, **fields})
        self.outbound[sid] = call
        self.link(sid, call)
        self._nursery.start_soon(call.run)
        self.placed.set()
        return self._resource(call), 201, {}

    def fetch_call(self, account: str, call_sid: str, auth: str | None) -> JsonAnswer:
        """One `GET .../Calls/{call_sid}.json`: the call resource as it is now."""
        path = f"/{API_VERSION}/Accounts/{account}/Calls/{call_sid}.json"
        refused = self._refused(account, auth, path)
        if refused is not None:
            return refused
        outbound = self.outbound.get(call_sid)
        if outbound is not None:
            return self._resource(outbound), 200, {}
        if call_sid in self._calls or call_sid in self._over:
            status = "in-progress" if call_sid in self._calls else "completed"
            return {"sid": call_sid, "account_sid": account, "status": status,
                    "direction": "inbound", "answered_by": None, "api_version": API_VERSION,
                    "uri": path}, 200, {}
        return _error(404, 20404, f"The requested resource {path} was not found")

    def _resource(self, call: OutboundCall) -> dict[str, Any]:
        """An outbound call as Twilio's API shows it."""
        path = f"/{API_VERSION}/Accounts/{call.account_sid}/Calls/{call.sid}.json"
        start, end = call.wall(call.answered_at), call.wall(call.ended_at)
        duration = call.duration
        return {
            "sid": call.sid, "account_sid": call.account_sid, "parent_call_sid": None,
            "date_created": rfc2822(call.created_wall),
            "date_updated": rfc2822(call.wall(call.statuses[-1][0]) or call.created_wall),
            "to": call.request.to, "to_formatted": call.request.to,
            "from": call.request.from_, "from_formatted": call.request.from_,
            "phone_number_sid": None, "status": call.status,
            "start_time": None if start is None else rfc2822(start),
            "end_time": None if end is None else rfc2822(end),
            "duration": None if duration is None else str(duration),
            "price": None, "price_unit": "USD", "direction": "outbound-api",
            "answered_by": call.answered_by, "api_version": API_VERSION,
            "forwarded_from": None, "group_sid": None, "caller_name": None, "queue_time": "0",
            "trunk_sid": None, "uri": path,
            "subresource_uris": {name: path.replace(".json", f"/{name}.json")
                                 for name in ("notifications", "recordings", "events")},
        }

    def app(self) -> QuartTrio:
        app = QuartTrio("voxd-simulated-twilio-rest")

        @app.post(f"/{API_VERSION}/Accounts/<account>/Calls/<call_sid>.json")
        async def update(account: str, call_sid: str) -> JsonAnswer:
            form = {k: v for k, v in (await request.form).items()}
            return await self.update_call(account, call_sid,
                                          request.headers.get("Authorization"), form)

        @app.get(f"/{API_VERSION}/Accounts/<account>/Calls/<call_sid>.json")
        async def fetch(account: str, call_sid: str) -> JsonAnswer:
            return self.fetch_call(account, call_sid, request.headers.get("Authorization"))

        @app.post(f"/{API_VERSION}/Accounts/<account>/Calls.json")
        async def create(account: str) -> JsonAnswer:
            return self.create_call(account, request.headers.get("Authorization"),
                                    await request.form)

        @app.errorhandler(404)
        async def not_found(_: Exception) -> JsonAnswer:
            return _error(404, 20404, f"The requested resource {request.path} was not found")

        @app.errorhandler(405)
        async def not_allowed(_: Exception) -> JsonAnswer:
            return _error(405, 20004, "Method not allowed")

        return app

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED, *,
                    bind: str = "127.0.0.1:0") -> None:
        """Serve until cancelled; `task_status.started(base_url)` once listening. The
        outbound calls it places run until they end or it is cancelled."""
        config = HypercornConfig()
        config.bind = [bind]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # outbound calls run here (OutboundCall.run never raises)
            binds = await nursery.start(hypercorn.trio.serve, self.app(), config)
            self.base_url = binds[0]
            task_status.started(self.base_url)

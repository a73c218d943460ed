"""Calls voxd places: `voxd dial` and `POST /calls`.

Both check the request against `[outbound]` (`dial_request`), then create the call with
Twilio's REST API (`place`): Twilio rings `to` from `from`, and when someone answers it asks
voxd's own voice webhook, exactly as for an inbound call. The request's parameters ride in the
webhook URL's query string (Twilio signs the URL with its query, so they arrive as sent, on
whichever worker or host takes the webhook) and reach the assistant like an inbound call's.

With `outbound.machine_detection`, Twilio's asynchronous answering-machine detection runs
alongside: the assistant starts talking at once, and Twilio posts its verdict to
`/twilio/amd` (see `voxd.call.session` for what the call does with it). Every status Twilio
reports (ringing, answered, busy, no-answer, failed, completed) comes to `/twilio/status`.
`Enable` answers fastest (enough to hang up on a machine); `DetectMessageEnd` waits for the
greeting's end, the moment to leave a message or let the assistant speak after the beep.

Twilio is reached only through `voxd.twilio.rest.Calls`.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import re
import sys
from dataclasses import dataclass
from urllib.parse import urlencode

import trio

from voxd.config import E164, NAME, OutboundConfig, Settings, load_settings, resolve_config_path
from voxd.errors import VoxdError
from voxd.observability.untrusted import show
from voxd.twilio.rest import CallControl, Calls, CallState, TwilioRefused
from voxd.twilio.twiml import NOT_XML

log = logging.getLogger("voxd.outbound")

STATUS_PATH = "/twilio/status"
AMD_PATH = "/twilio/amd"
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
STATUSES = FINAL_STATUSES | {"queued", "initiated", "ringing", "in-progress"}
"""Twilio's CallStatus values."""
RESERVED = frozenset({"from", "to", "direction"})
"""Parameter names voxd sets itself."""
MAX_PARAMETERS = 16
MAX_VALUE_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WAIT_POLL_SECONDS = 1.0
WAIT_PATIENCE_SECONDS = 30.0
"""How long `voxd dial --wait` keeps asking a Twilio that does not answer."""
AMD_KEEP_SECONDS = 120.0
"""How long a machine-detection result waits for its call to take it."""


class DialRefused(VoxdError):
    """The request cannot be placed as asked; `field` names what is wrong ("to", "from",
    "parameters", or a config key)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.problem = message


@dataclass(frozen=True)
class DialRequest:
    """A checked outbound call."""

    to: str
    from_number: str
    parameters: dict[str, str]


def dial_request(outbound: OutboundConfig, to: object, from_number: object = None,
                 parameters: object = None) -> DialRequest:
    """The call as asked, checked against `[outbound]`; DialRefused naming the problem."""
    if not isinstance(to, str) or not E164.fullmatch(to):
        raise DialRefused("to", f"must be an E.164 number such as +14155550100 (got "
                                f"{show(to, 40) if isinstance(to, str) else type(to).__name__})")
    if not outbound.allowed_to:
        raise DialRefused("outbound.allowed_to", "is empty: no destination may be called "
                                                 "(list patterns such as \"+1415555*\")")
    if not any(fnmatch.fnmatchcase(to, pattern) for pattern in outbound.allowed_to):
        raise DialRefused("to", f"{to} matches no outbound.allowed_to pattern")
    if from_number is None or from_number == "":
        from_number = outbound.from_number
        if not from_number:
            raise DialRefused("from", "not given and outbound.from_number is not set")
    if not isinstance(from_number, str) or not E164.fullmatch(from_number):
        raise DialRefused("from", "must be an E.164 number such as +14155550100")
    return DialRequest(to, from_number, _parameters(parameters))


def _parameters(parameters: object) -> dict[str, str]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise DialRefused("parameters", "must be an object of names to strings")
    if len(parameters) > MAX_PARAMETERS:
        raise DialRefused("parameters", f"at most {MAX_PARAMETERS} (got {len(parameters)})")
    for name, value in parameters.items():
        problem = parameter_problem(name, value)
        if problem is not None:
            raise DialRefused("parameters", problem)
    return dict(parameters)


def parameter_problem(name: object, value: object) -> str | None:
    """What is wrong with one parameter for the assistant (None: nothing). The same rules
    hold for the API, the CLI and a webhook URL's query string."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return f"name {show(str(name), 70)} must be 1-64 letters, digits, _ or -"
    if name in RESERVED:
        return f"{name!r} is set by voxd"
    if (not isinstance(value, str) or len(value) > MAX_VALUE_CHARS or _CONTROL.search(value)
            or NOT_XML.search(value)):
        return (f"{name}: the value must be a string of at most {MAX_VALUE_CHARS} printable "
                "characters")
    return None


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`--param key=value` arguments as a dict; DialRefused for one without `=`."""
    parameters: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise DialRefused("--param", f"expected KEY=VALUE, got {show(pair, 70)}")
        parameters[name] = value
    return parameters


def machine_detection_mode(outbound: OutboundConfig) -> str | None:
    """Twilio's MachineDetection value for this config (None: off). Hanging up needs only
    the first verdict; a message (or an assistant speaking after the beep) needs the
    greeting's end."""
    if not outbound.machine_detection:
        return None
    return "Enable" if outbound.on_machine == "hangup" else "DetectMessageEnd"


def create_fields(settings: Settings, request: DialRequest) -> dict[str, object]:
    """What `calls.create` is given for `request`."""
    origin = settings.public_origin
    url = settings.webhook_url
    if request.parameters:
        url += "?" + urlencode(request.parameters)
    outbound = settings.config.outbound
    fields: dict[str, object] = {
        "to": request.to, "from_": request.from_number, "url": url, "method": "POST",
        "status_callback": origin + STATUS_PATH, "status_callback_method": "POST",
        "status_callback_event": list(STATUS_EVENTS), "timeout": outbound.ring_timeout,
    }
    mode = machine_detection_mode(outbound)
    if mode is not None:
        fields.update(machine_detection=mode, async_amd="true",
                      async_amd_status_callback=origin + AMD_PATH,
                      async_amd_status_callback_method="POST")
    return fields


def unavailable(settings: Settings) -> DialRefused | None:
    """Why these settings cannot place calls (None: they can)."""
    if settings.secrets.twilio_auth_token is None:
        return DialRefused("twilio auth token", "outbound calls need it (set "
                                                "VOXD_TWILIO_AUTH_TOKEN or the systemd "
                                                "credential twilio_auth_token)")
    if not settings.config.twilio.account_sid:
        return DialRefused("twilio.account_sid", "required for outbound calls (the account "
                                                 "that places them)")
    return None


def calls_api(settings: Settings, control: CallControl | None = None) -> Calls:
    """The REST client outbound calls are created with; DialRefused naming what is missing."""
    problem = unavailable(settings)
    if problem is not None:
        raise problem
    return Calls(settings, control or CallControl(settings))


async def place(calls: Calls, settings: Settings, request: DialRequest) -> str:
    """Create the call; its CallSid (TwilioRefused if Twilio did not take it)."""
    sid = await calls.create(**create_fields(settings, request))
    log.info("call_sid=%s outbound call created: to=%s from=%s machine_detection=%s", sid,
             request.to, request.from_number,
             machine_detection_mode(settings.config.outbound) or "off")
    return sid


class RateLimit:
    """Spaces outbound calls out: at most `rate` creations per second in this process. A
    request waits for its turn, or is refused when that turn is more than `max_wait` away
    (so the queue is bounded by the wait)."""

    def __init__(self) -> None:
        self._next = float("-inf")

    def reserve(self, rate: float, max_wait: float) -> float | None:
        """Take the next turn: the seconds to wait for it, or None (refused) if it is beyond
        `max_wait`."""
        now = trio.current_time()
        turn = max(now, self._next)
        if turn - now > max_wait:
            return None
        self._next = turn + 1.0 / rate
        return turn - now

    def give_back(self, rate: float) -> None:
        """A request gave up its turn before using it (its client left): when it was the
        last one taken, the next request may have it."""
        self._next = max(trio.current_time(), self._next - 1.0 / rate)

    def retry_after(self) -> float:
        """Seconds until a turn is free again."""
        return max(0.0, self._next - trio.current_time())


def dial_command(args: argparse.Namespace) -> int:
    """`voxd dial`: create the call, print its CallSid; with --wait, follow it to its end.
    Exit 0 (placed; with --wait: answered and completed), 1 (Twilio refused, or the call
    ended otherwise), 2 (refused here: the message names the field or key)."""
    settings = load_settings(resolve_config_path(args.config))
    try:
        request = dial_request(settings.config.outbound, args.to, args.from_number,
                               parse_params(args.param))
        calls = calls_api(settings)
    except DialRefused as exc:
        print(f"voxd: dial refused: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        sid = await place(calls, settings, request)
        print(sid, flush=True)
        if not args.wait:
            return 0
        status = ""
        while status not in FINAL_STATUSES:
            state = await _state(calls, sid)
            if state.status != status:
                status = state.status
                print(f"{sid} {show(status, 30)}", file=sys.stderr, flush=True)
            await trio.sleep(0 if status in FINAL_STATUSES else WAIT_POLL_SECONDS)
        answered = f", answered by {show(state.answered_by, 30)}" if state.answered_by else ""
        took = f", {show(state.duration, 10)} s" if state.duration else ""
        print(f"{sid} {show(status, 30)}{answered}{took}", flush=True)
        return 0 if status == "completed" else 1

    return trio.run(run)


async def _state(calls: Calls, sid: str) -> CallState:
    """The call's state, asking again while Twilio is unavailable (up to
    WAIT_PATIENCE_SECONDS); TwilioRefused after that or for a refusal."""
    deadline = trio.current_time() + WAIT_PATIENCE_SECONDS
    while True:
        try:
            return await calls.state(sid)
        except TwilioRefused as exc:
            if not exc.transient or trio.current_time() > deadline:
                raise TwilioRefused(f"lost track of {sid} (it may still be in progress): "
                                    f"{exc}") from None
            await trio.sleep(WAIT_POLL_SECONDS)

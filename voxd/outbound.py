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

Nothing here opens a file or a socket except through `voxd.twilio.rest.Calls`.
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
from voxd.twilio.rest import CallControl, Calls, TwilioRefused

log = logging.getLogger("voxd.outbound")

STATUS_PATH = "/twilio/status"
AMD_PATH = "/twilio/amd"
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
STATUSES = FINAL_STATUSES | {"queued", "initiated", "ringing", "in-progress"}
"""Twilio's CallStatus values."""
ANSWERED_BY = frozenset({"human", "machine_start", "machine_end_beep", "machine_end_silence",
                         "machine_end_other", "fax", "unknown"})
"""Twilio's AnsweredBy values."""
MACHINE = frozenset({"machine_start", "machine_end_beep", "machine_end_silence",
                     "machine_end_other", "fax"})
RESERVED = frozenset({"from", "to", "direction"})
"""Parameter names voxd sets itself."""
MAX_PARAMETERS = 16
MAX_VALUE_CHARS = 256
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")
WAIT_POLL_SECONDS = 1.0
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
    checked: dict[str, str] = {}
    for name, value in parameters.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise DialRefused("parameters", f"name {show(str(name), 70)} must be 1-64 letters, "
                                            "digits, _ or -")
        if name in RESERVED:
            raise DialRefused("parameters", f"{name!r} is set by voxd")
        if (not isinstance(value, str) or len(value) > MAX_VALUE_CHARS
                or not _PRINTABLE.fullmatch(value)):
            raise DialRefused("parameters", f"{name}: the value must be a string of at most "
                                            f"{MAX_VALUE_CHARS} printable characters")
        checked[name] = value
    return checked


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


def calls_api(settings: Settings, control: CallControl | None) -> Calls:
    """The REST client outbound calls are created with; DialRefused naming what is missing."""
    if settings.secrets.twilio_auth_token is None:
        raise DialRefused("twilio auth token", "outbound calls need it (set "
                                               "VOXD_TWILIO_AUTH_TOKEN or the systemd "
                                               "credential twilio_auth_token)")
    if not settings.config.twilio.account_sid:
        raise DialRefused("twilio.account_sid", "required for outbound calls (the account "
                                                "that places them)")
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

    def retry_after(self) -> float:
        """Seconds until a turn is free again."""
        return max(0.0, self._next - trio.current_time())


def dial_command(args: argparse.Namespace) -> int:
    """`voxd dial`: create the call, print its CallSid; with --wait, follow it to its end."""
    settings = load_settings(resolve_config_path(args.config))
    try:
        request = dial_request(settings.config.outbound, args.to, args.from_number,
                               parse_params(args.param))
        calls = calls_api(settings, None)
    except DialRefused as exc:
        print(f"voxd: dial refused: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        sid = await place(calls, settings, request)
        print(sid, flush=True)
        if not args.wait:
            return 0
        status = ""
        while True:
            state = await calls.state(sid)
            if state.status != status:
                status = state.status
                print(f"{sid} {status}", file=sys.stderr, flush=True)
            if status in FINAL_STATUSES:
                break
            await trio.sleep(WAIT_POLL_SECONDS)
        answered = f", answered by {state.answered_by}" if state.answered_by else ""
        took = f", {state.duration} s" if state.duration else ""
        print(f"{sid} {status}{answered}{took}", flush=True)
        return 0 if status == "completed" else 1

    try:
        return trio.run(run)
    except TwilioRefused as exc:
        print(f"voxd: {exc}", file=sys.stderr)
        return 1

"""The phone leg of a call: what Twilio does with the caller once the stream is over (hang up,
apologise, or dial a person), and where an assistant may send the caller.

Two ways to tell Twilio, chosen per deployment (`PhoneLeg.rest`):
- REST (voxd has the auth token; `twilio.rest_call_control` not false): voxd updates the live
  call itself: `Status=completed`, or new TwiML. The webhook's TwiML keeps the fallback after
  `</Connect>`, so a stream that ends with no word from voxd (a crash) still apologises.
- action: the webhook's `<Connect>` carries `action=/twilio/stream-ended`; before closing the
  stream voxd leaves the TwiML to answer there (`AfterStream`, shared by every worker and, with
  Redis, every host), and the action request answers it (the fallback if there is none).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from voxd.call.ending import Caller, EndPolicy
from voxd.config import E164, Settings, TransferConfig
from voxd.errors import VoxdError
from voxd.providers.base import CallInfo
from voxd.shared_state import AfterStream
from voxd.twilio import twiml
from voxd.twilio.rest import CallControl

log = logging.getLogger("voxd.call")

STREAM_ENDED_PATH = "/twilio/stream-ended"
DIAL_ENDED_PATH = "/twilio/dial-ended"
AFTER_STREAM_SECONDS = 120.0
"""How long the TwiML for a call's action request is kept (Twilio asks within a second)."""
MAX_ANNOUNCE_CHARS = 500


class Destination(NamedTuple):
    """An allowed transfer destination: its [transfer.to] name and address."""

    name: str
    address: str


class TransferRefusal(VoxdError):
    """The assistant asked for a destination it may not use; the message says why."""


def destination(config: TransferConfig, requested: str) -> Destination:
    """The [transfer.to] entry the assistant asked for: by name, "" for transfer.default, or
    the address itself (a platform that dialled a configured number on its own). Anything
    else is a TransferRefusal: an assistant never dials a number it made up."""
    wanted = requested.strip()
    if not wanted:
        if not config.default:
            raise TransferRefusal("no destination named and no transfer.default configured")
        wanted = config.default
    if wanted in config.to:
        return Destination(wanted, config.to[wanted])
    for name, address in config.to.items():
        if wanted == address or (E164.fullmatch(address) and _digits(wanted) == address):
            return Destination(name, address)
    raise TransferRefusal("not a destination in [transfer.to]")


def _digits(number: str) -> str:
    """A phone number as +digits (spaces, dashes, dots and brackets dropped)."""
    kept = "".join(c for c in number if c.isdigit())
    return "+" + kept if number.lstrip().startswith("+") else kept


class PhoneLeg:
    """Moves a live call on (REST) or leaves word for Twilio's action request."""

    def __init__(self, settings: Settings, control: CallControl | None,
                 after: AfterStream, answered: AfterStream | None = None) -> None:
        self.settings = settings
        self.control = control
        self.after = after
        self.answered = answered
        """Answering-machine verdicts waiting for their (outbound) call."""
        self.dial_action = settings.public_origin + DIAL_ENDED_PATH
        self.stream_action = settings.public_origin + STREAM_ENDED_PATH

    @property
    def rest(self) -> bool:
        """voxd moves calls with REST requests (else through the stream's action)."""
        return self.control is not None

    def machine_message(self) -> str:
        """What an answering machine is left: outbound.machine_message, then hang up."""
        return twiml.then_hang_up(self.settings.config.outbound.machine_message)

    def dial_twiml(self, to: Destination, announce: str) -> str:
        """The TwiML of a cold transfer to `to`."""
        transfer = self.settings.config.transfer
        return twiml.dial(to.address, announce=(announce or transfer.announce)[:MAX_ANNOUNCE_CHARS],
                          caller_id=transfer.caller_id, timeout=transfer.timeout,
                          action=self.dial_action)

    async def finish(self, call: CallInfo, row: EndPolicy, dial: str | None) -> bool:
        """What the caller gets after the stream, as the end's policy row says (before the
        stream closes); True if it was handed over (Twilio took the REST request, or the
        action request has it waiting)."""
        fallback = self.settings.config.call.fallback_twiml
        if self.control is not None:
            if not row.rest:
                return False
            account, sid = call.account_sid, call.call_sid
            if row.caller is Caller.HANG_UP:
                return await self.control.hang_up(account, sid)
            if row.caller is Caller.DIAL and dial is not None:
                return await self.control.redirect(account, sid, dial, "transfer the call")
            if row.caller is Caller.FALLBACK:
                return await self.control.redirect(account, sid, twiml.verbs_only(fallback),
                                                   "redirect to the fallback")
            if row.caller is Caller.MESSAGE:
                return await self.control.redirect(account, sid, self.machine_message(),
                                                   "leave the message on the machine")
            return False
        if row.caller is Caller.HANG_UP:
            answer = twiml.hang_up()
        elif row.caller is Caller.DIAL and dial is not None:
            answer = dial
        elif row.caller is Caller.MESSAGE:
            answer = self.machine_message()
        else:
            return False  # the action request answers the fallback when nothing was left
        return await self.after.put(call.call_sid, answer, AFTER_STREAM_SECONDS)

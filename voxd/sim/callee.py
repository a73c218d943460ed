"""The far end of an outbound call, and the call Twilio places to it.

`voxd.sim.rest.SimulatedRest` answers `POST .../Calls.json` and then runs an `OutboundCall`
against a `Callee`, as Twilio would:

    queued --(initiated)--> ringing --(answered)--> in-progress --> completed
                                    \\--> busy | no-answer | failed | canceled

A `Callee` (frozen; `kind` says who picks up):
- "human": answers after `ring_seconds`, says "hello?" (the start of voxd's bundled speech
  sample), then is silent and hangs up `seconds` after answering. AMD answers `human`.
- "voicemail": answers after `ring_seconds`, plays a greeting (speech, `greeting_seconds`),
  a beep (`beep_hz`, `beep_seconds`), then records silence until `seconds`. AMD answers
  `machine_start` after `amd_seconds` (MachineDetection=Enable), or `machine_end_beep` as the
  beep ends (DetectMessageEnd).
- "busy": rings for `ring_seconds`, then the call ends `busy`.
- "failed": ends `failed` after `ring_seconds`, without ringing (Twilio could not place it).
- "no-answer": rings until the create's `Timeout` (times `SimulatedRest.ring_timeout_scale`,
  so tests need not wait a minute), then the call ends `no-answer`. A human or a machine whose
  `ring_seconds` reach that timeout goes unanswered too.
`audio` replaces the callee's sound (int16, 8 kHz, from the moment it answers), `answered_by`
forces AMD's answer (e.g. "fax" or "unknown"), `dtmf` are key presses [(key, seconds since
the stream started)]. A detection later than `MachineDetectionTimeout` answers `unknown`.

Once answered, the call's leg is a `voxd.sim.caller.TwilioSimulator` with the call's SID and
`Direction=outbound-api`, linked to the REST API (voxd's updates hang it up or redirect it):
it requests the create's `Url` (or runs its `Twiml`), streams the callee's sound and does
everything Twilio does after the stream. Answering machine detection runs beside it:
- asynchronous (`AsyncAmd=true`): the callee's sound starts with the stream; the detection is
  made that long after the stream started and POSTed to `AsyncAmdStatusCallback`;
- synchronous: Twilio waits for the detection before requesting the `Url` (with `AnsweredBy`
  and `MachineDetectionDuration`), and the stream carries the callee's sound from then on
  (after a `machine_end_beep`: the silence the machine records).

Status callbacks go to `StatusCallback` for the events asked for (`completed` alone when none
were), in order, each numbered by `SequenceNumber`. Every request Twilio makes about the call
besides the answered leg's is kept in `OutboundCall.callbacks`, with its HTTP status; a failed
one is noted in `errors`, never raised. Relative callback URLs resolve against the `Url`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from importlib import resources
from typing import TYPE_CHECKING, Literal, get_args
from urllib.parse import urljoin

import numpy as np
import trio
from twilio.request_validator import RequestValidator

from voxd.sim.caller import (
    API_VERSION,
    CALLBACK_TIMEOUT,
    FRAME_SECONDS,
    RATE,
    CallReport,
    SimulatorError,
    TwilioSimulator,
    read_wav,
    twilio_request,
)

if TYPE_CHECKING:
    from voxd.sim.rest import SimulatedRest

CalleeKind = Literal["human", "voicemail", "busy", "no-answer", "failed"]
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
"""The call progress events a create may ask for (`StatusCallbackEvent`)."""
AMD_MODES = ("Enable", "DetectMessageEnd")
FINAL_STATUSES = ("completed", "busy", "no-answer", "failed", "canceled")
HELLO_SECONDS = 0.9
"""The bundled sample's first word: a human's "hello?"."""


@functools.cache
def _speech() -> np.ndarray:
    """voxd's bundled speech sample, int16 8 kHz."""
    with resources.as_file(resources.files("voxd") / "data" / "hello.wav") as path:
        return read_wav(path)


def beep(seconds: float, hz: float = 1000.0) -> np.ndarray:
    """An answering machine's beep: a pure tone at half scale, int16 8 kHz."""
    t = np.arange(round(seconds * RATE)) / RATE
    return np.round(16384 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@dataclass(frozen=True)
class Callee:
    """Who (or what) an outbound call reaches; see the module docstring."""

    kind: CalleeKind = "human"
    ring_seconds: float = 0.2
    seconds: float = 3.0
    """How long after answering the callee hangs up."""
    amd_seconds: float = 1.0
    greeting_seconds: float = 2.0
    beep_seconds: float = 0.4
    beep_hz: float = 1000.0
    answered_by: str | None = None
    audio: np.ndarray | None = field(default=None, compare=False, repr=False)
    dtmf: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in get_args(CalleeKind):
            raise ValueError(f"not a kind of callee: {self.kind!r}")
        for name in ("ring_seconds", "seconds", "amd_seconds", "greeting_seconds",
                     "beep_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Callee.{name} must be 0 or more seconds, not {value!r}")

    @property
    def answers(self) -> bool:
        """Picks up (a person or a machine) if the ring does not time out first."""
        return self.kind in ("human", "voicemail")

    def sound(self) -> np.ndarray:
        """What the callee sends from the moment it answers (the simulator pads it with
        silence until `seconds`), int16 8 kHz."""
        if self.audio is not None:
            return self.audio.astype(np.int16)
        if self.kind == "human":
            return _speech()[:round(HELLO_SECONDS * RATE)]
        greeting = np.resize(_speech(), round(self.greeting_seconds * RATE))
        return np.concatenate([greeting, beep(self.beep_seconds, self.beep_hz)])

    def detection(self, mode: str, timeout: float) -> tuple[str, float]:
        """Answering machine detection's verdict on this callee under `mode` (Enable or
        DetectMessageEnd) and how many seconds of its sound it takes; `unknown` at
        `timeout` when it would take longer."""
        if self.kind == "voicemail" and mode == "DetectMessageEnd":
            verdict, at = "machine_end_beep", self.greeting_seconds + self.beep_seconds
        else:
            verdict = "human" if self.kind == "human" else "machine_start"
            at = self.amd_seconds
        if at > timeout:
            return "unknown", timeout
        return self.answered_by or verdict, at


@dataclass(frozen=True)
class OutboundRequest:
    """What a `POST .../Calls.json` asked for, checked (see SimulatedRest)."""

    to: str
    from_: str
    url: str = ""
    method: str = "POST"
    twiml: str | None = None
    status_callback: str = ""
    status_callback_method: str = "POST"
    status_events: tuple[str, ...] = ()
    machine_detection: str = ""
    async_amd: bool = False
    amd_callback: str = ""
    amd_callback_method: str = "POST"
    amd_timeout: float = 30.0
    timeout: float = 60.0


@dataclass(frozen=True)
class Callback:
    """One request Twilio made about the call besides the answered leg's own."""

    kind: Literal["status", "amd"]
    url: str
    method: str
    form: dict[str, str]
    http_status: int | None
    """None when no answer came (refused, timed out)."""
    at: float
    """When it was sent, in seconds since the call was created."""


def _describe(exc: BaseException) -> str:
    """An exception in one line; a group by its members."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(member) for member in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def rfc2822(when: datetime) -> str:
    """A time as Twilio writes it (`Tue, 31 Aug 2010 20:36:28 +0000`)."""
    return format_datetime(when)


class OutboundCall:
    """One call Twilio places: its status as the REST API shows it, and what happened.
    Times are seconds since the call was created (`now()`)."""

    def __init__(self, sid: str, account_sid: str, request: OutboundRequest, callee: Callee,
                 rest: SimulatedRest) -> None:
        self.sid = sid
        self.account_sid = account_sid
        self.request = request
        self.callee = callee
        self.status = "queued"
        """queued, ringing, in-progress, then one of FINAL_STATUSES."""
        self.statuses: list[tuple[float, str]] = [(0.0, "queued")]
        """Every status the call had, with when it took it."""
        self.answered_by: str | None = None
        self.report: CallReport | None = None
        """The answered leg's report (None until it is over, and for unanswered calls)."""
        self.callbacks: list[Callback] = []
        self.errors: list[str] = []
        self.answered_at: float | None = None
        self.stream_started_at: float | None = None
        self.ended_at: float | None = None
        self.over = trio.Event()
        """Set once the call is over and every callback about it has been answered."""
        self.created_wall = datetime.now(UTC)
        self._t0 = trio.current_time()
        self._rest = rest
        self._twiml = request.twiml
        self._hang_up = trio.Event()
        self._sequence = 0
        self._status_send, self._status_receive = trio.open_memory_channel[dict[str, str]](
            math.inf)

    def now(self) -> float:
        return trio.current_time() - self._t0

    def wall(self, at: float | None) -> datetime | None:
        """The wall-clock time of `at` (seconds since created)."""
        return None if at is None else self.created_wall + timedelta(seconds=at)

    @property
    def duration(self) -> int | None:
        """Whole seconds from answer to hang-up, once over (0 if never answered)."""
        if self.ended_at is None:
            return None
        if self.answered_at is None:
            return 0
        return round(self.ended_at - self.answered_at)

    # -- the REST API's side ------------------------------------------------------------------

    async def rest_update(self, hang_up: bool, twiml: str | None) -> str:
        """A REST update before the answered leg runs (SimulatedRest's ControlledCall): hang up
        (an unanswered call is canceled) or replace the TwiML to run on answer."""
        from voxd.sim.rest import CallNotInProgress

        if self._hang_up.is_set() or self.status in FINAL_STATUSES:
            raise CallNotInProgress
        if hang_up:
            self._hang_up.set()
            return "completed" if self.answered_at is not None else "canceled"
        self._twiml = twiml
        return self.status

    # -- the call -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Place the call and see it through (run in SimulatedRest.serve's nursery). Never
        raises: what goes wrong is noted in `errors`."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_status_callbacks)
            try:
                final = await self._place()
            except Exception as exc:  # the boundary: a broken simulation ends only its call
                self.errors.append(f"the simulated call broke: {_describe(exc)}")
                final = "completed" if self.answered_at is not None else "failed"
            self._rest.unlink(self.sid)
            self.ended_at = self.now()
            self._set_status(final)
            self._status_event("completed")
            self._status_send.close()
        self.over.set()

    def _set_status(self, status: str) -> None:
        self.status = status
        self.statuses.append((self.now(), status))

    async def _place(self) -> str:
        """Ring the callee; run the answered leg if it answers. Returns the final status."""
        callee = self.callee
        self._status_event("initiated")
        ring_timeout = self.request.timeout * self._rest.ring_timeout_scale
        if callee.kind != "failed":
            self._set_status("ringing")
            self._status_event("ringing")
        ring = ring_timeout if callee.kind == "no-answer" else min(callee.ring_seconds,
                                                                   ring_timeout)
        with trio.move_on_after(ring):
            await self._hang_up.wait()
            return "canceled"
        if callee.kind in ("busy", "failed"):
            return callee.kind
        if not callee.answers or callee.ring_seconds >= ring_timeout:
            return "no-answer"
        self.answered_at = self.now()
        self._set_status("in-progress")
        self._status_event("answered")
        await self._answered()
        return "completed"

    async def _answered(self) -> None:
        """The answered leg: detection first if synchronous, then the TwilioSimulator."""
        request, callee = self.request, self.callee
        audio, seconds = callee.sound(), callee.seconds
        detection = (callee.detection(request.machine_detection, request.amd_timeout)
                     if request.machine_detection else None)
        webhook_form: dict[str, str] = {}
        if detection is not None and not request.async_amd:
            verdict, at = detection
            with trio.move_on_after(at):
                await self._hang_up.wait()
                return
            self.answered_by = verdict
            webhook_form = {"AnsweredBy": verdict,
                            "MachineDetectionDuration": str(round(at * 1000))}
            audio, seconds = audio[round(at * RATE):], max(seconds - at, FRAME_SECONDS)
            detection = None
        if self._hang_up.is_set():
            return
        token = self._rest.auth_token
        leg = TwilioSimulator(request.url, auth_token=token or None, from_number=request.from_,
                              to_number=request.to, account_sid=self.account_sid,
                              rest=self._rest, call_sid=self.sid, direction="outbound-api",
                              webhook_method=request.method, webhook_form=webhook_form,
                              twiml=self._twiml)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._beside_the_stream, leg, detection)
            try:
                self.report = await leg.call(audio, seconds, dtmf=callee.dtmf)
            except SimulatorError as exc:  # Twilio: an application error, then it hangs up
                self.errors.append(str(exc))
            nursery.cancel_scope.cancel()
        self._note_amd_in_report()

    async def _beside_the_stream(self, leg: TwilioSimulator,
                                 detection: tuple[str, float] | None) -> None:
        """Note when the stream starts; an asynchronous detection is made that long after it
        (the callee's sound starts with the stream)."""
        await leg.stream_started.wait()
        started = trio.current_time()
        self.stream_started_at = self.now()
        if detection is None:
            return
        verdict, at = detection
        await trio.sleep_until(started + at)
        self.answered_by = verdict
        if self.request.amd_callback:
            form = {"AccountSid": self.account_sid, "CallSid": self.sid, "AnsweredBy": verdict,
                    "MachineDetectionDuration": str(round(at * 1000))}
            with trio.move_on_after(CALLBACK_TIMEOUT + 1) as sending:
                sending.shield = True  # once sent, its answer is awaited even if the call ends
                await self._callback("amd", self.request.amd_callback,
                                     self.request.amd_callback_method, form)

    def _note_amd_in_report(self) -> None:
        """The AMD callback in the leg's timeline (seconds since the stream started)."""
        if self.report is None or self.stream_started_at is None:
            return
        for callback in self.callbacks:
            if callback.kind == "amd":
                self.report.events.append((callback.at - self.stream_started_at,
                                           f"AMD callback: AnsweredBy="
                                           f"{callback.form['AnsweredBy']} -> HTTP "
                                           f"{callback.http_status}"))
        self.report.events.sort(key=lambda event: event[0])

    # -- callbacks ----------------------------------------------------------------------------

    def _status_event(self, event: str) -> None:
        """Queue the status callback for `event` if the create asked for it."""
        request = self.request
        wanted = request.status_events or ("completed",)
        if not request.status_callback or event not in wanted:
            return
        form = {"AccountSid": self.account_sid, "ApiVersion": API_VERSION, "CallSid": self.sid,
                "CallStatus": {"initiated": "initiated", "ringing": "ringing",
                               "answered": "in-progress"}.get(event, self.status),
                "Direction": "outbound-api", "From": request.from_, "To": request.to,
                "Caller": request.from_, "Called": request.to,
                "SequenceNumber": str(self._sequence),
                "Timestamp": rfc2822(datetime.now(UTC)),
                "CallbackSource": "call-progress-events"}
        if event == "completed":
            form["CallDuration"] = str(self.duration or 0)
            if self.answered_by is not None:
                form["AnsweredBy"] = self.answered_by
        self._sequence += 1
        self._status_send.send_nowait(form)

    async def _send_status_callbacks(self) -> None:
        """Send the queued status callbacks one after another, in order."""
        async with self._status_receive:
            async for form in self._status_receive:
                await self._callback("status", self.request.status_callback,
                                     self.request.status_callback_method, form)

    async def _callback(self, kind: Literal["status", "amd"], url: str, method: str,
                        form: dict[str, str]) -> None:
        """Request a callback URL as Twilio does (signed); its answer is recorded, a failure
        noted in `errors`."""
        url = urljoin(self.request.url, url)
        token = self._rest.auth_token
        validator = RequestValidator(token) if token else None
        at = self.now()
        status: int | None = None
        try:
            response = await twilio_request(url, method, form, validator)
            status = response.status_code
        except Exception as exc:  # the application's URL: whatever fails is its answer
            self.errors.append(f"{kind} callback {method} {url} failed: {exc!r}")
        else:
            if not 200 <= status < 300:
                self.errors.append(f"{kind} callback {method} {url} answered HTTP {status} "
                                   "(Twilio: warning 15003)")
        self.callbacks.append(Callback(kind, url, method, form, status, at))

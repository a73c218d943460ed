"""`voxd call`: a caller and Twilio in one, for testing voxd with no phone and no account.

It does what Twilio does for an inbound call with `<Connect><Stream>`: POSTs the voice webhook
with Twilio's form fields (signed when given the auth token), reads the TwiML, opens the Stream
URL (with the upgrade signed the way Twilio signs it), sends `connected` and `start` with the
TwiML's `<Parameter>`s, then streams the caller's audio as 20 ms mu-law frames paced in real
time. Assistant audio is played the way Twilio plays it: queued, one 20 ms frame per tick; a
`mark` is echoed once the audio before it has played, a `clear` empties the queue and echoes
every pending mark at once. What the caller "heard" is recorded next to what it said.

In-call control, as Twilio does it:
- keypad in: `dtmf=[("1", 2.0), ...]` sends a `dtmf` event at each press time;
- keypad out: tones in what the caller heard (after clears) are decoded (`tones_heard`);
- when the stream ends, `<Connect action>` is requested (signed like the webhook), and what
  Twilio runs next is recorded (`next_twiml`): the action's answer, the TwiML a REST update
  gave, or the verbs after `</Connect>`; a `<Dial>` there is a transfer (`transferred_to`),
  and its `action` is requested too once the dialled leg ends (`dial_status`);
- REST: linked to a `voxd.sim.rest.SimulatedRest` (`rest=`), the call obeys voxd's REST
  updates: a hang-up or a new TwiML sends `stop` and closes the stream.

Outbound calls (`voxd.sim.callee`) use the same simulator for the answered leg: the call's own
`call_sid`, `direction="outbound-api"` (the webhook then says `CallStatus=in-progress`), the
webhook's `Method`, extra webhook fields (a synchronous AMD's `AnsweredBy`), or the create's
`Twiml` in place of a webhook; `stream_started` tells when the callee's audio begins.

This module is the call's I/O (HTTP, the WebSocket, real-time pacing). The pure parts live by
job next to it: `twiml` (reading Twilio's instructions), `messages` (what Twilio sends),
`playout` (how Twilio plays the assistant's audio and echoes marks), `report` (what the call
saw, rendered), `speech` and `audio_files` (the caller's audio), `explain` (errors in words).
"""

from __future__ import annotations

import binascii
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from voxd.audio.dtmf import KEYS, DtmfDecoder
from voxd.audio.g711 import ULAW_SILENCE, pcm16_to_ulaw
from voxd.audio.line import FRAME_BYTES, FRAME_SECONDS, SAMPLE_RATE
from voxd.observability.untrusted import show
from voxd.sim import messages
from voxd.sim.audio_files import read_audio
from voxd.sim.explain import (
    SimulatorError,
    body_excerpt,
    connection_problem,
    elsewhere_hint,
    status_problem,
)
from voxd.sim.playout import Playout, line_echo
from voxd.sim.report import CallReport, Turn, read_voxd_mark, speech_segments
from voxd.sim.speech import to_frames
from voxd.sim.twiml import (
    StreamInstruction,
    dial_element,
    dial_target,
    find_dial,
    looks_like_xml,
    parse_twiml,
    twiml_verbs,
    verb_xml,
)

if TYPE_CHECKING:
    from voxd.sim.rest import SimulatedRest

RATE = SAMPLE_RATE
API_VERSION = "2010-04-01"
CALLBACK_TIMEOUT = 10.0
"""Seconds Twilio-the-simulator waits for the webhook and the action URLs."""
STREAM_CONNECT_TIMEOUT = 10.0
"""Seconds the simulator waits for the media stream's WebSocket to open."""
REST_STOP_WAIT = 2.0
"""Longest a REST update waits for the stream it ends to be stopped and closed."""


read_wav = read_audio
"""The caller's audio from a file, mono int16 8 kHz (voxd.sim.audio_files.read_audio)."""

__all__ = [  # what moved to the modules by job, still importable from here
    "FRAME_BYTES", "FRAME_SECONDS", "CallReport", "SimulatorError", "StreamInstruction",
    "Turn", "find_dial", "parse_twiml", "speech_segments", "to_frames", "twiml_verbs",
]


def parse_dtmf(text: str, call_seconds: float | None = None) -> list[tuple[str, float]]:
    """Key presses written `KEY@SECONDSs`, comma-separated (`"1@2.0s,#@3.5s"`; the `s` is
    optional): [(key, seconds since the stream started)], in time order. Keys 0-9 * # A-D
    (a-d too). ValueError naming the first bad item (or the first press after
    `call_seconds`)."""
    presses = []
    for item in text.split(","):
        shown = repr(item.strip() if len(item.strip()) <= 40 else item.strip()[:40] + "...")
        key, at, when = item.strip().partition("@")
        if not at:
            raise ValueError(f"{shown}: expected KEY@SECONDS, e.g. 1@2.0s")
        key = key.strip().upper()
        if len(key) != 1 or key not in KEYS:
            raise ValueError(f"{shown}: not a keypad key (0-9, *, #, A-D)")
        when = when.strip()
        when = when[:-1] if when.endswith("s") else when
        try:
            seconds = float(when)
        except ValueError:
            raise ValueError(f"{shown}: not a time in seconds") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{shown}: the time must be 0 or more seconds")
        if call_seconds is not None and seconds > call_seconds:
            raise ValueError(f"{shown}: after the call's end ({call_seconds:.1f}s)")
        presses.append((key, seconds))
    return sorted(presses, key=lambda press: press[1])


# -- the call ---------------------------------------------------------------------------------


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def signature_headers(validator: RequestValidator | None, url: str,
                      params: Mapping[str, str]) -> dict[str, str]:
    """Twilio's `X-Twilio-Signature` of `url` and the POST `params` (none without a
    validator: the request goes unsigned)."""
    if validator is None:
        return {}
    return {"X-Twilio-Signature": validator.compute_signature(url, dict(params))}


async def twilio_request(url: str, method: str, form: Mapping[str, str],
                         validator: RequestValidator | None) -> httpx.Response:
    """Request one of the application's URLs as Twilio does: POST the form, or GET with the
    form merged into the query string; signed over the full URL (its query string included)
    when given a validator. Raises httpx's errors."""
    async with httpx.AsyncClient(timeout=CALLBACK_TIMEOUT) as client:
        if method.upper() == "GET":
            full = httpx.URL(url).copy_merge_params(dict(form))
            return await client.get(full, headers=signature_headers(validator, str(full), {}))
        return await client.post(url, data=dict(form),
                                 headers=signature_headers(validator, url, form))


def _checked_presses(dtmf: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    presses = []
    for key, seconds in dtmf:
        if len(key) != 1 or key.upper() not in KEYS:
            raise ValueError(f"not a keypad key: {key!r} (0-9, *, #, A-D)")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"key press {key}@{seconds}s: the time must be 0 or more seconds")
        presses.append((key.upper(), float(seconds)))
    return sorted(presses, key=lambda press: press[1])


class _CallState:
    """One simulated call's progress, shared by its stream, the steps after the stream and
    the REST API (which may act on the call at any moment)."""

    def __init__(self, report: CallReport) -> None:
        self.report = report
        self.phase = "connecting"
        """connecting -> streaming -> after (the stream is over) -> over"""
        self.t0: float | None = None
        self.hung_up = False
        """The call is over for Twilio: the caller hung up, or a REST update did."""
        self.rest_end: tuple[bool, str] | None = None
        """The latest REST update that ended the stream: (hang up?, TwiML)."""
        self.rest_requested = trio.Event()
        self.stream_over = trio.Event()
        self.hang_up_early = False
        """The caller hangs up at the next frame (Ctrl-C on `voxd call`)."""

    def now(self) -> float:
        return 0.0 if self.t0 is None else trio.current_time() - self.t0

    def note(self, what: str) -> None:
        self.report.events.append((self.now(), what))


class TwilioSimulator:
    """Places one simulated call against a voxd webhook.

    REST: given `rest=` (a serving `voxd.sim.rest.SimulatedRest`; or set `.rest` before
    `call`), the call is linked to it by its CallSid while `call` runs, so voxd's REST updates
    drive it: a hang-up or new TwiML sends `stop` and closes the stream. The call's account SID
    (`account_sid=`, sent as `AccountSid` and `start.accountSid`) then defaults to the REST
    API's, the account voxd must authenticate as; without either it is random.
    `dial_status` is the DialCallStatus reported to a `<Dial action>` after a transfer.

    For an outbound call's answered leg (see the module docstring): `call_sid` (else a random
    CA...), `direction` (Twilio's `Direction` field), `webhook_method` (POST or GET),
    `webhook_form` (fields added to the webhook's form) and `twiml` (run instead of requesting
    the webhook; relative URLs in it then resolve against `webhook_url`, which may be "")."""

    def __init__(self, webhook_url: str, *, auth_token: str | None = None,
                 from_number: str = "+15005550006", to_number: str = "+15005550001",
                 line_echo: tuple[float, float] | None = None, account_sid: str | None = None,
                 rest: SimulatedRest | None = None, dial_status: str = "completed",
                 call_sid: str | None = None, direction: str = "inbound",
                 webhook_method: str = "POST", webhook_form: Mapping[str, str] | None = None,
                 twiml: str | None = None) -> None:
        self.webhook_url = webhook_url
        self.direction = direction
        self.webhook_method = webhook_method.upper()
        self.webhook_form = dict(webhook_form or {})
        self.twiml = twiml
        if line_echo is not None and not (math.isfinite(line_echo[0]) and line_echo[0] >= 0
                                           and math.isfinite(line_echo[1])
                                           and line_echo[1] >= 0):
            raise ValueError(f"line_echo {line_echo}: the attenuation must be >= 0 dB and the "
                             "delay >= 0 ms")
        self.line_echo = line_echo
        """(attenuation dB, delay ms): mix what the caller hears back into what it sends, as
        a phone line's echo does."""
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.from_number = from_number
        self.to_number = to_number
        self.rest = rest
        self.dial_status = dial_status
        self.call_sid = call_sid or _sid("CA")
        self.account_sid = account_sid or (rest.account_sid if rest is not None else _sid("AC"))
        self.stream_sid = _sid("MZ")
        self.stream_started = trio.Event()
        """Set once the call's media stream has started (the caller's audio begins then)."""
        self.on_stream_started: Callable[[], None] | None = None
        """Called once the media stream has started (`voxd call` says so)."""
        self._state: _CallState | None = None

    @property
    def report_so_far(self) -> CallReport | None:
        """The report of the call `call` is placing (or placed), as far as it got: what an
        interrupted call recorded. None before `call` started."""
        return None if self._state is None else self._state.report

    def _form(self, status: str) -> dict[str, str]:
        """The fields Twilio puts in every request about the call."""
        return {"AccountSid": self.account_sid, "ApiVersion": API_VERSION,
                "CallSid": self.call_sid, "CallStatus": status, "Direction": self.direction,
                "From": self.from_number, "To": self.to_number}

    async def request_stream(self) -> StreamInstruction:
        """Request the voice webhook like Twilio (or read the given `twiml`) and return the
        stream it asks for."""
        if self.twiml is not None:
            return parse_twiml(self.twiml)
        status = "ringing" if self.direction == "inbound" else "in-progress"
        form = {**self._form(status), "Caller": self.from_number, "Called": self.to_number,
                **self.webhook_form}
        try:
            response = await twilio_request(self.webhook_url, self.webhook_method, form,
                                            self.validator)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise SimulatorError(f"not a usable webhook URL {show(self.webhook_url, 120)}: "
                                 f"{exc or type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise SimulatorError(
                f"cannot reach the webhook {show(self.webhook_url, 120)}: "
                f"{connection_problem(exc, self.webhook_url, CALLBACK_TIMEOUT)}") from None
        if response.status_code != 200:
            raise SimulatorError(status_problem("webhook", self.webhook_url,
                                                response.status_code, response.reason_phrase,
                                                response.text))
        if not looks_like_xml(response.text):
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            raise SimulatorError(
                f"webhook answered {show(kind, 40) or 'a body'} that is not TwiML (Twilio: "
                f"error 12100): {body_excerpt(response.text) or '(empty)'}")
        return parse_twiml(response.text)

    async def call(self, caller_audio: np.ndarray, seconds: float | None = None,
                   on_event: object = None, *,
                   dtmf: Sequence[tuple[str, float]] = ()) -> CallReport:
        """Place the call: stream `caller_audio` (int16 8 kHz) then silence until `seconds`,
        pressing the keys `dtmf` [(key, seconds since the stream started)] on the way; then do
        what Twilio does after the stream (see the module docstring). ValueError for a bad
        key press or one after the call's end."""
        presses = _checked_presses(dtmf)
        frames = to_frames(pcm16_to_ulaw(caller_audio.astype("<i2").tobytes()))
        total = len(frames) if seconds is None else max(1, round(seconds / FRAME_SECONDS))
        frames = (frames + [bytes([ULAW_SILENCE]) * FRAME_BYTES] * total)[:total]
        if presses and presses[-1][1] > total * FRAME_SECONDS:
            key, at = presses[-1]
            raise ValueError(f"key press {key}@{at:g}s is after the call's end "
                             f"({total * FRAME_SECONDS:.2f}s)")
        report = CallReport(self.call_sid, self.stream_sid)
        state = self._state = _CallState(report)
        rest = self.rest
        if rest is not None:
            rest.link(self.call_sid, self)
        try:
            instruction = await self.request_stream()
            report.after_stream = instruction.after
            if not state.rest_requested.is_set():  # else the call moved on before the stream
                await self._stream(instruction, frames, presses, report, state)
            state.stream_over.set()
            await self._after_stream(instruction, report, state)
        finally:
            state.phase = "over"
            state.stream_over.set()
            if rest is not None:
                rest.unlink(self.call_sid)
        return report

    async def _stream(self, instruction: StreamInstruction, frames: list[bytes],
                      presses: list[tuple[str, float]], report: CallReport,
                      state: _CallState) -> None:
        headers = [(k.encode(), v.encode())
                   for k, v in signature_headers(self.validator, instruction.url, {}).items()]
        # trio-websocket's connect_timeout does not bound the wait for the upgrade's answer
        opening = trio.CancelScope(deadline=trio.current_time() + STREAM_CONNECT_TIMEOUT)
        try:
            with opening:
                async with trio_websocket.open_websocket_url(
                    instruction.url, extra_headers=headers,
                    connect_timeout=STREAM_CONNECT_TIMEOUT, disconnect_timeout=2,
                    message_queue_size=64,
                ) as ws:
                    opening.deadline = math.inf
                    await _Stream(self, ws, instruction, frames, report, dtmf=presses,
                                  state=state).run()
            if opening.cancelled_caught:
                raise trio.TooSlowError
        except trio_websocket.ConnectionRejected as exc:
            body = (exc.body or b"").decode("utf-8", "replace")
            excerpt = body_excerpt(body)
            raise SimulatorError(
                f"the media stream {show(instruction.url, 120)} was refused: HTTP "
                f"{exc.status_code}{': ' + excerpt if excerpt else ''}"
                f"{elsewhere_hint(instruction.url, self.webhook_url)}") from None
        except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
            raise SimulatorError(
                f"cannot open the media stream {show(instruction.url, 120)}: "
                f"{connection_problem(exc, instruction.url, STREAM_CONNECT_TIMEOUT)}"
                f"{elsewhere_hint(instruction.url, self.webhook_url)}") from None

    def hang_up(self) -> bool:
        """The caller hangs up now, before its audio ends (Ctrl-C): `stop` is sent at the next
        frame and the call ends as after any hang-up. False when the stream is not up (nothing
        to hang up politely: the caller would just cancel)."""
        state = self._state
        if state is None or state.phase != "streaming":
            return False
        state.hang_up_early = True
        return True

    async def rest_update(self, hang_up: bool, twiml: str | None) -> str:
        """A REST update to this call (called by SimulatedRest, see its ControlledCall): end
        the stream with `stop` and note what runs next. Returns the call's status."""
        from voxd.sim.rest import CallNotInProgress

        state = self._state
        if state is None or state.phase == "over" or state.hung_up:
            raise CallNotInProgress
        state.rest_end = (hang_up, twiml or "")
        state.hung_up = hang_up
        state.note("Twilio REST: call hung up" if hang_up else "Twilio REST: call redirected")
        state.rest_requested.set()
        if state.phase == "streaming":  # answer once the stream got its stop, as Twilio does
            with trio.move_on_after(REST_STOP_WAIT):
                await state.stream_over.wait()
        return "completed" if hang_up else "in-progress"

    async def _after_stream(self, instruction: StreamInstruction, report: CallReport,
                            state: _CallState) -> None:
        """What Twilio does once the stream is over: the `<Connect action>` request, then the
        TwiML that runs next (and a transfer's `<Dial action>` request)."""
        state.phase = "after"
        answer = None
        if instruction.action:
            form = self._form("completed" if state.hung_up else "in-progress")
            answer = await self._twiml_request(instruction.action, instruction.action_method,
                                               form, "Connect action", state)
        if report.closed_by == "caller":
            next_twiml, why = "", "the caller hung up"
        elif state.rest_end is not None:
            hang_up, twiml = state.rest_end
            next_twiml, why = ("", "hung up over REST") if hang_up else (twiml_verbs(twiml), "")
        elif instruction.action:
            next_twiml, why = answer or "", "the action gave nothing to run"
        else:
            next_twiml, why = instruction.after, "nothing after </Connect>"
        state.phase = "over"
        report.next_twiml = next_twiml
        # The verbs after </Connect> run whenever a stream ends without a hang-up: voxd's
        # call.fallback_twiml ("Sorry, ...") reads like an error unless said where it came from.
        source = (" (the verbs after </Connect>, which Twilio runs when the stream ends "
                  "without a hang-up)" if next_twiml and not instruction.action
                  and state.rest_end is None else "")
        state.note(f"after the stream: {next_twiml}{source}" if next_twiml
                   else f"after the stream: nothing, the call ends ({why})")
        dial = dial_element(next_twiml)
        if dial is None:
            return
        dial_xml, report.transferred_to = verb_xml(dial), dial_target(dial)
        state.note(f"transferred: {dial_xml}")
        if dial.get("action"):
            form = {**self._form("in-progress"), "DialCallStatus": self.dial_status,
                    "DialCallSid": _sid("CA")}
            if self.dial_status in ("completed", "answered"):
                form["DialCallDuration"] = "0"
            after_dial = await self._twiml_request(dial.get("action", ""),
                                                   (dial.get("method") or "POST").upper(), form,
                                                   "Dial action", state)
            report.after_dial = after_dial or ""
            state.note(f"after the dial ({self.dial_status}): {report.after_dial or 'nothing'}")

    async def _twiml_request(self, url: str, method: str, form: dict[str, str], what: str,
                             state: _CallState) -> str | None:
        """Request an action URL as Twilio does (signed like the webhook; relative URLs
        against the webhook's); the verbs it answered, or None (noted as an error)."""
        report = state.report
        status = ", ".join(f"{k}={form[k]}" for k in ("CallStatus", "DialCallStatus")
                           if k in form)
        try:
            url = urljoin(self.webhook_url, url)
            response = await twilio_request(url, method, form, self.validator)
        except (ValueError, httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            state.note(f"{what}: {method} {show(url, 120)} failed")
            report.errors.append(f"{what}: not a usable URL {show(url, 120)}: "
                                 f"{exc or type(exc).__name__} (Twilio: error 11200)")
            return None
        except httpx.HTTPError as exc:
            state.note(f"{what}: {method} {url} failed")
            report.errors.append(f"{what}: cannot reach {url}: "
                                 f"{connection_problem(exc, url, CALLBACK_TIMEOUT)}")
            return None
        state.note(f"{what}: {method} {urlsplit(url).path} ({status}) -> "
                   f"HTTP {response.status_code}")
        if response.status_code != 200:
            report.errors.append(f"{what} {url} answered HTTP {response.status_code} (Twilio: "
                                 "error 11200, the caller hears an application error)")
            return None
        try:
            return twiml_verbs(response.text, what)
        except SimulatorError as exc:
            report.errors.append(f"{exc} (Twilio: error 12100)")
            return None


class _Stream:
    """One media stream of a simulated call: the paced sender and the receiver."""

    def __init__(self, sim: TwilioSimulator, ws: trio_websocket.WebSocketConnection,
                 instruction: StreamInstruction, frames: list[bytes], report: CallReport, *,
                 dtmf: Sequence[tuple[str, float]] = (), state: _CallState | None = None) -> None:
        self.sim = sim
        self.ws = ws
        self.instruction = instruction
        self.frames = frames
        self.report = report
        self.presses = _checked_presses(dtmf)
        self.state = state if state is not None else _CallState(report)
        self.decoder = DtmfDecoder()
        self.sequence = 0
        self.playout = Playout()
        self.t0 = 0.0
        self.ended: str | None = None   # who ended the stream: caller, voxd or rest

    def now(self) -> float:
        return trio.current_time() - self.t0

    def claim(self, who: str) -> bool:
        """`who` ends the stream: True for the first to (the one whose end is recorded)."""
        if self.ended is not None:
            return False
        self.ended = self.report.closed_by = who
        if who == "caller":
            self.state.hung_up = True
        return True

    async def send(self, message: messages.Message) -> None:
        if message["event"] == "connected":
            await self.ws.send_message(messages.encode(message))
            return
        self.sequence += 1  # Twilio numbers every message after `connected`, from 1
        await self.ws.send_message(messages.encode(message, self.sequence))

    async def run(self) -> None:
        try:
            await self._run()
        except trio_websocket.ConnectionClosed as exc:  # closed before the call got going
            if self.claim("voxd"):
                code = exc.reason.code if exc.reason else None
                self.report.close_code = code
                self.report.events.append((0.0, "voxd closed the stream at once (code "
                                                f"{code or '?'})"))

    async def _run(self) -> None:
        sid = self.sim.stream_sid
        await self.send(messages.connected())
        await self.send(messages.start(sid, self.sim.call_sid, self.sim.account_sid,
                                       self.instruction.parameters))
        self.t0 = self.state.t0 = trio.current_time()
        self.state.phase = "streaming"
        self.report.events.append((0.0, "stream started"))
        self.sim.stream_started.set()
        if self.sim.on_stream_started is not None:
            self.sim.on_stream_started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive, nursery.cancel_scope)
            await self.pace()
            nursery.cancel_scope.cancel()

    async def pace(self) -> None:
        """Every 20 ms: send the caller's frame just captured, play one frame of assistant
        audio; key presses when due; a REST update's stop at the next tick."""
        sid = self.sim.stream_sid
        echo = self.sim.line_echo
        report = self.report
        try:
            for i, frame in enumerate(self.frames):
                # as Twilio does: a frame leaves once its 20 ms have been captured
                frame_at = self.t0 + (i + 1) * FRAME_SECONDS
                while self.presses and self.t0 + self.presses[0][1] <= frame_at:
                    key, at = self.presses.pop(0)
                    await trio.sleep_until(self.t0 + at)
                    if await self.obey_rest():
                        return
                    await self.send(messages.dtmf(sid, key))
                    report.keys_pressed += key
                    report.events.append((self.now(), f"caller pressed {key}"))
                await trio.sleep_until(frame_at)
                if await self.obey_rest():
                    return
                if self.state.hang_up_early:
                    break
                if echo is not None:
                    frame = line_echo(frame, report.heard_frames, *echo)
                await self.send(messages.media(sid, i, frame))
                report.caller_frames.append(frame)
                heard = self.playout.tick()
                report.heard_frames.append(heard)
                for key in self.decoder.feed(heard):
                    report.tones_heard += key
                    report.events.append((self.now(), f"tone heard: {key}"))
                await self.echo_marks(self.playout.due())
            if await self.obey_rest() or not self.claim("caller"):
                return
            await self.send(messages.stop(sid, self.sim.call_sid, self.sim.account_sid))
            report.events.append((self.now(), "caller hung up early (stop sent)"
                                  if self.state.hang_up_early else "caller hung up (stop sent)"))
        except trio_websocket.ConnectionClosed as exc:
            self._closed_by_voxd(exc)

    async def obey_rest(self) -> bool:
        """If a REST update ended the call: Twilio sends `stop` and closes the stream (True)."""
        if not self.state.rest_requested.is_set():
            return False
        if self.claim("rest"):
            await self.send(messages.stop(self.sim.stream_sid, self.sim.call_sid,
                                          self.sim.account_sid))
            self.report.events.append((self.now(), "Twilio ended the stream (stop sent)"))
            await self.ws.aclose()
        return True

    async def echo_marks(self, names: list[str]) -> None:
        """Echo marks whose audio has played back to voxd, as Twilio does."""
        for name in names:
            self.report.marks_echoed += 1
            self.report.mark_times.append((self.now(), name))
            await self.send(messages.mark(self.sim.stream_sid, name))

    async def receive(self, call_scope: trio.CancelScope) -> None:
        report = self.report
        try:
            while True:
                text = await self.ws.get_message()
                if not isinstance(text, str):
                    report.errors.append(f"{self.now():.2f}s binary frame (Twilio: 31950)")
                    continue
                try:
                    message = json.loads(text)
                    event = message["event"]
                    if message.get("streamSid") != self.sim.stream_sid:
                        raise ValueError(f"wrong streamSid {message.get('streamSid')!r}")
                    if event == "media":
                        audio = binascii.a2b_base64(message["media"]["payload"])
                        if report.media_received == 0:
                            report.events.append((self.now(), "first assistant audio received"))
                        report.media_received += 1
                        report.received_audio += audio
                        self.playout.receive(audio)
                    elif event == "mark":
                        name = message["mark"]["name"]
                        if not isinstance(name, str):
                            raise ValueError(f"mark name {show(name, 40)} is not a string")
                        read_voxd_mark(name, report)
                        await self.echo_marks(self.playout.mark(name))
                    elif event == "clear":
                        dropped, due = self.playout.clear()
                        report.clears += 1
                        report.clear_times.append((self.now(), dropped / RATE))
                        report.events.append(
                            (self.now(), f"clear: {dropped / 8:.0f} ms of queued "
                                         "assistant audio dropped"))
                        await self.echo_marks(due)
                    else:
                        raise ValueError(f"unknown event {event!r}")
                except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
                    report.errors.append(f"{self.now():.2f}s bad message from voxd (Twilio "
                                         f"warning 31951): {exc}")
        except trio_websocket.ConnectionClosed as exc:
            self._closed_by_voxd(exc)
            call_scope.cancel()

    def _closed_by_voxd(self, exc: trio_websocket.ConnectionClosed) -> None:
        """The socket closed: if the caller had not hung up, voxd ended the call (noted once,
        by whichever of the sender and the receiver sees it first)."""
        if self.claim("voxd"):
            reason = exc.reason
            self.report.close_code = reason.code if reason else None
            self.report.events.append((self.now(), f"voxd closed the stream (code "
                                                   f"{reason.code if reason else '?'})"))



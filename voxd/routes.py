"""voxd's HTTP routes: Twilio's voice webhook and callbacks, the outbound-call API, health,
readiness and metrics (a Quart-Trio app served by Hypercorn on connections the front door
hands it).

WebSockets are not served here: the media stream has its own path (`voxd.media`), and a
WebSocket that reaches the HTTP app anyway (an upgrade as a later request on a connection, or
a spelling of the path the front door does not route) is refused before it is accepted.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from voxd import outbound
from voxd.call.phone import DIAL_ENDED_PATH, STREAM_ENDED_PATH
from voxd.config import ACCOUNT_SID, plural
from voxd.observability import metrics
from voxd.observability.throttled import ThrottledLog
from voxd.observability.untrusted import show
from voxd.providers.base import ANSWERED_BY, CallInfo
from voxd.runtime import Runtime
from voxd.twilio import stream_token, twiml
from voxd.twilio.rest import TwilioRefused

log = logging.getLogger("voxd.routes")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SEND_SECONDS = 10.0
"""Longest one HTTP send may take (it is shielded: see `_shielded`)."""


VOICE_PATH = "/twilio/voice"
CALLS_PATH = "/calls"
JSON_FIELD = re.compile(r"at `\$\.(to|from|parameters)\b")
"""The field msgspec names in a validation error."""
MAX_API_BODY = 8 * 1024
"""Largest `POST /calls` body (a request is a few hundred bytes)."""


class CallRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /calls` (values checked by `outbound.dial_request`)."""

    to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    parameters: dict[str, str] | None = None


@dataclass(frozen=True)
class TwilioRequest:
    """A request Twilio made (signature checked), with its parameters and CallSid."""

    runtime: Runtime
    form: Any
    call_sid: str


class HttpApp:
    """The ASGI app: HTTP requests to the Quart app; every WebSocket refused."""

    def __init__(self, http_app: QuartTrio) -> None:
        self.http_app = http_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            log.debug("WebSocket upgrade of %r refused: not the media stream's path",
                      scope.get("path", "")[:100])
            metrics.CONNECTIONS_REJECTED.labels(reason="websocket_path").inc()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http":
            send = _shielded(send)
        await self.http_app(scope, receive, send)  # type: ignore[arg-type]


def _shielded(send: Send) -> Send:
    """Hypercorn (trio) + Quart-Trio never close an HTTP connection after a response: Quart-Trio
    cancels the request's nursery and Hypercorn's close runs inside that cancelled scope. Running
    Hypercorn's `send` shielded lets the close complete (tested: tests/integration/test_http.py).
    The shield has a deadline (SEND_SECONDS): a client that never reads cannot hold it.

    Every response also says `Connection: close`: with keep-alive, a connection the client
    closes after concurrent requests is often left in CLOSE-WAIT by Hypercorn until its
    keep-alive timeout (75 s), holding a descriptor and two tasks (found by bench/soak.py; the
    soak test checks descriptors and tasks return to baseline). Twilio sends one webhook per
    call, and nginx talks to voxd with `Connection: close` anyway, so nothing is lost."""

    async def send_shielded(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
        with trio.CancelScope(shield=True), trio.move_on_after(SEND_SECONDS):
            await send(message)

    return send_shielded


def create_metrics_app() -> HttpApp:
    """The app of `server.metrics_listen`: /metrics (and /healthz) only."""
    http = QuartTrio("voxd-metrics")
    http.config["MAX_CONTENT_LENGTH"] = 1024
    http.add_url_rule("/metrics", "metrics", metrics_page)
    http.add_url_rule("/healthz", "healthz", healthz)
    return HttpApp(http)


async def metrics_page() -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), content_type="text/plain; version=0.0.4")


TEXT = "text/plain; charset=utf-8"
"""The content type of /healthz and /readyz (a line of text, not HTML)."""


async def healthz() -> Response:
    """200 while the process is alive."""
    return Response("ok\n", 200, content_type=TEXT)


def create_app(runtime_ref: Callable[[], Runtime], metrics_here: bool = True) -> HttpApp:
    """The HTTP app; `runtime_ref()` gives the current Runtime (swapped on reload).
    `metrics_here`: /metrics is served here (not on server.metrics_listen)."""
    http = QuartTrio("voxd")
    refusals = ThrottledLog(log)
    http.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    async def from_twilio(path: str, what: str) -> TwilioRequest | tuple[str, int]:
        """The request to `path` as Twilio made it, with a well-formed CallSid; or the error
        to answer (after a throttled line and a count): 403 when Twilio's signature of the
        public URL (plus the query string) does not match, 400 without a well-formed CallSid."""
        runtime = runtime_ref()
        form = await signed_form(runtime, runtime.settings.public_origin + path, what)
        if form is None:
            return "invalid signature\n", 403
        call_sid = form.get("CallSid", "")
        if stream_token.CALL_SID.fullmatch(call_sid):
            return TwilioRequest(runtime, form, call_sid)
        refusals.warning("callsid", "%s from %s refused: %s CallSid %s", what,
                         request.remote_addr, "malformed" if call_sid else "missing",
                         show(call_sid, 40))
        metrics.CALLS_REJECTED.labels(reason="malformed").inc()
        return "missing or malformed CallSid\n", 400

    async def signed_form(runtime: Runtime, url: str, what: str) -> Any:
        """The request's parameters, or None when Twilio's signature does not match."""
        # A number may be configured to GET: then the parameters are in the (signed) URL.
        form = await request.form if request.method == "POST" else request.args
        if runtime.validator is None:
            return form
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        signature = request.headers.get("X-Twilio-Signature", "")
        signed: Any = form if request.method == "POST" else {}
        if runtime.validator.validate(url, signed, signature):
            return form
        refusals.warning("signature", "%s from %s rejected: %s X-Twilio-Signature (the signed "
                         "URL must be %s%s)", what, request.remote_addr,
                         "invalid" if signature else "missing", url.partition("?")[0],
                         " and its query string" if request.query_string else "")
        metrics.CALLS_REJECTED.labels(reason="signature").inc()
        return None

    def xml(body: str) -> Response:
        return Response(body, content_type="text/xml")

    @http.route(VOICE_PATH, methods=["POST", "GET"])
    async def voice() -> Response | tuple[str, int]:
        twilio = await from_twilio(VOICE_PATH, "voice webhook")
        if isinstance(twilio, tuple):
            return twilio
        runtime, form, call_sid = twilio.runtime, twilio.form, twilio.call_sid
        settings = runtime.settings
        account_sid = form.get("AccountSid", "")
        if account_sid and not ACCOUNT_SID.fullmatch(account_sid):
            refusals.warning("accountsid", "voice webhook from %s refused: malformed AccountSid "
                             "%s", request.remote_addr, show(account_sid, 40))
            metrics.CALLS_REJECTED.labels(reason="malformed").inc()
            return "malformed AccountSid\n", 400
        if runtime.live.draining:
            log.info("call_sid=%s voice webhook: draining, answering the fallback", call_sid)
            metrics.CALLS_REJECTED.labels(reason="draining").inc()
            return xml(twiml.verbs_only(settings.config.call.fallback_twiml))
        if len(runtime.calls) >= settings.config.call.max_concurrent_calls:
            log.warning("call_sid=%s voice webhook: at capacity (%s), answering the "
                        "fallback", call_sid, plural(len(runtime.calls), "call"))
            metrics.CALLS_REJECTED.labels(reason="capacity").inc()
            return xml(twiml.verbs_only(settings.config.call.fallback_twiml))
        # As Twilio will hand them back (cut to its <Parameter> limit): what the token binds.
        parameters = twiml.fitted({**url_parameters(), "from": form.get("From", ""),
                                   "to": form.get("To", "")})
        if form.get("Direction", "") == "outbound-api":  # a call voxd (or the API) placed
            parameters["direction"] = "outbound"
        runtime.provider.prepare(
            CallInfo(call_sid=call_sid, stream_sid="", account_sid=account_sid,
                     from_number=parameters["from"], to_number=parameters["to"],
                     parameters=parameters),
            runtime)
        url = settings.stream_url
        if settings.config.call.stream_token:
            url += "/" + stream_token.issue(settings.secrets.stream_secret.reveal().encode(),
                                            call_sid, parameters, time.time(),
                                            settings.config.call.stream_token_ttl)
        phone = runtime.phone
        action = phone.stream_action if phone is not None and not phone.rest else ""
        recording = settings.config.recording
        body = twiml.connect_stream(url, parameters, settings.config.call.fallback_twiml, action,
                                    recording.announce if recording.enabled else "")
        log.info("call_sid=%s voice webhook: connecting the stream (from=%s to=%s)",
                 call_sid, show(parameters["from"] or "-", 40), show(parameters["to"] or "-", 40))
        return xml(body)

    def url_parameters() -> dict[str, str]:
        """Parameters the webhook URL's query string carries (an outbound call's, or ones an
        operator put in a number's webhook URL): signed with it, bounded like the API's."""
        if request.method != "POST":
            return {}  # a GET webhook's query is Twilio's own form
        parameters: dict[str, str] = {}
        for name, value in request.args.items():
            if len(parameters) < outbound.MAX_PARAMETERS \
                    and outbound.parameter_problem(name, value) is None:
                parameters[name] = value
        return parameters

    @http.post(STREAM_ENDED_PATH)
    async def stream_ended() -> Response | tuple[str, int]:
        """Twilio asks what follows a stream (`<Connect action>`, used without REST): what
        the call's end left for it (hang up, a transfer), else the fallback."""
        twilio = await from_twilio(STREAM_ENDED_PATH, "stream-ended request")
        if isinstance(twilio, tuple):
            return twilio
        runtime, call_sid = twilio.runtime, twilio.call_sid
        answer = await runtime.live.after.take(call_sid)
        log.info("call_sid=%s stream ended: Twilio goes on with %s", call_sid,
                 "the fallback (nothing was left for the call)" if answer is None else
                 "what the call's end left for it")
        return xml(answer or twiml.verbs_only(runtime.settings.config.call.fallback_twiml))

    @http.post(DIAL_ENDED_PATH)
    async def dial_ended() -> Response | tuple[str, int]:
        """A transfer's dialled leg ended: hang up after a conversation, else tell the caller
        nobody answered (transfer.no_answer_twiml)."""
        twilio = await from_twilio(DIAL_ENDED_PATH, "dial-ended request")
        if isinstance(twilio, tuple):
            return twilio
        runtime, form, call_sid = twilio.runtime, twilio.form, twilio.call_sid
        status = form.get("DialCallStatus", "")
        if status in ("completed", "answered"):
            log.info("call_sid=%s transfer: the person hung up; ending the call", call_sid)
            metrics.TRANSFERS.labels(result="answered").inc()
            return xml(twiml.hang_up())
        log.warning("call_sid=%s transfer not answered (%s); the caller hears "
                    "transfer.no_answer_twiml", call_sid, show(status or "no status", 20))
        metrics.TRANSFERS.labels(result="unanswered").inc()
        return xml(twiml.verbs_only(runtime.settings.config.transfer.no_answer_twiml))

    @http.post(outbound.STATUS_PATH)
    async def call_status() -> Response | tuple[str, int]:
        """Twilio's status callback of an outbound call: logged and counted."""
        twilio = await outbound_callback(outbound.STATUS_PATH, "status callback")
        if isinstance(twilio, tuple):
            return twilio
        form, call_sid = twilio.form, twilio.call_sid
        status = form.get("CallStatus", "")
        if status not in outbound.STATUSES:
            refusals.warning("status", "call_sid=%s status callback with an unknown CallStatus "
                             "%s", call_sid, show(status, 30))
            return "unknown CallStatus\n", 400
        metrics.OUTBOUND_CALLS.labels(status=status).inc()
        detail = ""
        if status in outbound.FINAL_STATUSES:
            duration, answered = form.get("CallDuration", ""), form.get("AnsweredBy", "")
            detail = "".join([f" after {show(duration, 10)} s" if duration else "",
                              f", answered by {show(answered, 30)}" if answered else ""])
        level = logging.WARNING if status == "failed" else logging.INFO
        log.log(level, "call_sid=%s outbound call %s%s (to=%s)", call_sid, status, detail,
                show(form.get("To", "") or "-", 40))
        return "", 204

    @http.post(outbound.AMD_PATH)
    async def machine_detection() -> Response | tuple[str, int]:
        """Twilio's asynchronous answering-machine verdict: to the call, wherever it runs."""
        twilio = await outbound_callback(outbound.AMD_PATH, "machine-detection callback")
        if isinstance(twilio, tuple):
            return twilio
        runtime, form, call_sid = twilio.runtime, twilio.form, twilio.call_sid
        answered_by = form.get("AnsweredBy", "")
        if answered_by not in ANSWERED_BY:
            refusals.warning("amd", "call_sid=%s machine-detection callback with an unknown "
                             "AnsweredBy %s", call_sid, show(answered_by, 30))
            return "unknown AnsweredBy\n", 400
        metrics.MACHINE_DETECTION.labels(answered_by=answered_by).inc()
        log.info("call_sid=%s answered by %s (detection took %s ms)", call_sid, answered_by,
                 show(form.get("MachineDetectionDuration", "") or "?", 10))
        session = runtime.live.session(call_sid)
        if session is not None:
            session.answered_by(answered_by)
        else:  # its stream runs on another worker or host, or has not started yet
            await runtime.live.answered.put(call_sid, answered_by, outbound.AMD_KEEP_SECONDS)
        return "", 204

    async def outbound_callback(path: str, what: str) -> TwilioRequest | tuple[str, int]:
        """A callback about an outbound call: only where this voxd can place them (else
        404: nothing of voxd's could have asked for it), signed like every request of
        Twilio's."""
        if runtime_ref().outbound is None:
            return "not found\n", 404
        return await from_twilio(path, what)

    @http.post(CALLS_PATH)
    async def create_call() -> Response | tuple[dict[str, Any], int, dict[str, str]]:
        """`POST /calls`: place an outbound call (the API token's bearer only)."""
        runtime = runtime_ref()
        refused = api_refusal(runtime)
        if refused is not None:
            return refused
        data = await request.get_data(cache=False)
        try:
            asked = msgspec.json.decode(data, type=CallRequest)
            call = outbound.dial_request(runtime.settings.config.outbound, asked.to,
                                         asked.from_, asked.parameters)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            at = JSON_FIELD.search(str(exc))
            return api_error(422, "refused", f"the body must be JSON "
                             f'{{"to", "from", "parameters"}}: {show(exc, 200)}',
                             at.group(1) if at else None)
        except outbound.DialRefused as exc:
            return api_error(422, "refused", exc.problem, exc.field)
        if runtime.outbound is None:  # built exactly when the settings can place calls
            missing = outbound.unavailable(runtime.settings)
            return api_error(503, "create-failed", "outbound calls need the Twilio auth token "
                             "and twilio.account_sid", missing.field if missing else "twilio")
        config = runtime.settings.config
        rate = config.outbound.calls_per_second / config.server.workers
        limit = runtime.live.dial_rate
        wait = limit.reserve(rate, config.outbound.queue_seconds)
        if wait is None:
            error, status, headers = api_error(429, "rate-limited",
                                               "too many calls: outbound.calls_per_second")
            return error, status, {**headers,
                                   "Retry-After": str(math.ceil(limit.retry_after()))}
        try:
            await trio.sleep(wait)
        except trio.Cancelled:  # the client left while waiting for its turn
            limit.give_back(rate)
            raise
        if runtime.live.draining:
            return api_error(503, "refused", "voxd is draining: place the call elsewhere")
        try:
            sid = await outbound.place(runtime.outbound, runtime.settings, call)
        except TwilioRefused as exc:
            return refused_by_twilio(call, exc)
        metrics.OUTBOUND_CALLS.labels(status="created").inc()
        return ({"call_sid": sid, "to": call.to, "from": call.from_number, "status": "queued"},
                201, {})

    def api_refusal(runtime: Runtime) -> tuple[dict[str, Any], int, dict[str, str]] | None:
        """The answer to a `POST /calls` that may not go on: the API off (no token), a
        missing or wrong bearer token, too big a body, draining."""
        token = runtime.settings.secrets.api_token
        if token is None:
            return api_error(404, "unauthorized", "the outbound API is off: set the api_token "
                             "secret (VOXD_API_TOKEN) to turn it on")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            refusals.warning("api-auth", "POST /calls from %s refused: no bearer token",
                             request.remote_addr)
            body, status, _ = api_error(401, "unauthorized",
                                        "Authorization: Bearer <api token> required")
            return body, status, {"WWW-Authenticate": 'Bearer realm="voxd"'}
        if not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
            refusals.warning("api-auth", "POST /calls from %s refused: wrong API token",
                             request.remote_addr)
            return api_error(403, "unauthorized", "wrong API token")
        if (request.content_length or 0) > MAX_API_BODY:
            return api_error(413, "refused", f"the body is larger than {MAX_API_BODY} bytes")
        if runtime.live.draining:
            return api_error(503, "refused", "voxd is draining: place the call elsewhere")
        return None

    def refused_by_twilio(call: outbound.DialRequest, exc: TwilioRefused
                          ) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Twilio's no, as the API's answer: 422 for a request Twilio found wrong (a number
        it cannot call), 429 when it is over its rate, 504 when it is unknown whether the
        call was created, else 502 (voxd's credentials or Twilio failing)."""
        log.warning("outbound call to %s not created: %s", call.to, show(exc, 300))
        if exc.uncertain:
            return api_error(504, "create-failed", f"{exc}: look before trying again")
        if exc.status == 429:
            error, status, headers = api_error(429, "rate-limited", str(exc))
            return error, status, {**headers, "Retry-After": "1"}
        if exc.status == 400:
            return api_error(422, "create-failed", str(exc))
        return api_error(502, "create-failed", str(exc))

    def api_error(status: int, counted: str, message: str,
                  field: str | None = None) -> tuple[dict[str, Any], int, dict[str, str]]:
        metrics.OUTBOUND_CALLS.labels(status=counted).inc()
        body: dict[str, Any] = {"error": message}
        if field is not None:
            body["field"] = field
        return body, status, {}

    http.add_url_rule("/healthz", "healthz", healthz)

    @http.get("/readyz")
    async def readyz() -> Response:
        """200 when accepting calls, 503 while draining or at capacity."""
        not_ready = runtime_ref().not_ready()  # what voxd_ready shows too
        if not_ready is not None:
            return Response(not_ready + "\n", 503, content_type=TEXT)
        return Response("ready\n", 200, content_type=TEXT)

    if metrics_here:
        http.add_url_rule("/metrics", "metrics", metrics_page)

    return HttpApp(http)


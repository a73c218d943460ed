"""voxd's HTTP routes: Twilio's voice webhook, health, readiness and metrics (a Quart-Trio app
served by Hypercorn on connections the front door hands it).

WebSockets are not served here: the media stream has its own path (`voxd.media`), and a
WebSocket that reaches the HTTP app anyway (an upgrade as a later request on a connection, or
a spelling of the path the front door does not route) is refused before it is accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from voxd.call.phone import DIAL_ENDED_PATH, STREAM_ENDED_PATH
from voxd.config import ACCOUNT_SID
from voxd.observability import metrics
from voxd.observability.throttled import ThrottledLog
from voxd.observability.untrusted import show
from voxd.providers.base import CallInfo
from voxd.runtime import Runtime
from voxd.twilio import stream_token, twiml

log = logging.getLogger("voxd.routes")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SEND_SECONDS = 10.0
"""Longest one HTTP send may take (it is shielded: see `_shielded`)."""


VOICE_PATH = "/twilio/voice"


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


async def healthz() -> tuple[str, int]:
    """200 while the process is alive."""
    return "ok\n", 200


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
            log.warning("call_sid=%s voice webhook: at capacity (%d calls), answering the "
                        "fallback", call_sid, len(runtime.calls))
            metrics.CALLS_REJECTED.labels(reason="capacity").inc()
            return xml(twiml.verbs_only(settings.config.call.fallback_twiml))
        # As Twilio will hand them back (cut to its <Parameter> limit): what the token binds.
        parameters = twiml.fitted({"from": form.get("From", ""), "to": form.get("To", "")})
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

    http.add_url_rule("/healthz", "healthz", healthz)

    @http.get("/readyz")
    async def readyz() -> tuple[str, int]:
        runtime = runtime_ref()
        if runtime.live.draining:
            return "draining\n", 503
        if len(runtime.calls) >= runtime.settings.config.call.max_concurrent_calls:
            return "at capacity\n", 503
        return "ready\n", 200

    if metrics_here:
        http.add_url_rule("/metrics", "metrics", metrics_page)

    return HttpApp(http)


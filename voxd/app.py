"""The application: Twilio's voice webhook, the media WebSocket, health and metrics.

HTTP routes are a Quart-Trio app served by Hypercorn. The media WebSocket carries 50 messages a
second each way per call, so it bypasses both: the front door (voxd.net.front) hands a
connection whose first request is the media upgrade to `VoxdAsgi.media_connection`, which runs
the call on voxd's own WebSocket (voxd.net.websocket). An upgrade that arrives on a connection
already serving HTTP is still served, as bare ASGI (no framework between Hypercorn and the
call).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from twilio.request_validator import RequestValidator

from voxd.call.session import CallerDisconnected, CallSession, TwilioSocket
from voxd.config import Settings
from voxd.errors import ProtocolError
from voxd.net.stream import DirectStream
from voxd.net.websocket import (
    ConnectionClosed,
    HandshakeError,
    MessageTooBig,
    ServerHandshake,
    WebSocket,
)
from voxd.observability import metrics
from voxd.providers import build_provider
from voxd.providers.base import CallInfo, Provider
from voxd.twilio import stream_token, twiml
from voxd.twilio.rest import CallControl

log = logging.getLogger("voxd.app")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LiveCalls:
    """The calls in progress, shared by every Runtime across reloads (capacity, readiness,
    draining)."""

    def __init__(self, on_change: Callable[[LiveCalls], None] | None = None) -> None:
        self.sessions: set[CallSession] = set()
        self.draining = False
        self.used_tokens = stream_token.UsedTokens()
        self.on_change = on_change
        self._idle = trio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: CallSession) -> None:
        """Count a call in."""
        self.sessions.add(session)
        if self._idle.is_set():
            self._idle = trio.Event()
        if self.on_change is not None:
            self.on_change(self)

    def discard(self, session: CallSession) -> None:
        """Count a call out."""
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()
        if self.on_change is not None:
            self.on_change(self)

    async def wait_idle(self) -> None:
        """Return once no call is in progress."""
        await self._idle.wait()


@dataclass
class Runtime:
    """What the running daemon serves with; replaced as a whole on reload, so a live call keeps
    the settings and provider it started with."""

    settings: Settings
    provider: Provider
    validator: RequestValidator | None = None
    call_control: CallControl | None = None
    background: trio.Nursery | None = None
    """Where work that outlives one request runs (e.g. creating an assistant call early)."""
    live: LiveCalls = field(default_factory=LiveCalls)

    @property
    def calls(self) -> set[CallSession]:
        """The calls in progress."""
        return self.live.sessions

    def call_started(self, session: CallSession) -> None:
        """Count a call in (for capacity, readiness and draining)."""
        self.live.add(session)

    def call_ended(self, session: CallSession) -> None:
        """Count a call out."""
        self.live.discard(session)

    async def wait_idle(self) -> None:
        """Return once no call is in progress."""
        await self.live.wait_idle()

    @classmethod
    def from_settings(cls, settings: Settings, live: LiveCalls | None = None) -> Runtime:
        """Build the provider and signature validator the settings ask for."""
        token = settings.secrets.twilio_auth_token
        validate = settings.config.twilio.validate_signatures and token is not None
        return cls(
            settings=settings,
            provider=build_provider(settings),
            validator=RequestValidator(token.reveal()) if validate and token else None,
            call_control=(CallControl(settings) if settings.config.twilio.rest_call_control
                          else None),
            live=live if live is not None else LiveCalls(),
        )


class AsgiTwilioSocket:
    """The media WebSocket over raw ASGI messages, as `CallSession` wants it."""

    __slots__ = ("_closed", "_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False

    async def receive(self) -> str:
        """The next text frame from Twilio."""
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is None:
                raise ProtocolError("binary frame received; Twilio sends only text frames")
            return text
        self._closed = True
        raise CallerDisconnected(f"socket closed (code {message.get('code')})")

    async def send(self, text: str) -> None:
        """Send one text frame to Twilio."""
        if self._closed:
            raise CallerDisconnected("socket already closed")
        try:
            await self._send({"type": "websocket.send", "text": text})
        except _GONE as exc:
            self._closed = True
            raise CallerDisconnected(f"socket gone while sending ({type(exc).__name__})") \
                from None

    async def close(self, code: int = 1000) -> None:
        """Close the socket once (quietly, if the peer is already gone)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(*_GONE):
                await self._send({"type": "websocket.close", "code": code})


class WsTwilioSocket:
    """The media WebSocket on voxd's own path, as `CallSession` wants it."""

    __slots__ = ("_ws",)

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def receive(self) -> str:
        """The next text frame from Twilio."""
        try:
            message = await self._ws.receive()
        except ConnectionClosed as exc:
            raise CallerDisconnected(f"socket closed ({exc})") from None
        except MessageTooBig as exc:
            raise ProtocolError(f"{exc} (call.max_message_bytes)") from None
        if type(message) is not str:
            raise ProtocolError("binary frame received; Twilio sends only text frames")
        return message

    async def send(self, text: str) -> None:
        """Send one text frame to Twilio."""
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            raise CallerDisconnected(f"socket gone while sending ({exc})") from None

    @property
    def writing(self) -> bool:
        """A send is in progress (see `voxd.call.playback.Direct`)."""
        return self._ws.writing

    def send_nowait(self, text: str) -> bool:
        """Send one text frame to Twilio without waiting; False if part of it is owed."""
        try:
            return self._ws.send_nowait(text)
        except ConnectionClosed as exc:
            raise CallerDisconnected(f"socket gone while sending ({exc})") from None

    async def flush(self) -> None:
        """Write what `send_nowait` left owed."""
        try:
            await self._ws.flush()
        except ConnectionClosed as exc:
            raise CallerDisconnected(f"socket gone while sending ({exc})") from None

    async def close(self, code: int = 1000) -> None:
        """Close the socket once (quietly, if the peer is already gone)."""
        await self._ws.close(code)


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)
"""What Hypercorn's send raises when the connection is closing under us (its own close path
sends EOF without its send lock, so a send racing it sees BusyResourceError)."""


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class VoxdAsgi:
    """Routes `/media-stream` WebSockets to calls, everything else to the Quart app."""

    def __init__(self, runtime_ref: Callable[[], Runtime], http_app: QuartTrio) -> None:
        self.runtime = runtime_ref
        self.http_app = http_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/media-stream":
            await self.media_stream(scope, receive, send)
            return
        if scope["type"] == "http":
            send = _shielded(send)
        await self.http_app(scope, receive, send)  # type: ignore[arg-type]

    async def media_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A media WebSocket that reached the HTTP server (an upgrade on a connection that
        first carried another request): served through ASGI, as any call."""
        runtime = self.runtime()
        peer = _peer(scope)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not _signature_ok(runtime, _header(scope, b"x-twilio-signature"), peer):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        await _run_call(runtime, AsgiTwilioSocket(receive, send), peer)

    async def media_connection(self, stream: DirectStream, data: bytes, peer: str) -> None:
        """A connection whose first request is the media WebSocket upgrade (the usual case):
        served by voxd's own WebSocket path, without the HTTP server in between."""
        runtime = self.runtime()
        try:
            handshake = ServerHandshake(stream, data)
        except HandshakeError as exc:
            log.warning("media stream from %s refused: bad WebSocket upgrade: %s", peer, exc)
            metrics.CONNECTIONS_REJECTED.labels(reason="bad_upgrade").inc()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(BAD_REQUEST)
            return
        if not _signature_ok(runtime, handshake.header(b"x-twilio-signature"), peer):
            await handshake.reject(403)
            return
        websocket = await handshake.accept(runtime.settings.config.call.max_message_bytes)
        await _run_call(runtime, WsTwilioSocket(websocket), peer)


BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _signature_ok(runtime: Runtime, signature: str | None, peer: str) -> bool:
    """The upgrade carries Twilio's signature of the stream URL (when signatures are checked);
    a refusal is logged and counted."""
    if runtime.validator is None:
        return True
    if runtime.validator.validate(runtime.settings.stream_url, {}, signature or ""):
        return True
    log.warning("media stream from %s rejected: %s X-Twilio-Signature", peer,
                "invalid" if signature else "missing")
    metrics.CALLS_REJECTED.labels(reason="signature").inc()
    return False


async def _run_call(runtime: Runtime, socket: TwilioSocket, peer: str) -> None:
    session = CallSession(socket, runtime.settings, runtime.provider, peer,
                          call_control=runtime.call_control, used_tokens=runtime.live.used_tokens)
    runtime.call_started(session)
    try:
        await session.run()
    finally:
        runtime.call_ended(session)


def _shielded(send: Send) -> Send:
    """Hypercorn (trio) + Quart-Trio never close an HTTP connection after a response: Quart-Trio
    cancels the request's nursery and Hypercorn's close runs inside that cancelled scope. Running
    Hypercorn's `send` shielded lets the close complete (tested: tests/integration/test_http.py).

    Every response also says `Connection: close`: with keep-alive, a connection the client
    closes after concurrent requests is often left in CLOSE-WAIT by Hypercorn until its
    keep-alive timeout (75 s), holding a descriptor and two tasks (found by bench/soak.py; the
    soak test checks descriptors and tasks return to baseline). Twilio sends one webhook per
    call, and nginx talks to voxd with `Connection: close` anyway, so nothing is lost."""

    async def send_shielded(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
        with trio.CancelScope(shield=True):
            await send(message)

    return send_shielded


def create_app(runtime_ref: Callable[[], Runtime]) -> VoxdAsgi:
    """The whole ASGI app; `runtime_ref()` gives the current Runtime (swapped on reload)."""
    http = QuartTrio("voxd")
    http.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    @http.route("/twilio/voice", methods=["POST", "GET"])
    async def voice() -> Response | tuple[str, int]:
        runtime = runtime_ref()
        settings = runtime.settings
        # A number may be configured to GET: then the parameters are in the (signed) URL.
        form = await request.form if request.method == "POST" else request.args
        if runtime.validator is not None:
            url = settings.webhook_url
            if request.query_string:
                url += "?" + request.query_string.decode("latin-1")
            signature = request.headers.get("X-Twilio-Signature", "")
            signed = form if request.method == "POST" else {}
            if not runtime.validator.validate(url, signed, signature):
                log.warning("voice webhook from %s rejected: %s X-Twilio-Signature (signed URL "
                            "must be %s)", request.remote_addr,
                            "invalid" if signature else "missing", url)
                metrics.CALLS_REJECTED.labels(reason="signature").inc()
                return "invalid signature\n", 403
        call_sid = form.get("CallSid", "")
        if not call_sid:
            log.warning("voice webhook from %s without CallSid", request.remote_addr)
            return "missing CallSid\n", 400
        if runtime.live.draining:
            log.info("call_sid=%s voice webhook: draining, answering the fallback", call_sid)
            metrics.CALLS_REJECTED.labels(reason="draining").inc()
            return Response(twiml.verbs_only(settings.config.call.fallback_twiml),
                            content_type="text/xml")
        if len(runtime.calls) >= settings.config.call.max_concurrent_calls:
            log.warning("call_sid=%s voice webhook: at capacity (%d calls), answering the "
                        "fallback", call_sid, len(runtime.calls))
            metrics.CALLS_REJECTED.labels(reason="capacity").inc()
            return Response(twiml.verbs_only(settings.config.call.fallback_twiml),
                            content_type="text/xml")
        parameters = {"from": form.get("From", ""), "to": form.get("To", "")}
        if runtime.background is not None:
            runtime.provider.prepare(
                CallInfo(call_sid=call_sid, stream_sid="", account_sid=form.get("AccountSid", ""),
                         from_number=parameters["from"], to_number=parameters["to"],
                         parameters=parameters),
                runtime.background)
        stream_parameters = dict(parameters)
        if settings.config.call.stream_token:
            stream_parameters["token"] = stream_token.issue(
                settings.secrets.stream_secret.reveal().encode(), call_sid, time.time(),
                settings.config.call.stream_token_ttl)
        body = twiml.connect_stream(settings.stream_url, stream_parameters,
                                    settings.config.call.fallback_twiml)
        log.info("call_sid=%s voice webhook: connecting the stream (from=%s to=%s)",
                 call_sid, parameters["from"] or "-", parameters["to"] or "-")
        return Response(body, content_type="text/xml")

    @http.get("/healthz")
    async def healthz() -> tuple[str, int]:
        return "ok\n", 200

    @http.get("/readyz")
    async def readyz() -> tuple[str, int]:
        runtime = runtime_ref()
        if runtime.live.draining:
            return "draining\n", 503
        if len(runtime.calls) >= runtime.settings.config.call.max_concurrent_calls:
            return "at capacity\n", 503
        return "ready\n", 200

    @http.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4")

    return VoxdAsgi(runtime_ref, http)

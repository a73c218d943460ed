"""The media endpoint: a connection whose first request is a WebSocket upgrade of the media
path becomes one call.

This is the only way to the media path: the front door sends upgrades of `/media-stream` and
`/media-stream/<token>` here, answers other WebSocket upgrades itself, and the HTTP app refuses
any WebSocket that still reaches it (see `voxd.routes`). Every stream passes the same checks,
in this order, before it is accepted, counted as a call, or any value of it is logged:
1. a valid WebSocket upgrade (400 otherwise);
2. Twilio's signature of the exact URL it connected to (403 otherwise);
3. the call's stream token in the path (`call.stream_token`, see `voxd.twilio.stream_token`):
   well formed, this service's, unexpired, and not used before (403 otherwise).
Refusals are logged throttled, one line per reason per 10 s, and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from voxd.call.session import CallSession
from voxd.errors import ProtocolError
from voxd.net.front import BAD_REQUEST, MEDIA_PATH
from voxd.net.stream import DirectStream
from voxd.net.websocket import HandshakeError, ServerHandshake
from voxd.observability import metrics
from voxd.observability.throttled import ThrottledLog
from voxd.observability.untrusted import show
from voxd.runtime import Runtime
from voxd.twilio import stream_token
from voxd.twilio.media_socket import TwilioMediaSocket

log = logging.getLogger("voxd.media")



class MediaEndpoint:
    """Serves media-stream connections handed over by the front door."""

    def __init__(self, runtime_ref: Callable[[], Runtime]) -> None:
        self.runtime = runtime_ref
        self._refusals = ThrottledLog(log)

    async def __call__(self, stream: DirectStream, data: bytes, peer: str) -> None:
        """Run the call a media upgrade (`data`: its head and what came after) asks for."""
        runtime = self.runtime()
        try:
            handshake = ServerHandshake(stream, data)
        except HandshakeError as exc:
            metrics.CONNECTIONS_REJECTED.labels(reason="bad_upgrade").inc()
            self._refuse("bad_upgrade", "media stream from %s refused: bad WebSocket upgrade: "
                         "%s", peer, show(exc, 200))
            await stream.send_all(BAD_REQUEST)
            return
        path = handshake.request.path
        if not self._signature_ok(runtime, handshake.header(b"x-twilio-signature"), path, peer):
            await handshake.reject(403)
            return
        try:
            stream_pass = await self._stream_pass(runtime, path)
        except ProtocolError as exc:
            metrics.CALLS_REJECTED.labels(reason="token").inc()
            self._refuse(f"token-{getattr(exc, 'kind', 'path')}",
                         "media stream from %s rejected: %s", peer, exc)
            await handshake.reject(403)
            return
        websocket = await handshake.accept(runtime.settings.config.call.max_message_bytes)
        session = CallSession(TwilioMediaSocket(websocket), runtime.settings, runtime.provider,
                              peer, phone=runtime.phone, stream_pass=stream_pass)
        runtime.call_started(session)
        try:
            await session.run()
        finally:
            runtime.call_ended(session)

    def _signature_ok(self, runtime: Runtime, signature: str | None, path: str,
                      peer: str) -> bool:
        """The upgrade carries Twilio's signature of the URL it connected to: the stream URL
        voxd gave it (`server.public_url`'s origin and this path; never the Host header)."""
        if runtime.validator is None:
            return True
        url = runtime.settings.stream_url + path[len(MEDIA_PATH):]
        if runtime.validator.validate(url, {}, signature or ""):
            return True
        metrics.CALLS_REJECTED.labels(reason="signature").inc()
        self._refuse("signature", "media stream from %s rejected: %s X-Twilio-Signature", peer,
                     "invalid" if signature else "missing")
        return False

    async def _stream_pass(self, runtime: Runtime,
                           path: str) -> stream_token.StreamPass | None:
        """The verified, now used, token of the path (None with call.stream_token off)."""
        if not runtime.settings.config.call.stream_token:
            if path != MEDIA_PATH:
                raise ProtocolError(f"no stream at this path (call.stream_token is off: "
                                    f"the media path is {MEDIA_PATH})")
            return None
        token = path[len(MEDIA_PATH) + 1:] if path.startswith(MEDIA_PATH + "/") else ""
        now = time.time()
        stream_pass = stream_token.verify(runtime.settings.secrets.stream_secret.reveal()
                                          .encode(), token, now)
        await runtime.live.used_tokens.claim(stream_pass.mac, stream_pass.expiry, now)
        return stream_pass

    def _refuse(self, reason: str, message: str, *args: object) -> None:
        self._refusals.warning(reason, message, *args)



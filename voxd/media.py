"""The media endpoint: a connection whose first request is the `/media-stream` WebSocket
upgrade becomes one call.

This is the only way to the media path: the front door sends exactly `/media-stream` upgrades
here, answers other WebSocket upgrades itself, and the HTTP app refuses any WebSocket that
still reaches it (see `voxd.routes`), so every stream passes the same checks in the same
order: a valid upgrade, Twilio's signature of the stream URL, then (in the call) the stream's
token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from voxd.call.session import CallSession
from voxd.net.stream import DirectStream
from voxd.net.websocket import HandshakeError, ServerHandshake
from voxd.observability import metrics
from voxd.runtime import Runtime
from voxd.twilio.media_socket import TwilioMediaSocket

log = logging.getLogger("voxd.media")

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class MediaEndpoint:
    """Serves media-stream connections handed over by the front door."""

    def __init__(self, runtime_ref: Callable[[], Runtime]) -> None:
        self.runtime = runtime_ref

    async def __call__(self, stream: DirectStream, data: bytes, peer: str) -> None:
        """Run the call a media upgrade (`data`: its head and what came after) asks for."""
        runtime = self.runtime()
        try:
            handshake = ServerHandshake(stream, data)
        except HandshakeError as exc:
            log.warning("media stream from %s refused: bad WebSocket upgrade: %s", peer, exc)
            metrics.CONNECTIONS_REJECTED.labels(reason="bad_upgrade").inc()
            await stream.send_all(BAD_REQUEST)
            return
        if not signature_ok(runtime, handshake.header(b"x-twilio-signature"), peer):
            await handshake.reject(403)
            return
        websocket = await handshake.accept(runtime.settings.config.call.max_message_bytes)
        session = CallSession(TwilioMediaSocket(websocket), runtime.settings, runtime.provider,
                              peer, call_control=runtime.call_control,
                              used_tokens=runtime.live.used_tokens)
        runtime.call_started(session)
        try:
            await session.run()
        finally:
            runtime.call_ended(session)


def signature_ok(runtime: Runtime, signature: str | None, peer: str) -> bool:
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

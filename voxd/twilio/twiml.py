"""The TwiML voxd answers Twilio's voice webhook with (built with the `twilio` package)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot carry (control characters, lone surrogates): dropped from text
an assistant gives (an announcement), so the TwiML stays well-formed."""
MAX_PARAMETER_CHARS = 500
"""Twilio's limit on a <Parameter>'s name plus value."""


def fitted(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters as the stream will carry them: without characters XML cannot carry,
    cut to Twilio's <Parameter> limit."""
    return {name: NOT_XML.sub("", value)[: max(0, MAX_PARAMETER_CHARS - len(name) - 1)]
            for name, value in parameters.items()}


def connect_stream(stream_url: str, parameters: Mapping[str, str], fallback_verbs: str,
                   action: str = "", before: str = "") -> str:
    """`<Connect><Stream url=...>` with `<Parameter>`s (cut to Twilio's limit). Then either
    the fallback verbs (raw TwiML, validated at config load) that Twilio runs once the stream
    ends, or, with an `action` URL, nothing: Twilio asks the action what comes next.
    `before`: raw TwiML verbs (validated at config load) played before the stream."""
    response = VoiceResponse()
    connect = Connect(action=action) if action else Connect()
    stream = connect.stream(url=stream_url)
    for name, value in fitted(parameters).items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    xml = str(response) if action else _with_verbs(response, fallback_verbs)
    if before:
        head, _, rest = xml.partition("<Response>")
        xml = head + "<Response>" + before + rest
    return xml


def dial(address: str, *, announce: str = "", caller_id: str = "", timeout: int = 30,
         action: str = "") -> str:
    """A cold transfer: optionally say `announce`, then dial `address` (a +E164 number or a
    sip: URI); `action` is asked what follows when the dialled leg ends."""
    response = VoiceResponse()
    announce = NOT_XML.sub("", announce)
    if announce:
        response.say(announce)
    attributes: dict[str, str | int] = {"timeout": timeout}
    if caller_id:
        attributes["caller_id"] = caller_id
    if action:
        attributes["action"] = action
    verb = Dial(**attributes)
    if address.startswith(("sip:", "sips:")):
        verb.sip(address)
    else:
        verb.number(address)
    response.append(verb)
    return str(response)


def hang_up() -> str:
    """End the call."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def then_hang_up(verbs: str) -> str:
    """The given verbs (validated at config load), then hang up."""
    return _with_verbs(VoiceResponse(), verbs + "<Hangup/>")


def verbs_only(verbs: str) -> str:
    """A response made of the given verbs alone (e.g. the fallback when no stream can start)."""
    return _with_verbs(VoiceResponse(), verbs)


def _with_verbs(response: VoiceResponse, verbs: str) -> str:
    xml = str(response)
    if xml.endswith("<Response />"):
        xml = xml[: -len("<Response />")] + "<Response></Response>"
    head, tail = xml[: -len("</Response>")], "</Response>"
    return head + verbs + tail

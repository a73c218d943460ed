"""TwiML as Twilio reads it when a call rings: the `<Connect><Stream>` to open, its
`<Parameter>`s and `action`, the verbs after it, and a `<Dial>` among the verbs that run next.
Pure: text in, values out (SimulatorError for what Twilio would reject)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from voxd.observability.untrusted import show
from voxd.sim.explain import SimulatorError, url_problem


@dataclass(frozen=True)
class StreamInstruction:
    """What the TwiML asked for: the stream URL, its parameters, the verbs after it, and the
    `<Connect action>` URL ("" when none; as written, relative URLs unresolved)."""

    url: str
    parameters: dict[str, str]
    after: str
    action: str = ""
    action_method: str = "POST"


def verb_xml(element: ET.Element) -> str:
    """One verb as TwiML text (without the whitespace after it; `<Hangup/>`, not
    `<Hangup />`: ElementTree escapes `>` in attribute values, so the replace is safe)."""
    tail, element.tail = element.tail, None
    try:
        return ET.tostring(element, encoding="unicode").replace(" />", "/>")
    finally:
        element.tail = tail


def _response(body: str, what: str) -> ET.Element:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise SimulatorError(f"{what} answered invalid XML: {exc}") from None
    if root.tag != "Response":
        raise SimulatorError(f"{what} answered <{root.tag}>, not <Response>")
    return root


def twiml_verbs(body: str, what: str = "the TwiML") -> str:
    """The verbs of a `<Response>` document, as text (SimulatorError if it is not one)."""
    return "".join(verb_xml(verb) for verb in _response(body, what))


def find_dial(verbs: str) -> tuple[str, str] | None:
    """The first `<Dial>` among TwiML verbs: (its TwiML, whom it calls), or None."""
    dial = dial_element(verbs)
    return None if dial is None else (verb_xml(dial), dial_target(dial))


def parse_twiml(body: str) -> StreamInstruction:
    """Find `<Connect><Stream>` in a TwiML response, as Twilio would."""
    verbs = list(_response(body, "webhook"))
    for i, verb in enumerate(verbs):
        stream = verb.find("Stream") if verb.tag == "Connect" else None
        if stream is not None:
            url = stream.get("url", "")
            if not url.startswith(("ws://", "wss://")):
                raise SimulatorError(f"<Stream url={url!r}> is not a ws:// or wss:// URL")
            if problem := url_problem(url, ("ws", "wss")):
                raise SimulatorError(f"<Stream url>: {problem}")
            if "?" in url:
                raise SimulatorError(f"<Stream url={url!r}> has a query string (Twilio error "
                                     "31920: use <Parameter>)")
            params = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
            after = "".join(verb_xml(v) for v in verbs[i + 1:])
            method = (verb.get("method") or "POST").upper()
            if method not in ("GET", "POST"):
                raise SimulatorError(f"<Connect method={method!r}> is not GET or POST")
            return StreamInstruction(url, params, after, verb.get("action", ""), method)
    answered = "".join(verb_xml(v) for v in verbs)
    if not answered:
        raise SimulatorError("webhook answered no <Connect><Stream> (an empty <Response>)")
    raise SimulatorError(f"webhook answered no <Connect><Stream>, only {show(answered, 120)} "
                         "(voxd answers its call.fallback_twiml alone when it is at "
                         "call.max_concurrent_calls or draining: see its log)")


def looks_like_xml(body: str) -> bool:
    """Could this body be TwiML at all (an XML document), rather than HTML, JSON or text?"""
    head = body.lstrip()[:200].lower()
    return head.startswith("<") and not head.startswith(("<!doctype html", "<html"))


def dial_element(verbs: str) -> ET.Element | None:
    try:
        return ET.fromstring(f"<Response>{verbs}</Response>").find("Dial")
    except ET.ParseError:
        return None


def dial_target(dial: ET.Element) -> str:
    nouns = [child for child in dial if child.tag in ("Number", "Sip", "Client", "Conference",
                                                      "Queue", "Sim", "Application")]
    return ((nouns[0].text if nouns else dial.text) or "").strip()

"""In-call control without sockets: the end-of-call table, who may be dialled, the TwiML, the
keypad collector, the generic protocol's new messages and the config that drives them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from voxd.call.ending import POLICY, Caller, Tell, policy
from voxd.call.keypad import Keypad
from voxd.call.phone import Destination, TransferRefusal, destination
from voxd.config import KeypadConfig, TransferConfig, parse_config
from voxd.errors import ConfigError, ProtocolError
from voxd.providers.base import (
    MAX_TRANSCRIPT_CHARS,
    AnsweredBy,
    DigitsRequested,
    KeypadEntry,
    Transcript,
    Transferred,
    TransferRefused,
    TransferRequested,
)
from voxd.providers.websocket import notice_message, translate
from voxd.twilio import twiml

# -- the end-of-call table ---------------------------------------------------------------------


def test_every_end_reason_has_its_own_row_and_every_row_is_used():
    import inspect
    import re

    import voxd.call.session as session
    import voxd.server as server

    source = inspect.getsource(session) + inspect.getsource(server)
    kinds = set(re.findall(r'(?:Ending|_end|shutdown)\(f?"([a-z-]+)', source))
    assert kinds, "the pattern no longer finds the reasons"
    # reasons that end a call only where the session cannot be reached (a bug's own tasks)
    unreachable = {"feeder-ended", "playout-ended", "barge-in-watcher-ended", "keypad-ended",
                   "notices-ended", "assistant-side-ended"}
    assert kinds - unreachable <= set(POLICY), kinds - unreachable - set(POLICY)
    assert set(POLICY) <= kinds, set(POLICY) - kinds


def test_a_goodbye_hangs_up_and_a_failure_apologises():
    goodbye = policy("assistant-ended:vapi:customer-ended-call")
    assert (goodbye.outcome, goodbye.caller, goodbye.rest, goodbye.assistant) == \
        ("completed", Caller.HANG_UP, True, Tell.END)
    failed = policy("upstream-error")
    assert (failed.outcome, failed.caller, failed.rest) == ("error", Caller.FALLBACK, True)
    moved = policy("transferred:sales")
    assert (moved.outcome, moved.caller, moved.rest, moved.assistant) == \
        ("transferred", Caller.DIAL, True, Tell.TRANSFERRED)
    gone = policy("caller-hangup")
    assert (gone.caller, gone.rest, gone.assistant) == (Caller.NOTHING, False, Tell.END)


def test_only_the_assistants_side_yields_to_a_decided_transfer():
    assert {kind for kind, row in POLICY.items() if row.side == "assistant"} == \
        {"assistant-ended", "upstream-error", "upstream-stalled", "upstream-keepalive-timeout"}


def test_an_unknown_reason_is_voxds_own_failure():
    assert policy("never-heard-of-it") == policy("internal-error")


# -- who may be dialled -----------------------------------------------------------------------

TRANSFER = TransferConfig(default="support", to={"sales": "+14155550100",
                                                 "support": "sip:desk@pbx.example.com"})


@pytest.mark.parametrize(("asked", "expected"), [
    ("sales", Destination("sales", "+14155550100")),
    ("", Destination("support", "sip:desk@pbx.example.com")),
    ("  ", Destination("support", "sip:desk@pbx.example.com")),
    # a platform that dialled a configured destination by its address (Vapi's transferCall)
    ("+14155550100", Destination("sales", "+14155550100")),
    ("+1 (415) 555-0100", Destination("sales", "+14155550100")),
    ("sip:desk@pbx.example.com", Destination("support", "sip:desk@pbx.example.com")),
])
def test_allowed_destinations(asked, expected):
    assert destination(TRANSFER, asked) == expected


@pytest.mark.parametrize("asked", ["ceo", "+19005550199", "sip:evil@example.com", "SALES",
                                   "sales2", "4155550100"])
def test_anything_else_is_refused(asked):
    with pytest.raises(TransferRefusal, match="not a destination"):
        destination(TRANSFER, asked)


def test_no_default_means_a_transfer_must_name_its_destination():
    with pytest.raises(TransferRefusal, match=r"no transfer\.default"):
        destination(TransferConfig(to={"sales": "+14155550100"}), "")


# -- TwiML ------------------------------------------------------------------------------------


def test_dial_twiml_escapes_the_announcement_and_sets_the_attributes():
    body = twiml.dial("+14155550100", announce="Hold on <Hangup/> & co", caller_id="+15550001111",
                      timeout=20, action="https://voice.example.com/twilio/dial-ended")
    root = ET.fromstring(body)
    say, dial = list(root)
    assert say.tag == "Say" and say.text == "Hold on <Hangup/> & co"  # text, not a verb
    assert dial.attrib == {"callerId": "+15550001111", "timeout": "20",
                           "action": "https://voice.example.com/twilio/dial-ended"}
    assert [(n.tag, n.text) for n in dial] == [("Number", "+14155550100")]
    sip = ET.fromstring(twiml.dial("sip:desk@pbx.example.com"))
    assert [(n.tag, n.text) for n in sip.find("Dial") or []] == \
        [("Sip", "sip:desk@pbx.example.com")]


@given(st.text(max_size=300))
def test_any_announcement_gives_well_formed_twiml(announce):
    root = ET.fromstring(twiml.dial("+14155550100", announce=announce))
    assert root.find("Dial") is not None


def test_connect_with_an_action_has_nothing_after_it():
    with_action = ET.fromstring(twiml.connect_stream("wss://h/media-stream/t", {"from": "+1"},
                                                     "<Say>sorry</Say>", "https://h/a"))
    assert [v.tag for v in with_action] == ["Connect"]
    assert with_action[0].get("action") == "https://h/a"
    without = ET.fromstring(twiml.connect_stream("wss://h/m", {}, "<Say>sorry</Say>"))
    assert [v.tag for v in without] == ["Connect", "Say"]


# -- config ------------------------------------------------------------------------------------


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return caught.value.problems


def test_transfer_config_is_checked_key_by_key():
    found = problems({"transfer": {"default": "nobody", "caller_id": "555",
                                   "no_answer_twiml": "<Say>unclosed",
                                   "to": {"sales": "4155550100", "bad name!": "+14155550100",
                                          "pbx": "sip:desk@pbx.example.com"}}})
    assert any(p.startswith("transfer.to.sales: must be a \"+E164\" number") for p in found)
    assert any(p.startswith('transfer.to."bad name!": a name is') for p in found)
    assert any(p.startswith("transfer.default: 'nobody' is not a name") for p in found)
    assert any(p.startswith("transfer.caller_id: must be") for p in found)
    assert any(p.startswith("transfer.no_answer_twiml: not valid TwiML") for p in found)
    assert not any(p.startswith("transfer.to.pbx") for p in found)


def test_keypad_and_account_sid_are_checked():
    found = problems({"keypad": {"template": "no placeholder", "finish_on": "##"},
                      "twilio": {"account_sid": "ACnothex"}})
    assert "keypad.template: must contain {digits}" in found
    assert any(p.startswith("keypad.finish_on: must be one key") for p in found)
    assert any(p.startswith("twilio.account_sid: must be AC") for p in found)


# -- the keypad collector ---------------------------------------------------------------------


class Told:
    def __init__(self) -> None:
        self.notices: list[tuple[float, object]] = []

    async def tell(self, notice: object) -> None:
        self.notices.append((trio.current_time(), notice))


async def press_and_collect(config: KeypadConfig, presses: list[tuple[float, str]],
                            wait: float = 10.0) -> list[tuple[float, object]]:
    keypad = Keypad(config)
    told = Told()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keypad.run, told)
        start = trio.current_time()
        for at, key in presses:
            await trio.sleep_until(start + at)
            keypad.press(key)
        await trio.sleep(wait)
        nursery.cancel_scope.cancel()
    return [(round(t - start, 3), n) for t, n in told.notices]


async def test_each_key_is_passed_on_at_once_by_default(autojump_clock):
    told = await press_and_collect(KeypadConfig(), [(1.0, "1"), (1.5, "#")])
    assert told == [(1.0, KeypadEntry("1")), (1.5, KeypadEntry("#"))]


async def test_collected_entries_end_at_the_finish_key_or_the_timeout(autojump_clock):
    config = KeypadConfig(collect=True, inter_digit_timeout=2.0)
    told = await press_and_collect(config, [(1.0, "1"), (1.5, "2"), (2.0, "#"), (3.0, "7"),
                                            (3.5, "8")])
    assert told == [(2.0, KeypadEntry("12#")), (5.5, KeypadEntry("78"))]


async def test_a_long_entry_is_passed_on_in_parts(autojump_clock):
    config = KeypadConfig(collect=True, max_digits=3)
    told = await press_and_collect(config, [(0.1 * i, str(i)) for i in range(1, 8)])
    assert [n for _, n in told] == [KeypadEntry("123"), KeypadEntry("456"), KeypadEntry("7")]


async def test_keys_can_be_kept_from_the_assistant(autojump_clock):
    assert await press_and_collect(KeypadConfig(forward=False), [(1.0, "1")]) == []


# -- the generic protocol -------------------------------------------------------------------


def test_generic_assistants_ask_for_transfers_and_keys():
    assert translate('{"type":"transfer","to":"sales","announce":"One moment"}') == \
        TransferRequested("sales", "One moment")
    assert translate('{"type":"transfer"}') == TransferRequested("", "")
    assert translate('{"type":"send-dtmf","digits":"1w2#"}') == DigitsRequested("1w2#")
    for bad in ('{"type":"transfer","to":5}', '{"type":"send-dtmf"}',
                '{"type":"send-dtmf","digits":["1"]}',
                json.dumps({"type": "transfer", "announce": "x" * 5000})):
        with pytest.raises(ProtocolError):
            translate(bad)


def test_generic_assistants_are_told_in_the_documented_shapes():
    assert json.loads(notice_message(KeypadEntry("123#"))) == {"type": "dtmf", "digits": "123#"}
    assert json.loads(notice_message(Transferred("sales"))) == \
        {"type": "transferred", "to": "sales"}
    assert json.loads(notice_message(TransferRefused("ceo", "not allowed"))) == \
        {"type": "transfer-refused", "to": "ceo", "reason": "not allowed"}
    assert json.loads(notice_message(AnsweredBy("machine_end_beep"))) == \
        {"type": "answered-by", "value": "machine_end_beep"}
    assert json.loads(notice_message(AnsweredBy("nonsense"))) == \
        {"type": "answered-by", "value": "unknown"}


def test_generic_assistants_send_transcripts():
    assert translate('{"type":"transcript","role":"assistant","text":"Hello there"}') == \
        Transcript("assistant", "Hello there")
    assert translate('{"type":"transcript","role":"user","text":"hi"}') == \
        Transcript("user", "hi")
    assert translate('{"type":"transcript","role":"user","text":""}') is None
    long = translate(json.dumps({"type": "transcript", "role": "user", "text": "x" * 9000}))
    assert long == Transcript("user", "x" * MAX_TRANSCRIPT_CHARS)  # cut, not refused
    for bad in ('{"type":"transcript","role":"system","text":"x"}',
                '{"type":"transcript","text":"x"}',
                '{"type":"transcript","role":"user","text":5}'):
        with pytest.raises(ProtocolError):
            translate(bad)


# -- where the action request finds what a call's end left -----------------------------------


async def test_the_workers_directory_keeps_it_once_and_refuses_odd_names(tmp_path):
    from voxd.shared_state import DirectoryAfterStream

    store = DirectoryAfterStream(tmp_path)
    sid = "CA" + "1" * 32
    assert await store.put(sid, "<Response><Hangup/></Response>", 60)
    assert await DirectoryAfterStream(tmp_path).take(sid) == "<Response><Hangup/></Response>"
    assert await store.take(sid) is None  # taken once
    assert not await store.put("../../etc/x", "<Response/>", 60)
    assert await store.take("../../etc/x") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert await store.put(sid, "<Response/>", -1)  # expired
    assert await store.take(sid) is None


async def test_a_directory_that_fails_is_one_line_not_a_crash(tmp_path, caplog):
    from voxd.shared_state import DirectoryAfterStream

    store = DirectoryAfterStream(tmp_path / "gone")
    assert not await store.put("CA" + "2" * 32, "<Response/>", 60)
    assert any("cannot keep what follows" in r.getMessage() for r in caplog.records)

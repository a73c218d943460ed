"""The call's record without a call: bounds, the file format both ways, the timeline a person
reads, malformed files, and `voxd show`'s refusal of anything but a CallSid."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from voxd.call_record import (
    BargeIn,
    CallRecord,
    Ended,
    Pressed,
    RecordError,
    Started,
    Transcribed,
    Transfer,
    Turn,
    parse_record,
    read_record,
    render,
    show_command,
)

SID = "CA" + "0123456789abcdef" * 2


def a_call(*, log_digits: bool = False) -> CallRecord:
    """A known call: two turns, a barge-in, a key, a refused and a placed transfer,
    transcripts both ways, the end."""
    record = CallRecord()
    record.started(0.0, SID, "MZ" + "f" * 32, from_number="+15005550006",
                   to_number="+15005550001", direction="inbound",
                   at="2025-05-01T09:30:00.000+00:00", assistant="vapi")
    record.transcript(1.9, "user", "Hello?")
    record.turn(2.46, 1, 0.4119)
    record.transcript(3.8, "assistant", "Hi! How can I help?")
    record.barge_in(4.2, "vad", 1.74, 0.62)
    record.pressed(5.0, "7" if log_digits else None)
    record.transfer(5.5, "ceo", "refused", "not a destination in [transfer.to]")
    record.turn(6.1, 2, 0.3)
    record.transfer(7.0, "sales", "decided")
    record.transfer_result("placed")
    record.ended(8.25, "transferred:sales", duration=8.4, frames_in=412, frames_out=230,
                 dropped_in=0, dropped_out=31, turns=2, latency_p50=0.3, latency_p95=0.412,
                 barge_ins=1)
    return record


def test_the_record_round_trips_through_json_lines():
    record = a_call()
    data = record.to_jsonl()
    lines = data.decode().splitlines()
    assert len(lines) == len(record.events) == 10 and data.endswith(b"\n")
    first = json.loads(lines[0])
    assert first["event"] == "start" and first["from"] == "+15005550006" and first["t"] == 0.0
    assert json.loads(lines[2]) == {"event": "turn", "t": 2.46, "turn": 1, "latency_ms": 412}
    assert json.loads(lines[5]) == {"event": "pressed", "t": 5.0}  # no digits unless asked
    assert parse_record(data) == record.events
    events = parse_record(data)
    assert isinstance(events[0], Started) and isinstance(events[-1], Ended)
    [placed] = [e for e in events if isinstance(e, Transfer) and e.to == "sales"]
    assert placed.result == "placed"
    assert Transcribed(1.9, "user", "Hello?") in events
    assert BargeIn(4.2, "vad", 1740, 620) in events


def test_digits_are_kept_only_when_asked():
    assert Pressed(5.0, "7") in parse_record(a_call(log_digits=True).to_jsonl())
    assert b'"digits"' not in a_call().to_jsonl()


def test_the_record_is_bounded_and_says_what_it_left_out():
    record = CallRecord(max_events=10, max_text=50)
    record.started(0.0, SID, "MZ1")
    for i in range(100):
        record.transcript(i * 0.1, "assistant", "word " * 40)
    record.ended(12.0, "caller-hangup")
    events = parse_record(record.to_jsonl())
    assert len(events) == 10 and isinstance(events[-1], Ended)
    transcripts = [e for e in events if isinstance(e, Transcribed)]
    assert len(transcripts) == 8 and all(len(e.text) == 50 for e in transcripts)
    assert events[-1].events_dropped == 92 and events[-1].texts_cut == 8
    assert "92 event(s) not kept, 8 text(s) cut" in render(events)


def test_the_default_bounds_hold_a_long_chatty_call_to_a_few_megabytes():
    record = CallRecord()
    record.started(0.0, SID, "MZ1")
    for i in range(20_000):
        record.transcript(i, "user", "x" * 10_000)
    record.ended(20_000.0, "max-duration")
    assert len(record.events) == 5000
    assert len(record.to_jsonl()) < 5000 * 2100


def test_roles_other_than_the_call_parties_are_not_kept():
    record = CallRecord()
    record.started(0.0, SID, "MZ1")
    record.transcript(1.0, "system", "secret prompt")
    assert len(record.events) == 1


def test_the_timeline_reads_as_the_call_went():
    text = render(parse_record(a_call().to_jsonl()))
    expected = f"""\
call {SID}  stream MZ{"f" * 32}  from +15005550006 to +15005550001
  started 2025-05-01T09:30:00.000+00:00, direction inbound, assistant vapi

      0.00s  call started
      1.90s  caller: "Hello?"
      2.46s  turn 1: the assistant answers, 412 ms after the caller stopped at 2.05s
      3.80s  assistant: "Hi! How can I help?"
      4.20s  barge-in (vad): the caller heard 1740 ms of the assistant's turn; 620 ms dropped
      5.00s  keypad: pressed
      5.50s  transfer to ceo: refused (not a destination in [transfer.to])
      6.10s  turn 2: the assistant answers, 300 ms after the caller stopped at 5.80s
      7.00s  transfer to sales: placed
      8.25s  call ended: transferred:sales

  duration 8.4s, turns 2 (latency p50 300 ms, p95 412 ms), barge-ins 1, frames in 412 / out \
230, dropped in 0 / out 31"""
    assert text == expected


def test_untrusted_text_is_escaped_on_the_terminal():
    record = CallRecord()
    record.started(0.0, SID, "MZ1")
    record.transcript(1.0, "assistant", "bye\x1b[2J\nfake line")
    record.ended(2.0, "caller-hangup")
    text = render(parse_record(record.to_jsonl()))
    assert "\x1b" not in text and "bye\\x1b[2J\\x0afake line" in text


@pytest.mark.parametrize(("lines", "words"), [
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}', "{not json"],
     "line 2: not JSON"),
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}',
      '{"event":"turn","t":"soon","turn":1,"latency_ms":3}'], "line 2: not a call record event"),
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}',
      '{"event":"turn","t":-1,"turn":1,"latency_ms":3}'], "line 2: not a call record event"),
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}',
      '{"event":"transcript","t":1,"role":"system","text":"x"}'], "line 2:"),
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}',
      '{"event":"teleport","t":1}'], "line 2:"),
    (['{"event":"turn","t":1,"turn":1,"latency_ms":3}'], "line 1: a record begins with"),
    (['{"event":"start","t":0,"call_sid":"CA1","stream_sid":"MZ1"}',
      '{"event":"end","t":1,"reason":"x"}', '{"event":"pressed","t":2}'],
     "line 3: an event after the end"),
    ([], "empty"),
])
def test_a_malformed_record_names_its_file_and_line(tmp_path, lines, words):
    path = tmp_path / f"{SID}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError) as caught:
        read_record(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message, message
    assert "\n" not in message


def show_args(call_sid: str, directory: Path, plot: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(call_sid=call_sid, directory=directory, plot=plot, config=None)


@pytest.mark.parametrize("call_sid", [
    "../../etc/passwd", f"{SID}/../x", "CA" + "0" * 31, "CA" + "G" * 32, SID.upper(),
    f"{SID}.jsonl", "", f"../{SID}",
])
def test_show_takes_nothing_but_a_call_sid_near_a_path(tmp_path, capsys, call_sid):
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd.jsonl").write_bytes(a_call().to_jsonl())
    directory = tmp_path / "recordings"
    directory.mkdir()
    assert show_command(show_args(call_sid, directory)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("voxd: not a CallSid") and err.count("\n") == 1


def test_show_prints_the_timeline_or_says_there_is_none(tmp_path, capsys):
    assert show_command(show_args(SID, tmp_path)) == 1
    assert capsys.readouterr().err == f"voxd: no record of {SID} in {tmp_path}\n"
    (tmp_path / f"{SID}.jsonl").write_bytes(a_call().to_jsonl())
    assert show_command(show_args(SID, tmp_path)) == 0
    assert "turn 1: the assistant answers, 412 ms" in capsys.readouterr().out
    (tmp_path / f"{SID}.jsonl").write_text('{"event":"start"}\n')
    assert show_command(show_args(SID, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"voxd: {tmp_path / SID}.jsonl, line 1: not a call record event")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_record_says_whose_it_is(tmp_path, capsys):
    path = tmp_path / f"{SID}.jsonl"
    path.write_bytes(a_call().to_jsonl())
    path.chmod(0)
    assert show_command(show_args(SID, tmp_path)) == 1
    assert "permission denied" in capsys.readouterr().err


def test_turn_and_barge_in_events_are_typed():
    events = parse_record(a_call().to_jsonl())
    assert [e.turn for e in events if isinstance(e, Turn)] == [1, 2]


def test_without_matplotlib_the_plot_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / f"{SID}.jsonl").write_bytes(a_call().to_jsonl())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert show_command(show_args(SID, tmp_path, plot=tmp_path / "call.png")) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "voxd: the plot needs matplotlib: pip install 'voxd[plot]'\n"
    assert not (tmp_path / "call.png").exists()

"""The README's reference tables say what the code does: the configuration table's defaults are
the config's defaults, and the end-reason table has exactly the end-of-call policy's rows."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

from voxd.call.ending import POLICY
from voxd.config import Config

README = (Path(__file__).parents[2] / "README.md").read_text()


def _table_rows(heading_text: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line containing `heading_text`."""
    lines = README[README.index(heading_text):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def _code_default(dotted: str) -> object:
    section, key = dotted.split(".", 1)
    return Config().model_dump()[section][key]


def test_every_documented_default_is_the_configs_default():
    rows = _table_rows("Every key, with its default when the key is absent")
    checked = 0
    for key_cell, default_cell, _meaning in rows:
        keys = re.fullmatch(r"`([a-z_]+\.[a-z_]+)`", key_cell)
        literal = re.fullmatch(r"`([^`]*)`", default_cell)
        if not keys or not literal:  # several keys in one row, or a default told in words
            continue
        documented = tomllib.loads(f"value = {literal.group(1)}")["value"]
        assert documented == _code_default(keys.group(1)), key_cell
        checked += 1
    assert checked > 60, f"only {checked} rows parsed: has the table's layout changed?"


def test_every_config_key_is_in_the_table():
    rows = _table_rows("Every key, with its default when the key is absent")
    documented = " ".join(row[0] for row in rows)
    for section, fields in Config().model_dump().items():
        for key in fields:
            assert f"`{section}.{key}`" in documented or f".{key}`" in documented, \
                f"{section}.{key} is missing from the README's configuration table"


def test_the_end_reason_table_is_the_policy_table():
    rows = _table_rows("Each call's `reason=` is one of these")
    documented = {}
    for reason, outcome, level, _caller, _when in rows:
        kind = re.fullmatch(r"`([a-z-]+)(?::[A-Z]+)?`", reason)
        assert kind, reason
        documented[kind.group(1)] = (outcome, level)
    assert documented == {kind: (row.outcome, logging.getLevelName(row.level))
                          for kind, row in POLICY.items()}

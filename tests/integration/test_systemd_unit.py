"""The shipped unit passes systemd's own checks (exposure <= 2.0, verify clean)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "systemd" / "voxd.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed "
                                       "(Debian: apt-get install systemd)")


def test_exposure_is_at_most_2():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for voxd.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_verify_is_clean(tmp_path):
    # The unit names the install location; verify a copy that runs this checkout's voxd.
    voxd = Path(sys.executable).parent / "voxd"
    unit = tmp_path / "voxd.service"
    unit.write_text(UNIT.read_text().replace("/opt/voxd/.venv/bin/voxd", str(voxd)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "voxd.service" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr

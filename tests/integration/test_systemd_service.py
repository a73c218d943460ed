"""The shipped unit under a real systemd: deploy/systemd-test/run.py installs voxd into a Debian 12
container as README.md says and drives it with systemctl (start to READY, a call, reloads good
and bad, the journal's warnings, /metrics, a drain on stop, the watchdog).

Runs where the machine can: as root, with systemd-nspawn, nsenter and debootstrap (installed
here with Debian's apt when missing), building the container's tree the first time (about two
minutes, from the Debian mirror and the package index this host uses) and keeping it in
/var/cache/voxd-systemd-test (about 50 s a run after that). VOXD_SYSTEMD_TEST=0 skips it.

    apt-get install systemd-container debootstrap      # once, as root
    VOXD_SYSTEMD_TEST=1 .venv/bin/python -m pytest -q -m systemd
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.system_tools import missing_after_apt

RUN = Path(__file__).parents[2] / "deploy" / "systemd-test" / "run.py"
WANTED = os.environ.get("VOXD_SYSTEMD_TEST", "")
HOW = ("as root: apt-get install systemd-container debootstrap, then "
       "VOXD_SYSTEMD_TEST=1 .venv/bin/python -m pytest -q -m systemd")


TOOLS = ("systemd-nspawn", "nsenter", "debootstrap")


def _cannot() -> str | None:
    if WANTED == "0":
        return "VOXD_SYSTEMD_TEST=0"
    if sys.platform != "linux" or os.geteuid() != 0:
        return f"needs root to boot a container ({HOW})"
    return None


pytestmark = [pytest.mark.systemd, pytest.mark.skipif(bool(_cannot()), reason=_cannot() or "")]


def test_the_unit_under_systemd():
    missing = missing_after_apt(TOOLS, ("systemd-container", "debootstrap"))
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed and apt-get could not ({HOW})")
    args = [sys.executable, str(RUN)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the script powers its container off on SIGTERM
            out, err = proc.communicate(timeout=60)
            pytest.fail("the systemd test took over 25 minutes:\n" + out[-6000:] + err[-4000:])
    if proc.returncode == 77:
        reason = (err.strip().splitlines() or ["?"])[-1].removeprefix("SKIP: ")
        pytest.skip(f"{reason}; to run it: {HOW}")
    assert proc.returncode == 0, out[-6000:] + err[-4000:]

"""System tools some tests need (redis-server, nginx, systemd-nspawn, ...): installed with
Debian's apt when they are missing and the tests run as root, so `.ci/run` on a fresh machine
runs those tests too; elsewhere the tests skip, saying which tool is missing."""

from __future__ import annotations

import os
import shutil
import subprocess


def missing_after_apt(binaries: tuple[str, ...], packages: tuple[str, ...]) -> list[str]:
    """The `binaries` still missing after trying `apt-get install packages` (only as root,
    where apt-get exists, and only if some are missing)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return missing
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        try:
            subprocess.run(command, capture_output=True, timeout=300, check=False, env=env)
        except subprocess.TimeoutExpired:
            break
    return [b for b in binaries if shutil.which(b) is None]

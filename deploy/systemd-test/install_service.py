#!/usr/bin/env python3
"""`voxd install-service` under a real systemd: in the container run.py builds (Debian 12,
systemd 252), voxd is pip-installed into /opt/voxd/.venv and installed as README.md says, then
started, run again, and installed as two instances (voxd@.service) the way deploy/nginx needs.

    sudo python3 deploy/systemd-test/install_service.py    # exit 0 passed, 1 failed, 77 skip

Needs what run.py needs (root, systemd-nspawn, nsenter; its cached tree, which run.py builds).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("voxd_systemd_test", HERE / "run.py")
assert _spec is not None and _spec.loader is not None
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

CACHE = Path("/var/cache/voxd-systemd-test")
URL = "https://voice.example.com"
VOXD = "/opt/voxd/.venv/bin/voxd"


def drive(box: rt.Container) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append((name, ok, detail))
        rt.say(f"{'ok  ' if ok else 'FAIL'} {name}"
               + (f"\n{detail[-3000:]}" if detail and not ok else ""))

    def sh(command: str, timeout: float = 120) -> tuple[int, str]:
        result = box.sh(command, timeout=timeout)
        return result.returncode, result.stdout + result.stderr

    code, out = sh(f"python3 -m venv /opt/voxd/.venv && /opt/voxd/.venv/bin/pip install -q "
                   f"--no-index --find-links {rt.WHEELS} {rt.SRC}", timeout=600)
    if code != 0:
        raise rt.Failed(f"pip install failed: {out[-3000:]}")
    code, out = sh(f"{VOXD} install-service --help")
    wired = code == 0
    install = (f"{VOXD} install-service" if wired else
               "/opt/voxd/.venv/bin/python -c 'import argparse, sys; from voxd import install; "
               "p = argparse.ArgumentParser(); install.add_parser(p.add_subparsers("
               "dest=\"command\")); sys.exit(install.run(p.parse_args(sys.argv[1:])))' "
               "install-service")
    if not wired:
        rt.say("     (voxd/cli.py does not wire install-service in yet: called through "
               "voxd.install)")

    code, out = sh(f"{install} --public-url {URL} --dry-run; echo rc=$?; ls /etc/voxd")
    check("--dry-run shows the plan and writes nothing",
          "rc=0" in out and "would create" in out and "No such file" in out, out)

    code, out = sh(f"{install} --public-url {URL}")
    modes = sh("stat -c '%a %U %n' /etc/voxd /etc/voxd/credentials "
               "/etc/voxd/credentials/twilio_auth_token /etc/voxd/voxd.toml "
               "/etc/systemd/system/voxd.service")[1]
    check("install-service writes config, credentials and unit, check-config ok",
          code == 0 and "check-config: ok:" in out and modes.split("\n")[:5] == [
              "755 root /etc/voxd", "700 root /etc/voxd/credentials",
              "600 root /etc/voxd/credentials/twilio_auth_token", "644 root /etc/voxd/voxd.toml",
              "644 root /etc/systemd/system/voxd.service"], out + modes)
    code, out = sh("grep ^ExecStart= /etc/systemd/system/voxd.service")
    check("the unit runs the voxd installed", f"ExecStart={VOXD} serve" in out, out)

    sh("systemctl daemon-reload && systemctl enable --now voxd", timeout=120)
    time.sleep(2)
    journal = box.journal("-p", "warning")
    check("started before the token is filled: the journal says which file is empty",
          "credential file /run/credentials/voxd.service/twilio_auth_token is empty" in journal,
          journal)

    sh("printf %s test-auth-token > /etc/voxd/credentials/twilio_auth_token && "
       "systemctl restart voxd", timeout=120)
    code, out = sh("systemctl is-active voxd; curl -sS http://127.0.0.1:3000/readyz")
    check("token filled: voxd is active and ready, signatures on",
          out.split() == ["active", "ready"] and "signatures on" in box.journal(), out)

    code, out = sh(install)
    check("a second run changes nothing", code == 0 and "nothing to change" in out, out)

    code, out = sh(f"{install} --public-url {URL} --instance 3001 --instance 3002")
    check("--instance 3001 --instance 3002 installs voxd@.service and two configs",
          code == 0 and out.count("check-config: ok:") == 2, out)
    sh("head -c 32 /dev/urandom | base64 > /etc/voxd/credentials/stream_secret && "
       "systemctl daemon-reload && systemctl enable --now voxd@3001 voxd@3002", timeout=120)
    code, out = sh("systemctl is-active voxd@3001 voxd@3002; "
                   "curl -sS http://127.0.0.1:3001/readyz; echo; "
                   "curl -sS http://127.0.0.1:3002/readyz; echo; "
                   "test -d /var/lib/voxd-3001 && test -d /var/lib/voxd-3002 && echo dirs")
    check("both instances active and ready, each with its state directory",
          out.split() == ["active", "active", "ready", "ready", "dirs"], out)
    code, out = sh("systemctl reload voxd@3001 && journalctl -q --no-pager -o cat "
                   "-u voxd@3001 | grep -c 'reloaded /etc/voxd/3001.toml'")
    check("systemctl reload voxd@3001 reloads its own file", code == 0, out)
    return results


def main() -> int:
    try:
        rt.preflight()
        root = CACHE / "rootfs"
        if not (root / "etc/voxd-systemd-test").is_file():
            raise rt.Skip(f"no cached container in {CACHE}: run deploy/systemd-test/run.py "
                          "--build-only first")
        with rt.source_copy() as src, tempfile.TemporaryDirectory(prefix="voxd-inst-") as work:
            box = rt.Container(root, src, Path(work) / "console.log")
            try:
                box.boot()
                results = drive(box)
            finally:
                box.shutdown()
    except rt.Skip as exc:
        print(f"SKIP: {exc}", file=sys.stderr)
        return rt.SKIP
    except rt.Failed as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    failed = [name for name, ok, _ in results if not ok]
    rt.say(f"{len(results) - len(failed)} of {len(results)} checks passed"
           + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

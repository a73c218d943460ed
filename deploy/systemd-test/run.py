#!/usr/bin/env python3
"""Drive the shipped systemd unit with a real systemd: voxd installed into a Debian 12 container
as README.md says ("Run it as a service"), then started, called, reloaded, scraped, stalled and
stopped through systemctl, with the journal read back.

    sudo python3 deploy/systemd-test/run.py            # from a checkout; exit 0 = all passed

Needs root, systemd-nspawn and nsenter (Debian: apt-get install systemd-container debootstrap).
The first run builds the container's root file system (debootstrap from the Debian mirror this
host's apt uses, plus a wheelhouse of voxd's dependencies from the package index pip uses here;
a few minutes) and caches it in /var/cache/voxd-systemd-test (--cache); later runs need no
network. Each run boots the cached tree with --volatile=overlay (nothing it does is kept) and
--private-network (the container has only its own loopback). Exit codes: 0 passed, 1 failed,
77 cannot run on this machine (the reason is the last line of stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SKIP = 77
CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,curl,ca-certificates,procps"
# Not systemd-coredump: installing it sets the host's kernel.core_pattern (a shared sysctl).
WHEELS = "/var/cache/voxd-wheels"  # inside the container
SRC = "/opt/voxd-src"  # the checkout's copy, inside the container
PORT = 3000  # the shipped voxd.toml's; the container's loopback is its own
TOKEN = "systemd-test-auth-token"
PROMISED = [  # interface.md and README.md "Metrics"
    "voxd_calls_active", "voxd_calls_total", "voxd_calls_rejected_total",
    "voxd_media_frames_total", "voxd_media_frames_dropped_total",
    "voxd_upstream_connect_seconds", "voxd_turn_latency_seconds", "voxd_barge_ins_total",
    "voxd_errors_total", "voxd_process_cpu_seconds", "voxd_process_resident_memory_bytes",
    "voxd_trio_tasks", "process_open_fds", "process_max_fds", "process_cpu_seconds_total",
    "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_start_time_seconds",
]


class Skip(Exception):
    """This machine cannot run the test (not a failure of voxd or its unit)."""


class Failed(Exception):
    """A check failed."""


def say(text: str) -> None:
    print(text, flush=True)


def run(cmd: list[str], timeout: float = 600, check: bool = True,
        **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise Failed(f"{shlex.join(cmd)} exited {result.returncode}:\n"
                     f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


# ---------------------------------------------------------------- what this machine can do


def preflight() -> None:
    if sys.platform != "linux":
        raise Skip("needs Linux")
    if os.geteuid() != 0:
        raise Skip("needs root (systemd-nspawn boots a container)")
    missing = [tool for tool in ("systemd-nspawn", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed (Debian: apt-get install "
                   "systemd-container util-linux)")


def host_mirror() -> str:
    """The Debian mirror this host's apt uses for bookworm (else deb.debian.org)."""
    if env := os.environ.get("VOXD_SYSTEMD_TEST_MIRROR"):
        return env
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get(
                    "Types", "").split():
                return fields["URIs"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    return "http://deb.debian.org/debian"


def reachable(url: str) -> str | None:
    """None if `url` answers, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            response.read(1)
        return None
    except Exception as exc:  # any failure means: cannot build here
        return str(exc)


# ---------------------------------------------------------------- the cached root file system


def pip_context() -> tuple[list[Path], dict[str, str], list[str]]:
    """How pip on this host reaches its package index: its config files, its PIP_* variables
    and the local paths they name (file:// indexes, find-links), so pip in the container finds
    the same packages."""
    home = Path.home()
    files = [p for p in (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"),
                         home / ".config/pip/pip.conf", home / ".pip/pip.conf") if p.is_file()]
    files += [Path(p) for p in glob.glob("/etc/xdg/pip/*") if Path(p) not in files]
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    text = "\n".join([*(p.read_text() for p in files), *env.values()])
    local = set()
    for path in re.findall(r"(?:file://)?(/[^\s'\"]+)", text):
        path = path.rstrip("/")
        if path.endswith("/simple"):  # a local index's pages link to files beside it
            path = path.rsplit("/", 1)[0]
        if Path(path).exists() and not path.startswith(("/etc/", "/usr/")):
            local.add(path)
    return files, env, sorted(local)


def nspawn_run(root: Path, command: str, *, binds: tuple[str, ...] | list[str] = (),
               rw_binds: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None,
               network: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """One command in the tree (no boot)."""
    cmd = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    cmd += [f"--bind-ro={path}" for path in binds]
    cmd += [f"--bind={path}" for path in rw_binds]
    cmd += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
    if not network:
        cmd.append("--private-network")
    return run([*cmd, "/bin/sh", "-ec", command], timeout=timeout)


def fill_wheelhouse(root: Path) -> None:
    """Wheels of voxd's dependencies (and its build backend) into the tree, from the package
    index this host's pip uses: installs from then on need no network."""
    _, env, local = pip_context()
    with source_copy() as src:
        nspawn_run(root, f"rm -rf /tmp/w && python3 -m venv /tmp/w && "
                         f"/tmp/w/bin/pip install -q --upgrade pip && "
                         f"/tmp/w/bin/pip wheel -q --wheel-dir {WHEELS} setuptools wheel {SRC} "
                         f"&& rm -f {WHEELS}/voxd-*.whl && rm -rf /tmp/w",
                   binds=local, rw_binds=[f"{src}:{SRC}"], env=env)


def build_rootfs(root: Path) -> None:
    mirror = host_mirror()
    if (why := reachable(mirror.rstrip("/") + "/dists/bookworm/Release")) is not None:
        raise Skip(f"no cached container and the Debian mirror {mirror} is unreachable ({why})")
    if shutil.which("debootstrap") is None:
        raise Skip("debootstrap not installed (Debian: apt-get install debootstrap)")
    new = root.with_name(root.name + ".new")
    started = time.monotonic()
    if not (new / "etc/voxd-systemd-test.base").is_file():  # else kept from a build cut short
        shutil.rmtree(new, ignore_errors=True)
        say(f"building the container in {root} (debootstrap from {mirror}, about a minute) ...")
        run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(new),
             mirror], timeout=1200)
        (new / "etc/voxd-systemd-test.base").write_text("debootstrap done\n")
    # This host's extra CAs (a TLS-inspecting proxy's, a private index's) and pip settings.
    for crt in glob.glob("/usr/local/share/ca-certificates/*.crt"):
        shutil.copy(crt, new / "usr/local/share/ca-certificates/")
    files, _, _ = pip_context()
    for path in files:
        target = new / str(path).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    nspawn_run(new, "update-ca-certificates >/dev/null && systemctl mask "
                    "systemd-networkd-wait-online.service >/dev/null 2>&1 || true",
               network=False)
    say("filling the wheelhouse (voxd's dependencies, from the package index) ...")
    fill_wheelhouse(new)
    (new / "etc/voxd-systemd-test").write_text("built by deploy/systemd-test/run.py\n")
    new.rename(root)
    say(f"built in {time.monotonic() - started:.0f}s")


@contextlib.contextmanager
def source_copy() -> Iterator[Path]:
    """The checkout as it is now (uncommitted changes too), without its venv and caches."""
    with tempfile.TemporaryDirectory(prefix="voxd-src-", dir="/var/tmp") as tmp:
        dest = Path(tmp) / "voxd"
        shutil.copytree(CHECKOUT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache",
            ".ruff_cache", ".hypothesis", "data"))
        shutil.copytree(CHECKOUT / "voxd" / "data", dest / "voxd" / "data")
        yield dest


# ---------------------------------------------------------------- the booted container


class Container:
    """The cached tree booted with systemd as PID 1; commands run inside with nsenter."""

    def __init__(self, root: Path, src: Path, log: Path) -> None:
        self.root, self.src, self.log = root, src, log
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0

    def boot(self) -> None:
        self.pid1 = 0  # a second boot (after refilling the wheelhouse) must find its own PID 1
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit",
                 "--boot", "--volatile=overlay", "--private-network", "--console=read-only",
                 f"--bind={self.src}:{SRC}", f"--machine=voxd-test-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 90
        while not self.pid1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failed("the container did not boot:\n" + self.log.read_text()[-3000:])
            self.pid1 = self._find_pid1()
            time.sleep(0.2)
        # Right after PID 1 appears its bus may not answer yet: systemctl then prints nothing
        # (or "offline"), so ask again until the boot is over or the deadline passes.
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running --wait || true",
                            timeout=120).stdout.strip()
            if state not in ("", "offline", "initializing", "starting"):
                break
            time.sleep(0.5)
        if state not in ("running", "degraded"):
            raise Failed(f"container's systemd is {state!r}:\n" + self.log.read_text()[-3000:])

    def _find_pid1(self) -> int:
        """The container's systemd: the descendant of nspawn that is PID 1 in its namespace."""
        assert self.proc is not None
        for status in glob.glob("/proc/[0-9]*/status"):
            with contextlib.suppress(OSError):
                text = Path(status).read_text()
                nspid = re.search(r"^NSpid:\s+(.+)$", text, re.M)
                if not nspid or nspid.group(1).split()[-1] != "1" or len(
                        nspid.group(1).split()) < 2:
                    continue
                pid = int(nspid.group(1).split()[0])
                if self._descends(pid):
                    return pid
        return 0

    def _descends(self, pid: int) -> bool:
        assert self.proc is not None
        while pid > 1:
            if pid == self.proc.pid:
                return True
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        return False

    def _enter(self, command: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-a", "--", "/usr/bin/env", "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "/bin/sh", "-c", command]

    def sh(self, command: str, timeout: float = 120,
           check: bool = False) -> subprocess.CompletedProcess[str]:
        """A shell command inside; returns the result (raises Failed if `check` and not 0)."""
        return run(self._enter(command), timeout=timeout, check=check)

    def spawn(self, command: str, out: Path) -> subprocess.Popen:
        with out.open("w") as f:
            return subprocess.Popen(self._enter(command), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show voxd -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.sh(f"journalctl -q --no-pager -o cat -u voxd {shlex.join(args)}").stdout

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nspawn powers the container off
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------- the checks


class Checks:
    def __init__(self, box: Container, workdir: Path) -> None:
        self.box, self.workdir = box, workdir
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if not ok:  # what voxd and systemd said last
            detail += "\n     the journal's last lines:\n" + textwrap.indent(
                self.box.sh("journalctl -q --no-pager -n 15 -o short-monotonic").stdout,
                "       ")
        self.results.append((name, ok, detail))
        say(f"{'ok  ' if ok else 'FAIL'} {name}" + (f"\n     {detail}" if detail and not ok
                                                   else f" ({detail})" if detail else ""))
        return ok

    def wait(self, what, timeout: float, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            if value := what():
                return value
            if time.monotonic() > deadline:
                return value
            time.sleep(interval)

    def voxd(self, args: str) -> str:
        return f"/opt/voxd/.venv/bin/voxd {args}"

    def call(self, seconds: float) -> str:
        return self.voxd(f"call http://127.0.0.1:{PORT}/twilio/voice --seconds {seconds} "
                         f"--auth-token {TOKEN}")

    def metric(self, name: str) -> float | None:
        text = self.box.sh(f"curl -fsS http://127.0.0.1:{PORT}/metrics").stdout
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match.group(1)) if match else None

    def install(self) -> None:
        """README.md, "Run it as a service", with /opt/voxd-src as /path/to/voxd; pip reads the
        wheelhouse instead of the network; the token is a test one; signatures are on; procps
        is removed first."""
        started = time.monotonic()
        result = self.box.sh(f"""set -e
dpkg --purge procps >/dev/null  # the unit must not need /bin/kill (minimal systems lack it)
python3 -m venv /opt/voxd/.venv && /opt/voxd/.venv/bin/pip install -q --no-index \
    --find-links {WHEELS} {SRC}
cp {SRC}/README.md /opt/voxd/
install -d -m 0755 /etc/voxd && install -m 0644 {SRC}/voxd.toml /etc/voxd/voxd.toml
sed -i 's/^validate_signatures = false/validate_signatures = true/' /etc/voxd/voxd.toml
install -d -m 0700 /etc/voxd/credentials
printf %s '{TOKEN}' > /etc/voxd/credentials/twilio_auth_token
chmod 0600 /etc/voxd/credentials/*
cp {SRC}/systemd/voxd.service /etc/systemd/system/
systemctl daemon-reload""", timeout=600)
        if result.returncode != 0:
            raise Failed("installing voxd as README.md says failed:\n"
                         + (result.stdout + result.stderr)[-3000:])
        say(f"     installed voxd in {time.monotonic() - started:.0f}s")

    def start(self) -> None:
        result = self.box.sh("systemctl enable --now voxd", timeout=120)
        state = self.box.show("ActiveState", "SubState", "StatusText", "MainPID")
        ok = (result.returncode == 0 and state.get("SubState") == "running"
              and state.get("StatusText", "").startswith("ready"))
        self.check("systemctl start voxd reaches READY", ok,
                   f"{state}" if ok else f"{result.stderr.strip()} {state}\n"
                   + self.box.journal("-n", "30"))

    def security(self) -> None:
        out = self.box.sh("systemd-analyze security voxd.service --no-pager | tail -1").stdout
        match = re.search(r"exposure level for voxd.service: ([0-9.]+)", out)
        self.check("systemd-analyze security (the running unit) <= 2.0",
                   bool(match) and float(match.group(1)) <= 2.0, out.strip())

    def simulated_call(self) -> None:
        result = self.box.sh(self.call(4), timeout=60)
        summary = self.box.journal("-g", "call ended")
        self.check("a simulated call succeeds through the service",
                   result.returncode == 0 and "call ended" in summary,
                   (summary.strip().splitlines() or ["-"])[-1] if result.returncode == 0 else
                   result.stdout + result.stderr)

    def metrics(self) -> None:
        text = self.box.sh(f"curl -fsS http://127.0.0.1:{PORT}/metrics").stdout
        missing = [name for name in PROMISED
                   if not re.search(rf"^# TYPE {name} ", text, re.M)]
        empty = [name for name in PROMISED
                 if name.startswith("process_") and not re.search(rf"^{name} ", text, re.M)]
        self.check("/metrics has every promised metric", not missing and not empty,
                   f"{len(PROMISED)} names" if not missing and not empty else
                   f"missing: {missing}, no value: {empty}")
        calls = re.search(r'^voxd_calls_total\{outcome="(\w[\w-]*)"\} (\S+)', text, re.M)
        self.check("/metrics counted the call", bool(calls),
                   calls.group(0) if calls else text[-2000:])

    def reloads(self) -> None:
        pid = self.box.show("MainPID")["MainPID"]
        self.box.sh("sed -i 's/^max_concurrent_calls = .*/max_concurrent_calls = 50/' "
                    "/etc/voxd/voxd.toml")
        good = self.box.sh("systemctl reload voxd")
        reloaded = self.wait(lambda: "max 50 calls" in self.box.journal("-g", "reloaded "), 10)
        self.check("systemctl reload voxd with a good file: new config in use",
                   good.returncode == 0 and bool(reloaded)
                   and self.box.show("MainPID")["MainPID"] == pid,
                   f"reload exited {good.returncode}: {good.stderr.strip()}")
        self.box.sh("cp /etc/voxd/voxd.toml /etc/voxd/voxd.toml.good && "
                    "sed -i 's/^max_concurrent_calls = .*/max_concurrent_calls = -5/' "
                    "/etc/voxd/voxd.toml")
        bad = self.box.sh("systemctl reload voxd")
        time.sleep(1)
        state = self.box.show("ActiveState", "MainPID")
        warnings = self.box.journal("-p", "warning")
        self.check("systemctl reload voxd with a bad file fails, voxd keeps running",
                   bad.returncode != 0 and state == {"ActiveState": "active", "MainPID": pid},
                   f"reload exited {bad.returncode}, {state}")
        self.check("journalctl -u voxd -p warning shows the refused reload",
                   "reload refused" in warnings and "max_concurrent_calls" in warnings,
                   next((line for line in warnings.splitlines() if "reload refused" in line),
                        warnings[-2000:]))
        self.box.sh("mv /etc/voxd/voxd.toml.good /etc/voxd/voxd.toml")

    def drain(self) -> None:
        out = self.workdir / "drained-call.txt"
        caller = self.box.spawn(self.call(6), out)
        active = self.wait(lambda: (self.metric("voxd_calls_active") or 0) >= 1, 15)
        started = time.monotonic()
        stop = self.box.sh("systemctl stop voxd", timeout=200)
        took = time.monotonic() - started
        try:
            caller.wait(timeout=30)
        except subprocess.TimeoutExpired:
            caller.kill()
        journal = self.box.journal("-n", "40")
        result = self.box.show("Result", "ExecMainStatus", "ActiveState")
        ended = [line for line in journal.splitlines() if "call ended" in line]
        self.check("systemctl stop during a call drains it (the call ends on its own, exit 0)",
                   bool(active) and stop.returncode == 0 and caller.returncode == 0
                   and "draining: 1 active call" in journal and ended
                   and "drain-timeout" not in ended[-1] and took > 1
                   and result == {"Result": "success", "ExecMainStatus": "0",
                                  "ActiveState": "inactive"},
                   f"stop took {took:.1f}s; {ended[-1] if ended else 'no call ended line'}"
                   if caller.returncode == 0 and ended else
                   f"caller exit {caller.returncode}: {out.read_text()[-1500:]}\n{journal}")

    def workers(self) -> None:
        """server.workers = 2: `systemctl stop` during a call drains it and the unit ends
        "success", with the shipped KillMode=mixed (SIGTERM to the supervisor alone) and with a
        drop-in saying control-group (systemd's default: every process gets it, as with units
        from before KillMode=mixed); a supervisor killed with SIGKILL is restarted and its
        workers are gone (the new ones can bind the port)."""
        dropin = "/etc/systemd/system/voxd.service.d/test-killmode.conf"
        self.box.sh("cp /etc/voxd/voxd.toml /etc/voxd/voxd.toml.one && sed -i "
                    "'s/^workers = 1 /workers = 2 /' /etc/voxd/voxd.toml", check=True)
        try:
            for mode in ("mixed", "control-group"):
                if mode != "mixed":
                    self.box.sh(f"mkdir -p {Path(dropin).parent} && printf '[Service]\\n"
                                f"KillMode={mode}\\n' > {dropin} && systemctl daemon-reload",
                                check=True)
                start = self.box.sh("systemctl start voxd", timeout=120)
                run_id = self.box.show("InvocationID")["InvocationID"]
                out = self.workdir / f"workers-{mode}-call.txt"
                caller = self.box.spawn(self.call(5), out)
                active = self.wait(lambda: (self.metric("voxd_calls_active") or 0) >= 1, 15)
                stop = self.box.sh("systemctl stop voxd", timeout=200)
                try:
                    caller.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    caller.kill()
                journal = self.box.journal(f"_SYSTEMD_INVOCATION_ID={run_id}")
                result = self.box.show("Result", "ExecMainStatus")
                ended = [line for line in journal.splitlines() if "call ended" in line]
                self.check(f"workers = 2, KillMode={mode}: systemctl stop during a call "
                           "drains it once, exit 0",
                           start.returncode == 0 and "ready: 2 workers" in journal
                           and bool(active) and stop.returncode == 0
                           and caller.returncode == 0 and bool(ended)
                           and "reason=caller-hangup" in ended[-1]
                           and journal.count("draining: ") == 2
                           and "stopping now" not in journal and "Traceback" not in journal
                           and result == {"Result": "success", "ExecMainStatus": "0"},
                           "the call: " + ended[-1].rsplit(" ", 1)[-1] if ended and
                           result.get("Result") == "success" else
                           f"{result}, caller exit {caller.returncode}: "
                           f"{out.read_text()[-800:]}\n{journal[-3000:]}")
            self.box.sh(f"rm {dropin} && systemctl daemon-reload && systemctl start voxd",
                        check=True)
            state = self.box.show("MainPID", "InvocationID")
            before = state["MainPID"]
            pids = [before, *re.findall(r"worker \d started \(pid (\d+)\)", self.box.journal(
                f"_SYSTEMD_INVOCATION_ID={state['InvocationID']}"))]
            self.box.sh(f"kill -KILL {before}", check=True)

            def restarted():
                now = self.box.show("MainPID", "StatusText")
                return now if (now["MainPID"] not in ("0", before)
                               and now["StatusText"].startswith("ready")) else None

            after = self.wait(restarted, 30, interval=0.5)
            left = self.box.sh(f"for p in {' '.join(pids)}; do test -d /proc/$p && echo $p; "
                               "done").stdout.split()
            self.check("workers = 2: a supervisor killed with SIGKILL is restarted and leaves "
                       "no worker behind", bool(after) and len(pids) == 3 and not left,
                       f"{len(pids)} processes before; after: {after}; left: {left}")
        finally:
            self.box.sh(f"rm -f {dropin}; systemctl daemon-reload; systemctl stop voxd; "
                        "systemctl reset-failed voxd; "
                        "mv /etc/voxd/voxd.toml.one /etc/voxd/voxd.toml")

    def startup_failures(self) -> None:
        holder = self.box.spawn(
            f"echo $$ > /run/port-holder.pid; exec python3 -c 'import socket,time; "
            f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind((\"127.0.0.1\", {PORT})); s.listen(); time.sleep(600)'",
            self.workdir / "holder.txt")
        try:
            self.wait(lambda: self.box.sh(f"curl -s -m 1 http://127.0.0.1:{PORT}/ ; "
                                          "echo $?").stdout.strip().endswith("52"), 10)
            busy = self.box.sh("systemctl start voxd", timeout=60)
            warnings = self.wait(lambda: "Address already in use" in (
                text := self.box.journal("-p", "warning")) and text, 10)
            self.check("a port in use: start fails, journalctl -p warning says why",
                       busy.returncode != 0 and bool(warnings),
                       next((line for line in (warnings or "").splitlines()
                             if "cannot listen" in line), "no reason in the journal"))
        finally:  # (nsenter's child lives on if nsenter is killed: end it inside)
            self.box.sh("kill $(cat /run/port-holder.pid)")
            holder.wait(timeout=30)
        self.box.sh("systemctl stop voxd; systemctl reset-failed voxd")
        self.box.sh("cp /etc/voxd/voxd.toml /etc/voxd/voxd.toml.good && "
                    "sed -i 's/^listen = .*/listen = \"nowhere\"/' /etc/voxd/voxd.toml")
        bad = self.box.sh("systemctl start voxd", timeout=60)
        warnings = self.wait(lambda: "expected host:port" in (
            text := self.box.journal("-p", "warning")) and text, 10)
        self.check("a bad config: start fails, journalctl -p warning says why",
                   bad.returncode != 0 and bool(warnings),
                   next((line for line in (warnings or "").splitlines()
                         if "expected host:port" in line), "no reason in the journal"))
        self.box.sh("mv /etc/voxd/voxd.toml.good /etc/voxd/voxd.toml; systemctl stop voxd; "
                    "systemctl reset-failed voxd")

    def watchdog(self) -> None:
        self.box.sh("mkdir -p /etc/systemd/system/voxd.service.d && printf "
                    "'[Service]\\nWatchdogSec=4\\n' > "
                    "/etc/systemd/system/voxd.service.d/test-watchdog.conf && "
                    "systemctl daemon-reload && systemctl start voxd", check=True)
        before = self.box.show("MainPID", "NRestarts")
        time.sleep(5)  # alive across a watchdog period: the loop's pings arrive
        alive = self.box.show("MainPID", "ActiveState")
        self.box.sh(f"kill -STOP {before['MainPID']}", check=True)  # the loop stalls
        started = time.monotonic()

        def restarted():
            now = self.box.show("MainPID", "NRestarts", "SubState")
            return now if (now["MainPID"] not in ("0", before["MainPID"])
                           and now["SubState"] == "running") else None

        after = self.wait(restarted, 60, interval=0.5)
        journal = self.box.journal("-n", "60")
        self.check("a stalled event loop is restarted by the watchdog (WatchdogSec=4)",
                   alive["MainPID"] == before["MainPID"] and bool(after)
                   and "Watchdog timeout" in journal,
                   f"new process after {time.monotonic() - started:.1f}s, NRestarts "
                   f"{before['NRestarts']} -> {after['NRestarts']}" if after else journal)
        self.box.sh("rm -r /etc/systemd/system/voxd.service.d && systemctl daemon-reload")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/voxd-systemd-test"),
                        help="where the container's tree is kept (default %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="build the tree again")
    parser.add_argument("--build-only", action="store_true",
                        help="build (or check) the cached tree, run nothing")
    parser.add_argument("--no-build", action="store_true",
                        help="skip (exit 77) rather than build the tree when it is not cached")
    parser.add_argument("--unit", type=Path, default=CHECKOUT / "systemd" / "voxd.service",
                        help="the unit file to test (default: the shipped one)")
    args = parser.parse_args()
    started = time.monotonic()
    # SIGTERM (a test runner's timeout) unwinds like an error: the container is powered off.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        preflight()
        root = args.cache / "rootfs"
        args.cache.mkdir(parents=True, exist_ok=True)
        if args.rebuild:
            shutil.rmtree(root, ignore_errors=True)
        with (args.cache / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; runs only read the tree
            if not (root / "etc/voxd-systemd-test").is_file():
                if args.no_build:
                    raise Skip(f"no cached container in {args.cache} (build it with "
                               f"{Path(__file__).relative_to(CHECKOUT)} --build-only: about "
                               "two minutes, needs the Debian mirror and the package index)")
                build_rootfs(root)
        probe = subprocess.run(["systemd-nspawn", "-q", "-D", str(root), "--register=no",
                                "--keep-unit", "--volatile=overlay", "/bin/true"],
                               capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            raise Skip(f"systemd-nspawn cannot run a container here: {probe.stderr.strip()}")
        if args.build_only:
            return 0
        return drive(root, args.unit.resolve(), started)
    except Skip as exc:
        print(f"SKIP: {exc}", file=sys.stderr)
        return SKIP
    except Failed as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1


def drive(root: Path, unit: Path, started: float) -> int:
    with source_copy() as src, tempfile.TemporaryDirectory(prefix="voxd-systemd-") as work:
        shutil.copy(unit, src / "systemd" / "voxd.service")
        workdir = Path(work)
        box = Container(root, src, workdir / "console.log")
        try:
            box.boot()
            say(f"     container up in {time.monotonic() - started:.0f}s (systemd pid "
                f"{box.pid1} on the host)")
            checks = Checks(box, workdir)
            if box.sh(f"/usr/bin/test -d {WHEELS}").returncode != 0:
                raise Failed(f"{root} has no wheelhouse: rerun with --rebuild")
            try:
                checks.install()
            except Failed:
                say("     the wheelhouse lacks a dependency: filling it again (network) ...")
                box.shutdown()
                fill_wheelhouse(root)
                box.boot()
                checks.install()
            for step in (checks.start, checks.security, checks.simulated_call, checks.metrics,
                         checks.reloads, checks.drain, checks.workers, checks.startup_failures,
                         checks.watchdog):
                try:
                    step()
                except Failed as exc:
                    checks.check(step.__name__, False, str(exc))
        finally:
            box.shutdown()
    failed = [name for name, ok, _ in checks.results if not ok]
    say(f"{len(checks.results) - len(failed)} of {len(checks.results)} checks passed in "
        f"{time.monotonic() - started:.0f}s" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

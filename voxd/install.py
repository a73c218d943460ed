"""`voxd install-service`: voxd as a systemd service, written and checked in one step.

It writes (as root; `--root DIR` puts every path under DIR, for tests and image builds):
- /etc/voxd/voxd.toml from voxd/data/voxd.production.toml (signatures on, loopback behind a
  proxy, the `--public-url` given), or with `--instance PORT` one /etc/voxd/PORT.toml each;
- /etc/voxd/credentials/ (0700) and, empty, each credential file the unit loads (0600): the
  operator fills them; a secret is never written, read or replaced here;
- /etc/systemd/system/voxd.service (or voxd@.service), the packaged unit with ExecStart= and
  ExecReload= naming the voxd this command runs from (a venv's, typically);
then runs that voxd's `check-config` on the file and prints what is left to do.

Everything is planned before anything is written. A file already there with other content is
kept, and nothing at all is written, unless `--force` (which keeps the old file as FILE.bak);
a second run changes nothing and says so. `--dry-run` prints the plan and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import grp
import ipaddress
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from voxd.config import SECRET_SOURCES, is_loopback_host

TEMPLATE_URL = "https://voice.example.com"
"""The public_url of the packaged template (valid as it is), replaced by --public-url."""
TEMPLATE_LISTEN = "127.0.0.1:3000"
TEMPLATE_RECORDINGS = "/var/lib/voxd/recordings"
SHIPPED_VOXD = "/opt/voxd/.venv/bin/voxd"
"""The voxd the packaged units name; replaced by the voxd being installed."""
HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
"""What the unit hides from voxd (ProtectHome=yes, PrivateTmp=yes): voxd cannot run from there."""
CONFIG_DIR = "/etc/voxd"
CREDENTIALS_DIR = "/etc/voxd/credentials"
UNIT_DIR = "/etc/systemd/system"
CREDENTIAL_LINE = re.compile(r"^LoadCredential=([A-Za-z0-9_]+):(\S+)$", re.M)
LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
HOST = re.compile(rf"{LABEL}(\.{LABEL})*")
"""A DNS name (lower case, as urlsplit gives .hostname)."""
FILL = {
    "twilio_auth_token": 'systemd-ask-password "Twilio auth token:" > {path}',
    "stream_secret": "head -c 32 /dev/urandom | base64 > {path}      # the same for every "
                     "instance",
}


class InstallError(Exception):
    """A problem stated in one line; `code` is the exit code (2 usage, 1 could not install)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `install-service` to voxd's command line."""
    parser = subparsers.add_parser(
        "install-service",
        help="as root: write /etc/voxd/voxd.toml, the credentials folder and the systemd unit, "
             "checked",
        description="Install voxd as a systemd service: /etc/voxd/voxd.toml from the "
                    "production template (signatures on, listening on loopback behind a TLS "
                    "proxy, your --public-url), /etc/voxd/credentials/ with an empty file for "
                    "each secret the unit loads (you fill them), and "
                    "/etc/systemd/system/voxd.service running this voxd; then check-config, "
                    "and the commands left to run. A file already there with other content is "
                    "kept (nothing is written) unless --force; a second run changes nothing.")
    parser.add_argument("--public-url", metavar="URL",
                        help="the https origin Twilio reaches, e.g. https://voice.example.com "
                             "(needed while the config file does not exist yet)")
    parser.add_argument("--instance", metavar="PORT", action="append", default=[],
                        help="instead of voxd.service: voxd@.service and /etc/voxd/PORT.toml "
                             "listening on 127.0.0.1:PORT, run as voxd@PORT (repeat for each "
                             "instance, e.g. 3001 and 3002 for deploy/nginx/voxd.conf)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every file it would write (mode, owner) and every command "
                             "it would run; write nothing (any user)")
    parser.add_argument("--force", action="store_true",
                        help="replace files that differ from what it writes, keeping each old "
                             "one as FILE.bak (credential files are never replaced)")
    parser.add_argument("--root", metavar="DIR",
                        help="write under DIR instead of / (tests, image builds)")


def run(args: argparse.Namespace) -> int:
    """`voxd install-service`: the exit code (0 installed, 1 not installed, 2 bad usage)."""
    try:
        return install(Options.from_args(args))
    except InstallError as exc:
        print(f"voxd: install-service: {exc}", file=sys.stderr, flush=True)
        return exc.code


# ---------------------------------------------------------------- what to install


def public_url(value: str) -> str:
    """--public-url checked and normalised (`https://host[:port]`), or InstallError naming the
    problem."""
    shown = value if len(value) <= 80 else value[:77] + "..."
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise InstallError(f"--public-url: not a URL: {shown!r}")
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise InstallError(f"--public-url: not a URL (its port?): {shown!r}") from None
    if url.scheme.lower() != "https":
        raise InstallError(f"--public-url: must be https:// (Twilio opens the media stream "
                           f"only over wss://, which voxd derives from it): {shown!r}")
    host = (url.hostname or "").lower()
    if not host:
        raise InstallError(f"--public-url: no host name in {shown!r}")
    if url.username is not None or url.password is not None:
        raise InstallError(f"--public-url: must not carry a user name or password: {shown!r}")
    if url.path not in ("", "/") or url.query or url.fragment or value.endswith(("?", "#")):
        raise InstallError(f"--public-url: must be an origin such as https://voice.example.com "
                           f"(no path, query or fragment: voxd adds /twilio/voice): {shown!r}")
    if port == 0:
        raise InstallError(f"--public-url: port 0 is no port Twilio can connect to: {shown!r}")
    ip_literal = "[" in url.netloc
    address = _address(host, ip_literal)
    ipv4 = _embedded_ipv4(address)
    spelled = f" ({ipv4 or address})" if address is not None and str(
        ipv4 or address) != host else ""
    this_machine = ipv4 or address
    if (this_machine is not None and (this_machine.is_loopback or this_machine.is_unspecified)
            ) or (address is None and _local_name(host)):
        raise InstallError(f"--public-url: {host}{spelled} is this machine: Twilio must reach "
                           "the URL from the internet (the proxy's public name)")
    if ipv4 is not None and ipv4.is_global:
        raise InstallError(f"--public-url: [{host}] is an IPv4 address written as IPv6: write "
                           f"https://{ipv4}")
    if address is not None and not address.is_global:
        raise InstallError(f"--public-url: {host}{spelled} is a private address: Twilio must "
                           "reach the URL from the internet (the proxy's public name)")
    if address is None and not (HOST.fullmatch(host) and "." in host):
        raise InstallError(f"--public-url: {host!r} is not a host name Twilio can look up")
    if address is not None and not ip_literal and spelled:
        raise InstallError(f"--public-url: write the address {host} as {address}")
    netloc = f"[{host}]" if ip_literal else host
    return f"https://{netloc}" + (f":{port}" if port not in (None, 443) else "")


def _address(host: str, ip_literal: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` (urlsplit's .hostname) spells, or None for a name. An IPv4
    address is read as the resolver reads it (inet_aton: 127.1, 0x7f.0.0.1 and 2130706433
    are all 127.0.0.1)."""
    if ip_literal:
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            raise InstallError(f"--public-url: [{host}] is not an IPv6 address") from None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
                   ) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible
    (::a.b.c.d) IPv6 address, which reach that IPv4 address (::ffff:127.0.0.1 is this
    machine); None for any other address."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d, not :: nor ::1
        return ipaddress.IPv4Address(int(address))
    return None


def _local_name(host: str) -> bool:
    """A name only this machine answers to: localhost (with or without the root's dot),
    anything under .localhost (RFC 6761)."""
    name = host.rstrip(".")
    return is_loopback_host(host) or name in ("localhost", "ip6-localhost",
                                              "ip6-loopback") or name.endswith(".localhost")


def instance_port(value: str) -> int:
    """--instance PORT checked."""
    if not value.isdigit() or not 1024 <= int(value) <= 65535:
        raise InstallError(f"--instance: a port from 1024 to 65535 (the service may not bind "
                           f"below 1024; it is also the instance's name), not {value[:20]!r}")
    return int(value)


def voxd_command() -> str:
    """How the unit runs the voxd this is: its console script next to this Python (a venv's
    bin/), else this Python with -m voxd."""
    script = Path(os.path.abspath(sys.executable)).parent / "voxd"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{os.path.abspath(sys.executable)} -m voxd"


def hidden_from_service(paths: list[str]) -> str | None:
    """The first of `paths` under a directory the unit hides from voxd, or None."""
    for path in paths:
        pure = PurePosixPath(path)
        if any(pure == PurePosixPath(h) or PurePosixPath(h) in pure.parents for h in HIDDEN):
            return path
    return None


def service_cannot_run(command: str) -> str | None:
    """Why the unit could not run `command` (the voxd this is), or None: it, the Python it
    runs on (a venv's python is a link to it) and the voxd package must be outside what the
    unit hides, and usable by the service's dynamic user (any user)."""
    needed = [(shlex.split(command)[0], stat.S_IXOTH, "run"),
              (os.path.realpath(sys.executable), stat.S_IXOTH, "run"),
              (str(Path(__file__).resolve().parent), stat.S_IXOTH | stat.S_IROTH, "read")]
    hidden = hidden_from_service([path for path, _, _ in needed])
    if hidden is not None:
        return (f"this voxd runs from {hidden}, which the unit hides from the service "
                "(ProtectHome=yes, PrivateTmp=yes: /home, /root, /run/user, /tmp); install "
                "voxd outside them with a system Python (python3 -m venv /opt/voxd/.venv && "
                "/opt/voxd/.venv/bin/pip install voxd) and run that voxd's install-service")
    return not_usable_by_others(needed)


def not_usable_by_others(needed: list[tuple[str, int, str]]) -> str | None:
    """The first of `needed` (path, the mode bits others need on it, what they do with it)
    that a user other than its owner cannot use, or cannot reach through its directories."""
    for path, bits, verb in needed:
        place = Path(path)
        for part in [*reversed(place.parents), place]:
            want, doing = (bits, verb) if part == place else (stat.S_IXOTH, "reach")
            try:
                have = stat.S_IMODE(part.stat().st_mode)
            except OSError:
                break  # not there to look at: the service will say so
            if have & want != want:
                return (f"the service's user (DynamicUser=yes: not the owner) cannot {doing} "
                        f"{part} (mode {have:04o}), which this voxd needs: chmod o+rx it, or "
                        "install voxd with umask 022")
    return None


SYSTEMD_READS = {"$": ("a dollar sign", "a variable"), "\\": ("a backslash", "an escape"),
                 '"': ("a double quote", "a quote"), "'": ("a single quote", "a quote")}
"""What systemd would read in ExecStart='s executable path (systemd.service(5), Command
lines), besides whitespace (a word break) and % (a specifier, which is escaped as %%)."""


def exec_path_problem(command: str) -> str | None:
    """Why the path of `command` (the voxd this is) cannot go into ExecStart= as it is, or
    None."""
    path = command.removesuffix(" -m voxd")
    for c in path:
        if "\ud800" <= c <= "\udfff":  # a byte that is not UTF-8 (surrogateescape)
            meaning = "bytes that are not UTF-8, which a unit file cannot hold"
        elif c == " ":
            meaning = "a space, which ExecStart= would split"
        elif c.isspace() or not c.isprintable():
            meaning = f"a control character ({c!r}), which a unit file cannot hold"
        elif c in SYSTEMD_READS:
            name, read_as = SYSTEMD_READS[c]
            meaning = f"{name}, which systemd would read as {read_as} in ExecStart="
        else:
            continue
        shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
        return (f"the path of this voxd, {shown!r}, has {meaning}: install voxd under a plain "
                "path (python3 -m venv /opt/voxd/.venv && /opt/voxd/.venv/bin/pip install "
                "voxd) and run that voxd's install-service")
    return None


def systemd_command(command: str) -> str:
    """`command` as ExecStart= reads it literally (exec_path_problem has found nothing)."""
    return command.replace("%", "%%")


def packaged(name: str) -> str:
    """A file of voxd/data (the template, the units)."""
    try:
        return (resources.files("voxd") / "data" / name).read_text(encoding="utf-8")
    except OSError:
        raise InstallError(f"this voxd package has no voxd/data/{name} (installed without its "
                           "data files?): reinstall voxd", code=1) from None


def render_config(template: str, url: str, port: int | None) -> str:
    """The production template with `url` as server.public_url; for an instance, its port and
    its own state directory, and comments naming its file and unit."""
    text = _replace_line(template, f'public_url = "{TEMPLATE_URL}"', f'public_url = "{url}"')
    if port is None:
        return text
    text = _replace_line(text, f'listen = "{TEMPLATE_LISTEN}"', f'listen = "127.0.0.1:{port}"')
    text = _replace_line(text, f'directory = "{TEMPLATE_RECORDINGS}"',
                         f'directory = "/var/lib/voxd-{port}/recordings"')
    return (text.replace("/etc/voxd/voxd.toml", f"/etc/voxd/{port}.toml")
            .replace("systemctl reload voxd", f"systemctl reload voxd@{port}")
            .replace("systemctl restart voxd", f"systemctl restart voxd@{port}")
            .replace("systemctl edit voxd", "systemctl edit voxd@.service"))


def render_unit(template: str, command: str) -> str:
    """A packaged unit running `command` (the voxd being installed)."""
    if template.count(SHIPPED_VOXD) != 2:
        raise InstallError(f"the packaged unit does not name {SHIPPED_VOXD} in ExecStart= and "
                           "ExecReload=: a packaging fault", code=1)
    return template.replace(SHIPPED_VOXD, command)


def _replace_line(text: str, old: str, new: str) -> str:
    pattern = re.compile(rf"^{re.escape(old)}(?=\s)", re.M)
    if len(pattern.findall(text)) != 1:
        raise InstallError(f"the packaged config template has no line {old!r}: a packaging "
                           "fault", code=1)
    return pattern.sub(lambda _: new, text)


@dataclass(frozen=True)
class Options:
    root: Path
    """Prefix of every path written ("/" on a real install)."""
    url: str | None
    instances: tuple[int, ...]
    dry_run: bool
    force: bool
    command: str
    """ExecStart='s voxd (the voxd this is)."""
    euid: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        euid = os.geteuid()
        if args.root == "":
            raise InstallError("--root: an empty path (an unset variable?): give the directory "
                               "to write under, or leave --root out to install into /")
        root = Path("/" if args.root is None else args.root)
        if not root.is_dir():
            raise InstallError(f"--root: no such directory: {args.root}")
        if root.resolve() == Path("/"):  # also //, /./, /etc/.. or a link to /: a real install
            root = Path("/")
        if root == Path("/") and not args.dry_run and euid != 0:
            raise InstallError(f"writes {CONFIG_DIR} and {UNIT_DIR}: run it as root, or "
                               "--dry-run to see what it would write")
        return cls(
            root=root.absolute(),
            url=public_url(args.public_url) if args.public_url is not None else None,
            instances=tuple(dict.fromkeys(instance_port(p) for p in args.instance)),
            dry_run=args.dry_run,
            force=args.force,
            command=voxd_command(),
            euid=euid,
        )

    def path(self, target: str) -> Path:
        """Where `target` (a path of the installed system) is written."""
        return self.root / target.lstrip("/")

    @property
    def real_root(self) -> bool:
        """Installing into this machine's / (not under a --root)."""
        return self.root == Path("/")

    def inside(self, path: Path) -> None:
        """InstallError unless every existing directory on the way from the root to `path`
        stays under the root: a symbolic link there (ROOT/etc -> /etc) would send what is
        written under --root to the real system. Looked at again before each write."""
        if self.real_root:
            return
        base = self.root.resolve()
        here = self.root
        for part in path.relative_to(self.root).parts:
            here = here / part
            try:
                is_link = stat.S_ISLNK(here.lstat().st_mode)
            except OSError:
                return  # not there (created below), or not to be looked at: said later
            if not is_link:
                continue
            real = Path(os.path.realpath(here))
            if real != base and base not in real.parents:
                raise InstallError(f"{here} is a symbolic link to {os.readlink(here)!r}, outside "
                                   f"--root {self.root}: install-service writes only under "
                                   "--root (make it a directory there)", code=1)

    @property
    def units(self) -> list[str]:
        """The services left to enable."""
        return [f"voxd@{port}" for port in self.instances] or ["voxd"]


@dataclass(frozen=True)
class Wanted:
    """One directory or file as install-service leaves it."""

    target: str
    """Its path on the installed system."""
    mode: int
    content: str | None = None
    """A file's text; None for a directory or a credential file."""
    directory: bool = False
    credential: bool = False
    """Created empty if missing; its content is the operator's: never read nor replaced."""
    config: str | None = None
    """For a config file, the public_url it is for (one with that URL already is kept)."""
    keep_mode: bool = False
    """A system directory: made if missing, else left as it is."""


@dataclass(frozen=True)
class Step:
    wanted: Wanted
    path: Path
    action: str
    """create | unchanged | kept | fix | replace | differs | unseen (a dry run's)"""
    detail: str = ""
    st: os.stat_result | None = None
    """What was there when planned (lstat): a fix or a replace touches only that file."""


def wanted(options: Options) -> list[Wanted]:
    """Everything install-service writes, in the order it writes it."""
    problem = exec_path_problem(options.command)
    if problem is not None:
        raise InstallError(problem)
    problem = service_cannot_run(options.command)
    if problem is not None:
        if options.real_root:
            raise InstallError(problem)
        # Under --root (a test, an image) the voxd that will run may be another one: say it.
        print(f"voxd: install-service: warning: {problem}", file=sys.stderr, flush=True)
    unit_name = "voxd@.service" if options.instances else "voxd.service"
    unit = render_unit(packaged(unit_name), systemd_command(options.command))
    items = [Wanted(CONFIG_DIR, 0o755, directory=True),
             Wanted(CREDENTIALS_DIR, 0o700, directory=True)]
    for name, target in CREDENTIAL_LINE.findall(unit):
        if name not in SECRET_SOURCES or PurePosixPath(target).parent != PurePosixPath(
                CREDENTIALS_DIR):
            raise InstallError(f"the packaged unit loads an unknown credential {name} from "
                               f"{target}: a packaging fault", code=1)
        items.append(Wanted(target, 0o600, credential=True))
    template = packaged("voxd.production.toml")
    for port in options.instances or (None,):
        target = f"{CONFIG_DIR}/{port if port else 'voxd'}.toml"
        if options.url is None:
            if not options.path(target).is_file():
                raise InstallError(f"--public-url is needed: {options.path(target)} does not "
                                   "exist yet (e.g. --public-url https://voice.example.com, "
                                   "the https origin Twilio reaches through your proxy)")
            items.append(Wanted(target, 0o644, config=""))
        else:
            items.append(Wanted(target, 0o644, render_config(template, options.url, port),
                                config=options.url))
    items.append(Wanted(UNIT_DIR, 0o755, directory=True, keep_mode=True))
    items.append(Wanted(f"{UNIT_DIR}/{unit_name}", 0o644, unit))
    return items


def plan(options: Options) -> list[Step]:
    """What install-service would do to each of `wanted(options)`, from what is there now."""
    return [_assess(options, item) for item in wanted(options)]


def _assess(options: Options, item: Wanted) -> Step:
    path = options.path(item.target)
    options.inside(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Step(item, path, "create")
    except PermissionError:
        if options.dry_run:
            return Step(item, path, "unseen")
        raise InstallError(f"cannot look at {path}: permission denied", code=1) from None
    except OSError as exc:
        raise InstallError(f"cannot look at {path}: {exc.strerror}", code=1) from None
    if item.directory != stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) or not (
            stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        kind = "a directory" if item.directory else "a regular file"
        raise InstallError(f"{path} is there but is not {kind}: move it away first", code=1)
    step = _compare(options, item, path, st)
    if step.action in ("fix", "replace") and not item.directory and st.st_nlink > 1:
        raise InstallError(_linked(path, st.st_nlink), code=1)
    return step


def _linked(path: Path, links: int) -> str:
    return (f"{path} has {links} hard links (the same file under other names, which "
            "install-service would change too): it changes no such file; make it a file of its "
            f"own (cp -p {path} {path}.copy && mv {path}.copy {path}), then run again")


def _compare(options: Options, item: Wanted, path: Path, st: os.stat_result) -> Step:
    """What to do to `path`, a directory or regular file (`st`) already there."""
    if item.content is not None:
        try:
            current = _read(path, st).decode("utf-8")
        except PermissionError:
            if options.dry_run:
                return Step(item, path, "unseen")
            raise InstallError(f"cannot read {path}: permission denied", code=1) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InstallError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                               code=1) from None
        if current != item.content:
            if item.config is not None and _public_url_of(current) == item.config:
                return _ownership(options, item, path, st, "kept")
            return Step(item, path, "replace" if options.force else "differs",
                        _diff(current, item.content, path), st)
    action = "kept" if item.config == "" or item.credential else "unchanged"
    return _ownership(options, item, path, st, action)


def _ownership(options: Options, item: Wanted, path: Path, st: os.stat_result,
               action: str) -> Step:
    """`action`, or a fix when the mode (or, as root, the owner) is not what it should be."""
    fixes = []
    if not item.keep_mode and stat.S_IMODE(st.st_mode) != item.mode:
        why = (" so that the service's dynamic user (DynamicUser=yes) can read it; secrets go "
               f"in {CREDENTIALS_DIR}/"
               if item.config is not None and item.mode & ~stat.S_IMODE(st.st_mode) else "")
        fixes.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {item.mode:04o}{why}")
    if options.euid == 0 and not item.keep_mode and (st.st_uid, st.st_gid) != (0, 0):
        fixes.append(f"owner {_owner(st.st_uid, st.st_gid)} -> root:root")
    return Step(item, path, "fix", ", ".join(fixes), st) if fixes else Step(item, path, action,
                                                                              st=st)


def _open(path: Path, st: os.stat_result | None, directory: bool = False,
          one_name: bool = True) -> int:
    """`path` opened without following a symbolic link (read only), checked to be the
    directory or the regular file that was planned (`st`, when given), a file with no other
    name (hard link) unless not `one_name`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags | (os.O_DIRECTORY if directory else 0))
    except OSError as exc:
        became = {errno.ELOOP: "a symbolic link", errno.ENOTDIR: "not a directory"}.get(
            exc.errno or 0)
        if became is not None:
            raise InstallError(f"{path} changed since it was looked at (it is {became} now): "
                               "nothing more was written; look at it, then run again",
                               code=1) from None
        raise
    try:
        now = os.fstat(fd)
        planned = st is None or (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
        if not planned or not (directory or stat.S_ISREG(now.st_mode)):
            raise InstallError(f"{path} changed since it was looked at (another file is there "
                               "now): nothing more was written; look at it, then run again",
                               code=1)
        if one_name and not directory and now.st_nlink > 1:
            raise InstallError(_linked(path, now.st_nlink), code=1)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(path: Path, st: os.stat_result | None) -> bytes:
    """A regular file's content (a file planted there later, or a link, is not read)."""
    with os.fdopen(_open(path, st, one_name=False), "rb") as file:
        return file.read()


def _public_url_of(text: str) -> str | None:
    try:
        server = tomllib.loads(text).get("server", {})
    except tomllib.TOMLDecodeError:
        return None
    url = server.get("public_url") if isinstance(server, dict) else None
    return url.rstrip("/") if isinstance(url, str) else None


def _diff(old: str, new: str, path: Path, limit: int = 30) -> str:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"{path} (there)",
                                      f"{path} (install-service)", n=1, lineterm=""))
    more = [f"... {len(lines) - limit} more lines"] if len(lines) > limit else []
    return "\n".join(lines[:limit] + more)


def _owner(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


# ---------------------------------------------------------------- doing it


def install(options: Options) -> int:
    steps = plan(options)
    owner = "root:root" if options.euid == 0 or options.dry_run else _owner(os.geteuid(),
                                                                              os.getegid())
    conflicts = [step for step in steps if step.action == "differs"]
    verb = "would " if options.dry_run else ""
    for step in steps:
        print(_describe(step, verb, owner), flush=True)
    if conflicts:
        for step in conflicts:
            print(step.detail)
        for step in conflicts:
            hint = ("; or run without --public-url to keep your config as it is"
                    if step.wanted.config else "")
            print(f"voxd: install-service: {step.path} differs from what install-service "
                  f"writes (edited, or from another voxd version): --force replaces it, "
                  f"keeping the old one as {_backup(step.path).name}{hint}",
                  file=sys.stderr, flush=True)
        print(f"voxd: install-service: nothing {'would be' if options.dry_run else 'was'} "
              "written", file=sys.stderr, flush=True)
        return 1
    configs = [step.path for step in steps if step.wanted.config is not None]
    check = [*shlex.split(options.command), "check-config", "--config"]
    if options.dry_run:
        for config in configs:
            print(f"would run: CREDENTIALS_DIRECTORY={options.path(CREDENTIALS_DIR)} "
                  f"{shlex.join([*check, str(config)])}")
        print("dry run: nothing was written")
        _left_to_do(options, steps, [])
        return 0
    for step in steps:
        _apply(options, step)
    changed = [step for step in steps if step.action in ("create", "fix", "replace")]
    if not changed:
        print("nothing to change: everything is in place")
    empty = _empty_credentials(options, steps)
    ok = all(_check(options, check, config, empty) for config in configs)
    _left_to_do(options, steps, empty)
    return 0 if ok else 1


def _describe(step: Step, verb: str, owner: str) -> str:
    what = {"create": "create", "unchanged": "unchanged", "kept": "unchanged", "fix": "fix",
            "replace": "replace", "differs": "DIFFERS", "unseen": "not seen"}[step.action]
    if step.action in ("create", "fix", "replace"):
        what = verb + what
    kind = "directory" if step.wanted.directory else "file"
    extra = ""
    if step.action == "fix":
        extra = f": {step.detail}"
    elif step.action == "unseen":
        extra = ", not readable by this user: run as root to see it"
    elif step.action == "replace":
        extra = f", the old one kept as {_backup(step.path).name}"
    elif step.wanted.credential:
        extra = ", empty: yours to fill" if step.action == "create" else ", yours"
    elif step.action == "kept" and step.wanted.config is not None:
        extra = ", yours"
    mode = "" if step.wanted.keep_mode else f" {step.wanted.mode:04o} {owner}"
    return f"{what:<15} {step.path}{'/' if step.wanted.directory else ''} ({kind}{mode}{extra})"


def _backup(path: Path) -> Path:
    """The first free FILE.bak, FILE.bak.2, ... (a symbolic link there, even one to nothing,
    is not free)."""
    candidate = path.with_name(path.name + ".bak")
    number = 1
    while os.path.lexists(candidate):
        number += 1
        candidate = path.with_name(f"{path.name}.bak.{number}")
    return candidate


def _apply(options: Options, step: Step) -> None:
    item, path = step.wanted, step.path
    owned = options.euid == 0 and not item.keep_mode
    options.inside(path)  # again: a link may have been put on the way since the plan
    try:
        if step.action == "create" and item.directory:
            path.mkdir(mode=item.mode, parents=True)
            _set(path, item.mode, owned, None, directory=True)  # the umask took bits off
        elif step.action in ("create", "replace"):
            if step.action == "replace":
                _keep(path, step.st)
            _write(path, "" if item.content is None else item.content, item.mode, owned)
        elif step.action == "fix":
            _set(path, None if item.keep_mode else item.mode, owned, step.st, item.directory)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc} (what was written "
                           "before it stays; run again once that is fixed)", code=1) from None


def _set(path: Path, mode: int | None, owned: bool, st: os.stat_result | None,
         directory: bool) -> None:
    """`mode` and (when `owned`) root:root on `path`, through a descriptor of the file that
    was planned: never through a symbolic link, nor on a file with other names."""
    fd = _open(path, st, directory)
    try:
        if owned:
            os.fchown(fd, 0, 0)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _keep(path: Path, st: os.stat_result | None) -> None:
    """A copy of `path` (the file planned) as the first free FILE.bak: its content, mode,
    owner and times. Created anew (never through a link, never over a file there)."""
    with os.fdopen(_open(path, st), "rb") as old:
        now = os.fstat(old.fileno())
        while True:
            backup = _backup(path)
            try:
                fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue  # taken since: the next number
            break
        try:
            with os.fdopen(fd, "wb", closefd=False) as new:
                while chunk := old.read(1 << 16):
                    new.write(chunk)
            if os.geteuid() == 0:
                os.fchown(fd, now.st_uid, now.st_gid)
            os.fchmod(fd, stat.S_IMODE(now.st_mode))
            os.utime(fd, ns=(now.st_atime_ns, now.st_mtime_ns))
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(backup)
            raise
        finally:
            os.close(fd)


def _write(path: Path, text: str, mode: int, owned: bool | None = None) -> None:
    """`text` to `path` at once: a reader sees the old file or the new one, never half.
    Written to a new file of its own in the same directory (O_EXCL: never one that is there,
    so two runs at once do not write into each other's), then renamed over `path`; removed
    if anything fails."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".install-service",
                                     dir=path.parent)
    try:
        try:
            if os.geteuid() == 0 if owned is None else owned:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb", closefd=False) as file:
                file.write(text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _empty_credentials(options: Options, steps: list[Step]) -> list[Step]:
    """The credential files the unit loads that hold nothing yet."""
    empty = []
    for step in steps:
        if step.wanted.credential:
            try:
                if not _read(step.path, None).strip():
                    empty.append(step)
            except (OSError, InstallError):
                empty.append(step)
    return empty


def _check(options: Options, check: list[str], config: Path, empty: list[Step]) -> bool:
    """Run the installed voxd's check-config on `config` with the credentials folder the
    service gets (a credential still to fill counted as given); print its result."""
    credentials = options.path(CREDENTIALS_DIR)
    env = {key: value for key, value in os.environ.items()
           if key not in SECRET_SOURCES.values() and key != "VOXD_CONFIG"}
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    for step in empty:
        env[SECRET_SOURCES[step.path.name]] = "counted-as-given-until-filled"
    command = [*check, str(config)]
    print(f"running: CREDENTIALS_DIRECTORY={credentials} {shlex.join(command)}", flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"voxd: install-service: check-config could not run: {exc}", file=sys.stderr)
        return False
    if result.returncode == 0:
        line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "ok"
        names = ", ".join(step.path.name for step in empty)
        print(f"check-config: {line}" + (f" (counting {names} as given: fill "
                                         f"{'them' if len(empty) > 1 else 'it'} below)"
                                         if empty else ""), flush=True)
        for line in result.stderr.strip().splitlines():  # its warnings
            print(f"check-config: {line}", file=sys.stderr, flush=True)
        return True
    for line in (result.stderr.strip() or result.stdout.strip()).splitlines():
        print(f"check-config: {line}", file=sys.stderr, flush=True)
    print(f"voxd: install-service: {config} does not pass check-config: edit it, then "
          f"`{shlex.join(command)}`", file=sys.stderr, flush=True)
    return False


def _left_to_do(options: Options, steps: list[Step], empty: list[Step]) -> None:
    """The commands the operator runs next."""
    todo: list[str] = []
    if options.dry_run:
        empty = [step for step in steps if step.wanted.credential and step.action == "create"]
    if empty:
        fills = [FILL.get(step.path.name, "systemd-ask-password \"{name}:\" > {path}").format(
            path=step.wanted.target, name=step.path.name) for step in empty]
        todo.append("fill the credential file" + ("s" if len(empty) > 1 else "")
                    + " (no secret goes in the config file):\n      " + "\n      ".join(fills))
    units = " ".join(options.units)
    unit_step = next(step for step in steps if step.wanted.target.endswith(".service"))
    if unit_step.action == "create":
        todo.append(f"systemctl daemon-reload && systemctl enable --now {units}")
    elif any(step.action in ("create", "replace") for step in steps) or empty:
        todo.append(f"systemctl daemon-reload && systemctl enable {units} && systemctl restart "
                    f"{units}      # a restart drains live calls")
    if todo:
        todo.append(f"journalctl {' '.join(f'-u {unit}' for unit in options.units)} -f"
                    "      # its start, then every call")
        print("left to do:" if not options.dry_run else "then, left to do:")
        for number, text in enumerate(todo, 1):
            print(f"  {number}. {text}")
    echo = [step.wanted.target for step in steps
            if step.wanted.config is not None and _provider(step) == "echo"]
    if echo:
        first = echo[0]
        print(f"{', '.join(echo)} answer{'s' if len(echo) == 1 else ''} calls with \"echo\" "
              "(the caller's words said back: a check that the line works). For a real "
              f"assistant edit [assistant] (its comments say how), then `{options.command} "
              f"check-config --config {first}` and `systemctl reload "
              f"{options.units[0]}`{' (each instance)' if len(echo) > 1 else ''}.")


def _provider(step: Step) -> str | None:
    """The assistant.provider of a config step's file (as it is once written)."""
    try:
        text = (step.wanted.content if step.wanted.content is not None
                and step.action in ("create", "replace") else step.path.read_text("utf-8"))
        assistant = tomllib.loads(text).get("assistant", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    provider = assistant.get("provider", "echo") if isinstance(assistant, dict) else None
    return provider if isinstance(provider, str) else None

"""`voxd install-service` into a scratch root (--root): the files, their modes and content, the
written config passing check-config, idempotence, no overwrite without --force, the dry run,
refused input; and the template unit voxd@.service held to systemd's checks and to
voxd.service's hardening."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from voxd import install

CHECKOUT = Path(__file__).parents[2]
DATA = CHECKOUT / "voxd" / "data"
URL = "https://voice.example.com"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed "
                                          "(Debian: apt-get install systemd)")


REAL_HOST_CHECK = install.service_cannot_run


@pytest.fixture(autouse=True)
def runnable_voxd(monkeypatch):
    """This checkout's voxd counts as one the unit can run (a venv on a Python under /root,
    e.g. pyenv's, is not: tested below with REAL_HOST_CHECK)."""
    monkeypatch.setattr(install, "service_cannot_run", lambda command: None)


def parser() -> argparse.ArgumentParser:
    """voxd's command line with only install-service (voxd/cli.py adds it the same way)."""
    top = argparse.ArgumentParser(prog="voxd")
    install.add_parser(top.add_subparsers(dest="command", required=True))
    return top


def voxd(capsys: pytest.CaptureFixture[str], root: Path | None, *args: str) -> tuple[int, str, str]:
    argv = ["install-service", *(["--root", str(root)] if root is not None else []), *args]
    code = install.run(parser().parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def check_config(config: Path, credentials: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VOXD_", "VAPI_", "OPENAI_", "ELEVENLABS_", "DEEPGRAM_"))}
    return subprocess.run([sys.executable, "-m", "voxd", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**env, "CREDENTIALS_DIRECTORY": str(credentials)})


def test_installs_config_credentials_and_unit_with_their_modes(tmp_path, capsys):
    code, out, err = voxd(capsys, tmp_path, "--public-url", "https://Voice.Example.com/")
    assert code == 0, out + err
    etc = tmp_path / "etc" / "voxd"
    assert mode(etc) == 0o755
    assert mode(etc / "credentials") == 0o700
    token = etc / "credentials" / "twilio_auth_token"
    assert mode(token) == 0o600 and token.read_bytes() == b""  # the operator's to fill
    assert mode(etc / "voxd.toml") == 0o644  # the service's dynamic user must read it
    if os.geteuid() == 0:
        assert {(p.stat().st_uid, p.stat().st_gid) for p in tmp_path.rglob("*")
                if "voxd" in str(p)} == {(0, 0)}

    config = tomllib.loads((etc / "voxd.toml").read_text())
    assert config["server"]["public_url"] == URL  # normalised: lower case, no trailing /
    assert config["server"]["listen"] == "127.0.0.1:3000"  # behind the proxy
    assert config["twilio"]["validate_signatures"] is True
    assert (etc / "voxd.toml").read_text().count("# EDIT") >= 2

    unit = (tmp_path / "etc/systemd/system/voxd.service").read_text()
    assert mode(tmp_path / "etc/systemd/system/voxd.service") == 0o644
    command = install.voxd_command()
    assert f"ExecStart={command} serve --config /etc/voxd/voxd.toml" in unit
    assert f"ExecReload={command} reload --config /etc/voxd/voxd.toml --pid $MAINPID" in unit
    assert unit == (DATA / "voxd.service").read_text().replace(install.SHIPPED_VOXD, command)
    assert "LoadCredential=twilio_auth_token:/etc/voxd/credentials/twilio_auth_token" in unit

    assert "check-config: ok:" in out and "signatures on" in out
    assert "counting twilio_auth_token as given" in out
    todo = out.split("left to do:")[1]
    assert "/etc/voxd/credentials/twilio_auth_token" in todo
    assert "systemctl daemon-reload && systemctl enable --now voxd" in todo
    assert "journalctl -u voxd -f" in todo
    assert err == ""


def test_the_written_config_passes_check_config_once_the_token_is_there(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    config = tmp_path / "etc/voxd/voxd.toml"
    credentials = tmp_path / "etc/voxd/credentials"
    empty = check_config(config, credentials)  # as the service sees it before it is filled
    assert empty.returncode == 2
    assert "twilio_auth_token is empty" in empty.stderr
    (credentials / "twilio_auth_token").write_text("test-token\n")
    filled = check_config(config, credentials)
    assert filled.returncode == 0, filled.stderr
    assert f"public {URL}" in filled.stdout and "signatures on" in filled.stdout


def test_the_packaged_template_passes_check_config_as_it_is(tmp_path):
    (tmp_path / "twilio_auth_token").write_text("test-token")
    result = check_config(DATA / "voxd.production.toml", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "signatures on" in result.stdout


def test_a_second_run_changes_nothing_and_says_so(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    before = snapshot(tmp_path)
    code, out, _ = voxd(capsys, tmp_path, "--public-url", URL)
    assert code == 0
    assert "nothing to change: everything is in place" in out
    assert snapshot(tmp_path) == before
    code, out, _ = voxd(capsys, tmp_path)  # the config exists: --public-url not needed
    assert code == 0 and "nothing to change" in out
    assert snapshot(tmp_path) == before


def test_an_edited_unit_is_kept_without_force_and_backed_up_with_it(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    unit = tmp_path / "etc/systemd/system/voxd.service"
    edited = unit.read_text() + "# mine\n"
    unit.write_text(edited)
    before = snapshot(tmp_path)
    code, out, err = voxd(capsys, tmp_path, "--public-url", URL)
    assert code == 1
    assert f"{unit} differs from what install-service writes" in err
    assert "--force replaces it, keeping the old one as voxd.service.bak" in err
    assert "nothing was written" in err
    assert "+# mine" not in out and "-# mine" in out  # the diff shows what --force would undo
    assert snapshot(tmp_path) == before

    code, out, err = voxd(capsys, tmp_path, "--public-url", URL, "--force")
    assert code == 0, err
    assert (unit.parent / "voxd.service.bak").read_text() == edited
    assert "# mine" not in unit.read_text()
    assert "systemctl daemon-reload && systemctl enable voxd && systemctl restart voxd" in out


def test_an_edited_config_is_the_operators(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    config = tmp_path / "etc/voxd/voxd.toml"
    edited = config.read_text().replace('level = "info"', 'level = "debug"')
    config.write_text(edited)
    # The same command again (as the README has it): the edited file is kept, no complaint.
    code, _, err = voxd(capsys, tmp_path, "--public-url", URL)
    assert code == 0, err
    assert config.read_text() == edited
    # Another public URL would throw the edits away: only with --force.
    code, _, err = voxd(capsys, tmp_path, "--public-url", "https://other.example.com")
    assert code == 1
    assert f"{config} differs" in err and "run without --public-url to keep your config" in err
    assert config.read_text() == edited
    code, _, err = voxd(capsys, tmp_path, "--public-url", "https://other.example.com", "--force")
    assert code == 0, err
    assert (config.parent / "voxd.toml.bak").read_text() == edited
    assert 'public_url = "https://other.example.com"' in config.read_text()


def test_a_filled_credential_is_never_touched_nor_shown(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    token = tmp_path / "etc/voxd/credentials/twilio_auth_token"
    token.write_text("s3cret-token-value")
    token.chmod(0o644)  # a leak: fixed, the content kept
    code, out, err = voxd(capsys, tmp_path, "--public-url", "https://other.example.com",
                          "--force")
    assert code == 0, err
    assert token.read_text() == "s3cret-token-value"
    assert mode(token) == 0o600
    assert "mode 0644 -> 0600" in out
    assert not list(token.parent.glob("*.bak"))
    assert "s3cret" not in out + err
    assert "counting" not in out and "fill the credential" not in out  # nothing left to fill


def test_wrong_modes_are_fixed(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    (tmp_path / "etc/voxd/credentials").chmod(0o755)
    (tmp_path / "etc/voxd/voxd.toml").chmod(0o600)  # the service could not read it
    code, out, _ = voxd(capsys, tmp_path)
    assert code == 0
    assert mode(tmp_path / "etc/voxd/credentials") == 0o700
    assert mode(tmp_path / "etc/voxd/voxd.toml") == 0o644
    assert "mode 0755 -> 0700" in out and "mode 0600 -> 0644" in out


def test_dry_run_writes_nothing_and_shows_everything(tmp_path, capsys):
    code, out, err = voxd(capsys, tmp_path, "--public-url", URL, "--dry-run")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []
    for path, octal in (("etc/voxd/", "0755"), ("etc/voxd/credentials/", "0700"),
                        ("etc/voxd/credentials/twilio_auth_token", "0600"),
                        ("etc/voxd/voxd.toml", "0644"),
                        ("etc/systemd/system/voxd.service", "0644")):
        line = next(line for line in out.splitlines() if line.endswith(
            ")") and f"{tmp_path}/{path} (" in line)
        assert line.startswith("would create") and f" {octal} root:root" in line, line
    assert (f"would run: CREDENTIALS_DIRECTORY={tmp_path}/etc/voxd/credentials "
            f"{install.voxd_command()} check-config --config {tmp_path}/etc/voxd/voxd.toml") in out
    assert "dry run: nothing was written" in out
    assert "systemctl daemon-reload && systemctl enable --now voxd" in out


def test_dry_run_shows_a_conflict_and_writes_nothing(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    before = snapshot(tmp_path)
    code, out, err = voxd(capsys, tmp_path, "--public-url", "https://other.example.com",
                          "--dry-run")
    assert code == 1
    assert '+public_url = "https://other.example.com"' in out
    assert "nothing would be written" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("url", "problem"), [
    ("http://voice.example.com", "must be https://"),
    ("wss://voice.example.com", "must be https://"),
    ("voice.example.com", "must be https://"),
    ("https://voice.example.com/twilio/voice", "no path, query or fragment"),
    ("https://voice.example.com?a=1", "no path, query or fragment"),
    ("https://", "no host name"),
    ("https://user:pw@voice.example.com", "user name or password"),
    ("https://voice.example.com:99999", "not a URL"),
    ('https://voice.example.com"\nx = "1', "not a URL"),
    ('https://voice"example.com', "is not a host name"),
    ("https://voice", "is not a host name"),
    ("https://127.0.0.1", "is this machine"),
    ("https://localhost:8443", "is this machine"),
    ("https://10.1.2.3", "private address"),
    ("https://voice.example.com:0", "port 0 is no port"),
    ("https://127.1", "127.1 (127.0.0.1) is this machine"),
    ("https://0x7f.1", "0x7f.1 (127.0.0.1) is this machine"),
    ("https://0177.0.0.1", "is this machine"),
    ("https://2130706433", "2130706433 (127.0.0.1) is this machine"),
    ("https://0", "is this machine"),
    ("https://[::1]", "is this machine"),
    ("https://[::ffff:127.0.0.1]", "::ffff:127.0.0.1 (127.0.0.1) is this machine"),
    ("https://[::127.0.0.1]", "is this machine"),
    ("https://[::ffff:8.8.8.8]", "an IPv4 address written as IPv6: write https://8.8.8.8"),
    ("https://localhost.", "is this machine"),
    ("https://LocalHost", "is this machine"),
    ("https://voice.localhost", "is this machine"),
    ("https://10.1", "10.1 (10.0.0.1) is a private address"),
    ("https://8.8.2056", "write the address 8.8.2056 as 8.8.8.8"),
])
def test_a_bad_public_url_is_refused_in_one_line(tmp_path, capsys, url, problem):
    code, _, err = voxd(capsys, tmp_path, "--public-url", url)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("voxd: install-service: --public-url: ")
    assert problem in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["https://voice.example.com:8443", "https://[2001:4860::1]"])
def test_a_public_url_with_a_port_or_an_address_is_taken(tmp_path, capsys, url):
    code, _, err = voxd(capsys, tmp_path, "--public-url", url)
    assert code == 0, err
    assert f'public_url = "{url}"' in (tmp_path / "etc/voxd/voxd.toml").read_text()


def test_the_first_run_needs_the_public_url(tmp_path, capsys):
    code, _, err = voxd(capsys, tmp_path)
    assert code == 2
    assert err == (f"voxd: install-service: --public-url is needed: {tmp_path}/etc/voxd/voxd.toml "
                   "does not exist yet (e.g. --public-url https://voice.example.com, the https "
                   "origin Twilio reaches through your proxy)\n")
    assert list(tmp_path.iterdir()) == []


def test_not_root_is_told_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    code, out, err = voxd(capsys, None, "--public-url", URL)
    assert code == 2 and out == ""
    assert err == ("voxd: install-service: writes /etc/voxd and /etc/systemd/system: run it as "
                   "root, or --dry-run to see what it would write\n")


def test_a_voxd_the_unit_cannot_see_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(install, "service_cannot_run", REAL_HOST_CHECK)
    monkeypatch.setattr(install, "voxd_command", lambda: "/root/venv/bin/voxd")
    code, out, err = voxd(capsys, None, "--public-url", URL, "--dry-run")
    assert code == 2 and out == ""
    assert err.startswith("voxd: install-service: this voxd runs from /root/venv/bin/voxd, "
                          "which the unit hides from the service (ProtectHome=yes")
    # Under --root (a test, an image build) the voxd that will run may be another: a warning.
    code, out, err = voxd(capsys, tmp_path, "--public-url", URL, "--dry-run")
    assert code == 0 and "would create" in out
    assert err.startswith("voxd: install-service: warning: this voxd runs from /root/venv/")


def test_a_python_under_a_hidden_directory_is_named(monkeypatch):
    monkeypatch.setattr(install.sys, "executable", "/opt/voxd/.venv/bin/python")
    monkeypatch.setattr(install.os.path, "realpath",
                        lambda path, **kw: "/root/.pyenv/versions/3.11.7/bin/python3.11")
    problem = REAL_HOST_CHECK("/opt/voxd/.venv/bin/voxd")
    assert problem is not None
    assert "runs from /root/.pyenv/versions/3.11.7/bin/python3.11, which the unit hides" in problem


def test_what_the_dynamic_user_cannot_use_is_named():
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="voxd-install-test-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        script = top / "bin" / "voxd"
        script.parent.mkdir(mode=0o755)
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        needed = [(str(script), stat.S_IXOTH, "run"), (str(top), stat.S_IXOTH | stat.S_IROTH,
                                                        "read")]
        assert install.not_usable_by_others(needed) is None
        script.chmod(0o700)  # pip under umask 077
        assert install.not_usable_by_others(needed) == (
            f"the service's user (DynamicUser=yes: not the owner) cannot run {script} (mode "
            "0700), which this voxd needs: chmod o+rx it, or install voxd with umask 022")
        script.chmod(0o755)
        script.parent.chmod(0o750)
        assert f"cannot reach {script.parent} (mode 0750)" in install.not_usable_by_others(
            needed)
    finally:
        shutil.rmtree(top)


def test_instances_for_the_nginx_example(tmp_path, capsys):
    upstreams = [int(port) for port in re.findall(
        r"^\s*server 127\.0\.0\.1:(\d+)", (CHECKOUT / "deploy/nginx/voxd.conf").read_text(),
        re.M)]
    assert len(upstreams) == 2
    args = [arg for port in upstreams for arg in ("--instance", str(port))]
    code, out, err = voxd(capsys, tmp_path, "--public-url", URL, *args)
    assert code == 0, err
    etc = tmp_path / "etc/voxd"
    assert not (etc / "voxd.toml").exists()
    assert not (tmp_path / "etc/systemd/system/voxd.service").exists()
    unit = (tmp_path / "etc/systemd/system/voxd@.service").read_text()
    assert f"ExecStart={install.voxd_command()} serve --config /etc/voxd/%i.toml" in unit
    secret = etc / "credentials/stream_secret"  # shared: a call's webhook and stream may part
    assert mode(secret) == 0o600 and secret.read_bytes() == b""
    (etc / "credentials/twilio_auth_token").write_text("test-token")
    secret.write_text("shared-stream-secret")
    for port in upstreams:
        config = tomllib.loads((etc / f"{port}.toml").read_text())
        assert config["server"]["listen"] == f"127.0.0.1:{port}"
        assert config["server"]["public_url"] == URL
        assert config["recording"]["directory"] == f"/var/lib/voxd-{port}/recordings"
        result = check_config(etc / f"{port}.toml", etc / "credentials")
        assert result.returncode == 0, result.stderr
    units = " ".join(f"voxd@{port}" for port in upstreams)
    assert f"systemctl daemon-reload && systemctl enable --now {units}" in out
    assert "head -c 32 /dev/urandom | base64 > /etc/voxd/credentials/stream_secret" in out


@pytest.mark.parametrize("port", ["80", "abc", "70000", ""])
def test_a_bad_instance_is_refused(tmp_path, capsys, port):
    code, _, err = voxd(capsys, tmp_path, "--public-url", URL, "--instance", port)
    assert code == 2 and "--instance: a port from 1024 to 65535" in err
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_fails_check_config_fails_the_install(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    config = tmp_path / "etc/voxd/voxd.toml"
    config.write_text(config.read_text().replace("[logging]", "[logging]\nlevl = 1"))
    code, _, err = voxd(capsys, tmp_path)
    assert code == 1
    assert "check-config: voxd: logging.levl: unknown key" in err
    assert f"{config} does not pass check-config" in err


def test_the_command_line_runs_it(tmp_path):
    """Through `python -m voxd`, once voxd/cli.py wires install-service in."""
    from voxd.cli import _parser

    if "install-service" not in _parser().format_help():
        pytest.skip("voxd/cli.py does not wire install-service in yet")
    result = subprocess.run([sys.executable, "-m", "voxd", "install-service", "--root",
                             str(tmp_path), "--public-url", URL],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "check-config: ok:" in result.stdout
    assert (tmp_path / "etc/voxd/voxd.toml").is_file()


# ---------------------------------------------------------------- the units, as packaged


def test_the_units_in_systemd_are_the_packaged_ones():
    for name in ("voxd.service", "voxd@.service"):
        assert (CHECKOUT / "systemd" / name).resolve() == (DATA / name).resolve()


def test_the_package_ships_what_install_service_reads():
    package_data = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["voxd"]
    for name in ("voxd.production.toml", "voxd.service", "voxd@.service"):
        assert any(Path(name).match(Path(pattern).name) and pattern.startswith("data/")
                   for pattern in package_data), f"pyproject's package-data misses data/{name}"


def unit_settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_template_unit_is_voxd_service_per_instance():
    single = unit_settings((DATA / "voxd.service").read_text())
    template = unit_settings((DATA / "voxd@.service").read_text())
    differ = {key for key in single.keys() | template.keys()
              if single.get(key) != template.get(key)}
    assert differ == {"Description", "ExecStart", "ExecReload", "LoadCredential",
                      "StateDirectory"}
    assert template["ExecStart"] == ["/opt/voxd/.venv/bin/voxd serve --config /etc/voxd/%i.toml"]
    assert template["ExecReload"] == [
        "/opt/voxd/.venv/bin/voxd reload --config /etc/voxd/%i.toml --pid $MAINPID"]
    assert template["StateDirectory"] == ["voxd-%i"]
    assert set(template["LoadCredential"]) == {
        *single["LoadCredential"], "stream_secret:/etc/voxd/credentials/stream_secret"}


@needs_analyze
def test_the_template_units_exposure_is_at_most_2(tmp_path):
    unit = tmp_path / "voxd@3001.service"
    shutil.copy(DATA / "voxd@.service", unit)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for voxd@3001.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


@needs_analyze
@pytest.mark.parametrize("name", ["voxd@.service", "voxd@3001.service"])
def test_the_installed_template_unit_verifies_clean(tmp_path, capsys, name):
    assert voxd(capsys, tmp_path, "--public-url", URL, "--instance", "3001")[0] == 0
    unit = tmp_path / name
    shutil.copy(tmp_path / "etc/systemd/system/voxd@.service", unit)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "voxd@" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


@needs_analyze
def test_the_installed_unit_verifies_clean(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    result = subprocess.run(["systemd-analyze", "verify",
                             str(tmp_path / "etc/systemd/system/voxd.service")],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "voxd.service" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


@pytest.mark.systemd
def test_install_service_under_systemd():
    """deploy/systemd-test/install_service.py: install-service in the Debian 12 container
    run.py builds, the service started with systemctl, run again, and as two instances."""
    from tests.integration.system_tools import missing_after_apt
    from tests.integration.test_systemd_service import HOW, TOOLS, _cannot

    if _cannot():
        pytest.skip(_cannot() or "")
    missing = missing_after_apt(TOOLS, ("systemd-container", "debootstrap"))
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed and apt-get could not ({HOW})")
    build = subprocess.run([sys.executable, str(CHECKOUT / "deploy/systemd-test/run.py"),
                            "--build-only"], capture_output=True, text=True, timeout=1200)
    if build.returncode == 77:
        pytest.skip((build.stderr.strip().splitlines() or ["?"])[-1])
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    result = subprocess.run([sys.executable,
                             str(CHECKOUT / "deploy/systemd-test/install_service.py")],
                            capture_output=True, text=True, timeout=900)
    if result.returncode == 77:
        pytest.skip((result.stderr.strip().splitlines() or ["?"])[-1])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# ---------------------------------------------------------------- against planted files


def test_a_planted_temporary_file_is_not_written_through(tmp_path, capsys):
    """The old fixed temporary name, planted as a hard link to a secret: never opened."""
    root = tmp_path / "root"
    (root / "etc/voxd").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("SECRET\n")
    victim.chmod(0o600)
    planted = root / "etc/voxd/.voxd.toml.install-service"
    os.link(victim, planted)
    code, _, err = voxd(capsys, root, "--public-url", URL)
    assert code == 0, err
    assert victim.read_text() == "SECRET\n" and mode(victim) == 0o600
    assert planted.exists()  # left as it was
    assert 'public_url = "https://voice.example.com"' in (root / "etc/voxd/voxd.toml").read_text()


def test_a_failed_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(install.os, "fsync", full)
    code, _, err = voxd(capsys, tmp_path, "--public-url", URL)
    monkeypatch.undo()
    assert code == 1
    assert err.count("\n") == 1
    assert "cannot write" in err and "No space left on device" in err
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_two_runs_at_once_do_not_write_into_each_others_file(tmp_path, monkeypatch):
    """A second run's write, while the first one's is in progress, to the same path: each
    writes a file of its own, the last rename wins, whole."""
    target = tmp_path / "voxd.toml"
    real_fsync = os.fsync
    nested: list[str] = []

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if not nested:
            nested.append("second")
            install._write(target, "second run\n" * 100, 0o644)

    monkeypatch.setattr(install.os, "fsync", fsync)
    install._write(target, "first run\n" * 100, 0o644)
    assert nested and target.read_text() == "first run\n" * 100
    assert [p.name for p in tmp_path.iterdir()] == ["voxd.toml"]


def test_a_hard_linked_config_is_not_fixed(tmp_path, capsys):
    """A config whose mode would be fixed, but which is another name of a file elsewhere: its
    mode is not changed (that would change the other file's), and nothing is written."""
    root = tmp_path / "root"
    root.mkdir()
    assert voxd(capsys, root, "--public-url", URL)[0] == 0
    config = root / "etc/voxd/voxd.toml"
    victim = tmp_path / "victim.toml"
    victim.write_text(config.read_text())
    victim.chmod(0o600)
    config.unlink()
    os.link(victim, config)
    before = snapshot(root)
    code, _, err = voxd(capsys, root)
    assert code == 1
    assert err == (f"voxd: install-service: {config} has 2 hard links (the same file under "
                   "other names, which install-service would change too): it changes no such "
                   f"file; make it a file of its own (cp -p {config} {config}.copy && mv "
                   f"{config}.copy {config}), then run again\n")
    assert mode(victim) == 0o600
    assert snapshot(root) == before


def test_a_hard_linked_credential_is_not_fixed_nor_chowned(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    assert voxd(capsys, root, "--public-url", URL)[0] == 0
    token = root / "etc/voxd/credentials/twilio_auth_token"
    victim = tmp_path / "shared"
    victim.write_text("public\n")
    victim.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(victim, 1, 1)
    token.unlink()
    os.link(victim, token)
    code, _, err = voxd(capsys, root)
    assert code == 1 and f"{token} has 2 hard links" in err
    assert mode(victim) == 0o644
    if os.geteuid() == 0:
        assert (victim.stat().st_uid, victim.stat().st_gid) == (1, 1)


def test_a_hard_linked_unit_is_not_replaced(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    unit = tmp_path / "etc/systemd/system/voxd.service"
    unit.write_text("[Service]\n")
    os.link(unit, tmp_path / "elsewhere.service")
    before = snapshot(tmp_path)
    code, _, err = voxd(capsys, tmp_path, "--public-url", URL, "--force")
    assert code == 1 and f"{unit} has 2 hard links" in err
    assert snapshot(tmp_path) == before


def test_a_file_swapped_for_a_link_after_the_plan_is_not_fixed(tmp_path, capsys, monkeypatch):
    """Between the plan and the fix, the file is replaced by a symbolic link: not followed."""
    root = tmp_path / "root"
    root.mkdir()
    assert voxd(capsys, root, "--public-url", URL)[0] == 0
    config = root / "etc/voxd/voxd.toml"
    config.chmod(0o600)
    victim = root / "victim"  # inside the root: only the descriptor's check can see it
    victim.write_text("x")
    victim.chmod(0o600)
    real_plan = install.plan

    def plan_then_swap(options):
        steps = real_plan(options)
        config.unlink()
        config.symlink_to(victim)
        return steps

    monkeypatch.setattr(install, "plan", plan_then_swap)
    code, _, err = voxd(capsys, root)
    assert code == 1 and err.count("\n") == 1
    assert f"{config} changed since it was looked at (it is a symbolic link now)" in err
    assert mode(victim) == 0o600


def test_force_does_not_write_its_backup_through_a_link(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    assert voxd(capsys, root, "--public-url", URL)[0] == 0
    config = root / "etc/voxd/voxd.toml"
    edited = config.read_text() + "# edit\n"
    config.write_text(edited)
    outside = tmp_path / "outside"
    (config.parent / "voxd.toml.bak").symlink_to(outside)  # dangling
    code, out, err = voxd(capsys, root, "--public-url", "https://v2.example.com", "--force")
    assert code == 0, err
    assert "the old one kept as voxd.toml.bak.2" in out
    assert not os.path.lexists(outside)
    assert (config.parent / "voxd.toml.bak").is_symlink()
    backup = config.parent / "voxd.toml.bak.2"
    assert backup.read_text() == edited and mode(backup) == 0o644


def test_an_empty_root_is_refused(capsys):
    code, out, err = voxd(capsys, None, "--root", "", "--public-url", URL, "--dry-run")
    assert code == 2 and out == ""
    assert err == ("voxd: install-service: --root: an empty path (an unset variable?): give the "
                   "directory to write under, or leave --root out to install into /\n")


@pytest.mark.parametrize("root", ["//", "/./", "/etc/..", "LINK"])
def test_the_real_root_spelled_otherwise_is_the_real_root(tmp_path, capsys, monkeypatch, root):
    """The checks of a real install (a voxd the unit cannot run is an error, not a warning;
    root needed) hold however / is written."""
    if root == "LINK":
        (tmp_path / "link").symlink_to("/")
        root = str(tmp_path / "link")
    monkeypatch.setattr(install, "service_cannot_run", REAL_HOST_CHECK)
    monkeypatch.setattr(install, "voxd_command", lambda: "/root/venv/bin/voxd")
    code, out, err = voxd(capsys, None, "--root", root, "--public-url", URL, "--dry-run")
    assert code == 2 and out == ""
    assert err.startswith("voxd: install-service: this voxd runs from /root/venv/bin/voxd")
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    with pytest.raises(install.InstallError, match="run it as root"):
        install.Options.from_args(parser().parse_args(
            ["install-service", "--root", root, "--public-url", URL]))


@pytest.mark.parametrize("link", ["etc", "etc/voxd", "etc/systemd/system"])
def test_a_link_under_root_leading_outside_it_is_refused(tmp_path, capsys, link):
    root = tmp_path / "root"
    elsewhere = tmp_path / "elsewhere"
    (root / link).parent.mkdir(parents=True)
    elsewhere.mkdir()
    (root / link).symlink_to(elsewhere)
    code, _, err = voxd(capsys, root, "--public-url", URL)
    assert code == 1 and err.count("\n") == 1
    assert err == (f"voxd: install-service: {root / link} is a symbolic link to "
                   f"'{elsewhere}', outside --root {root}: install-service writes only under "
                   "--root (make it a directory there)\n")
    assert list(elsewhere.iterdir()) == []


def test_a_link_under_root_staying_inside_it_is_followed(tmp_path, capsys):
    (tmp_path / "image-etc").mkdir()
    (tmp_path / "etc").symlink_to("image-etc")
    code, _, err = voxd(capsys, tmp_path, "--public-url", URL)
    assert code == 0, err
    assert (tmp_path / "image-etc/voxd/voxd.toml").is_file()


def test_a_link_put_under_root_after_the_plan_is_refused(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    elsewhere = tmp_path / "elsewhere"
    (root / "etc/systemd").mkdir(parents=True)
    elsewhere.mkdir()
    real_plan = install.plan

    def plan_then_link(options):
        steps = real_plan(options)
        (root / "etc/systemd").rmdir()
        (root / "etc/systemd").symlink_to(elsewhere)
        return steps

    monkeypatch.setattr(install, "plan", plan_then_link)
    code, _, err = voxd(capsys, root, "--public-url", URL)
    assert code == 1 and f"{root}/etc/systemd is a symbolic link" in err
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- ExecStart=


def test_a_percent_in_the_voxd_path_is_escaped(tmp_path, capsys, monkeypatch):
    script = tmp_path / "v%h" / "bin" / "voxd"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(install, "voxd_command", lambda: str(script))
    monkeypatch.setattr(install, "_check", lambda *args: True)  # the script is no voxd
    root = tmp_path / "root"
    root.mkdir()
    assert voxd(capsys, root, "--public-url", URL)[0] == 0
    unit = root / "etc/systemd/system/voxd.service"
    escaped = str(script).replace("%", "%%")
    assert f"ExecStart={escaped} serve --config /etc/voxd/voxd.toml\n" in unit.read_text()
    assert f"ExecReload={escaped} reload " in unit.read_text()
    if shutil.which("systemd-analyze") is not None:  # systemd reads it as the script's path
        result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "voxd.service" in line]
        assert result.returncode == 0 and problems == [], result.stdout + result.stderr


@pytest.mark.parametrize(("path", "problem"), [
    ("/opt/my voxd/bin/voxd", "a space, which ExecStart= would split"),
    ("/opt/my\tvoxd/bin/voxd", "a control character ('\\t')"),
    ("/opt/v\nExecStartPre=/bin/x/bin/voxd", "a control character ('\\n')"),
    ("/opt/$HOME/bin/voxd", "a dollar sign, which systemd would read as a variable"),
    ("/opt/a\\b/bin/voxd", "a backslash, which systemd would read as an escape"),
    ('/opt/a"b/bin/voxd', "a double quote, which systemd would read as a quote"),
    ("/opt/a'b/bin/python -m voxd", "a single quote, which systemd would read as a quote"),
    ("/opt/a\udcffb/bin/voxd", "bytes that are not UTF-8"),
])
def test_a_voxd_path_systemd_would_read_otherwise_is_refused(tmp_path, capsys, monkeypatch,
                                                              path, problem):
    monkeypatch.setattr(install, "service_cannot_run", REAL_HOST_CHECK)  # splits it as well
    monkeypatch.setattr(install, "voxd_command", lambda: path)
    code, out, err = voxd(capsys, tmp_path, "--public-url", URL)
    assert code == 2 and out == ""
    assert err.startswith("voxd: install-service: the path of this voxd, ") and err.count(
        "\n") == 1
    assert problem in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the operator's view


def test_widening_an_operators_config_says_why(tmp_path, capsys):
    assert voxd(capsys, tmp_path, "--public-url", URL)[0] == 0
    config = tmp_path / "etc/voxd/voxd.toml"
    config.chmod(0o640)
    code, out, _ = voxd(capsys, tmp_path)
    assert code == 0
    line = next(line for line in out.splitlines() if str(config) in line)
    assert line.startswith("fix ") and line.endswith(
        "mode 0640 -> 0644 so that the service's dynamic user (DynamicUser=yes) can read it; "
        "secrets go in /etc/voxd/credentials/)")
    assert mode(config) == 0o644


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_closed_output_stops_it_quietly(tmp_path, dry_run):
    """`voxd install-service ... | head -1`: the reader has gone; no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        result = subprocess.run([sys.executable, "-m", "voxd", "install-service", "--root",
                                 str(tmp_path), "--public-url", URL,
                                 *(["--dry-run"] if dry_run else [])],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert list(tmp_path.iterdir()) == []  # it stopped at the plan's first line

"""What an operator reads when the config is not what they meant: a guess for a misspelt key,
the real reason a file cannot be read, the empty secret named, a port that Twilio cannot reach,
and what a reload could not apply."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from voxd.config import (
    ConfigError,
    config_warnings,
    load_settings,
    parse_config,
    plural,
    port_mismatch,
    resolve_config_path,
)
from voxd.server import keep_restart_only

UNSIGNED = "[twilio]\nvalidate_signatures = false\n"


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {} if env is None else env, text=text)
    return caught.value.problems


@pytest.mark.parametrize(("text", "problem"), [
    ('[server]\nlistne = "0.0.0.0:3000"',
     "server.listne: unknown key (did you mean server.listen?)"),
    ("[call]\nmax_concurent_calls = 5",
     "call.max_concurent_calls: unknown key (did you mean call.max_concurrent_calls?)"),
    ("[servr]\nworkers = 2", "servr: unknown key (did you mean [server]?)"),
    ("[call]\nworkers = 2", "call.workers: unknown key (did you mean server.workers?)"),
    ('listen = "0.0.0.0:3000"', "listen: unknown key (did you mean server.listen?)"),
    ("[server]\ncolour = 1", "server.colour: unknown key"),
    ("[nonsense]", "nonsense: unknown key"),
])
def test_an_unknown_key_gets_the_closest_real_one(text, problem):
    assert problems(text + "\n" + UNSIGNED) == [problem]


def test_free_form_tables_take_any_key():
    settings = load_settings(None, {}, text=UNSIGNED + '[websocket]\nheaders = {"X-Listne" = "1"}')
    assert settings.config.websocket.headers == {"X-Listne": "1"}


def test_a_directory_as_the_config_says_so(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve_config_path(str(tmp_path), {})
    assert caught.value.problems == [
        f"--config: {tmp_path} is a directory; name the config file in it (such as "
        f"{tmp_path / 'voxd.toml'})"]
    with pytest.raises(ConfigError, match=r"^\$VOXD_CONFIG: .* is a directory"):
        resolve_config_path(None, {"VOXD_CONFIG": str(tmp_path)})
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_settings(tmp_path, {})  # a reload of a file since replaced by a directory
    with pytest.raises(ConfigError, match=r"--config: no such file: /no/such\.toml"):
        resolve_config_path("/no/such.toml", {})


def test_an_unreadable_config_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "voxd.toml"
    path.write_text(UNSIGNED)

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # the tests run as root: no chmod will do
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: cannot read: permission denied (voxd runs as ")


def test_a_config_that_is_not_text_says_so(tmp_path):
    path = tmp_path / "voxd.toml"
    path.write_bytes(b"\xff\xfe[server]")
    with pytest.raises(ConfigError, match=r"not valid TOML: not UTF-8 text \(byte 0\)"):
        load_settings(path, {})


def test_an_empty_credential_file_is_named(tmp_path):
    (tmp_path / "twilio_auth_token").write_text("\n")
    found = problems("", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert found == ["twilio.validate_signatures: true needs the Twilio auth token, but the "
                     f"credential file {tmp_path / 'twilio_auth_token'} is empty"]
    (tmp_path / "openai_api_key").write_text("")
    found = problems('[assistant]\nprovider = "openai"\n' + UNSIGNED,
                     {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert found == ['assistant.provider: "openai" needs the OpenAI API key, but the credential '
                     f"file {tmp_path / 'openai_api_key'} is empty"]


def test_an_empty_variable_is_named():
    found = problems("", {"VOXD_TWILIO_AUTH_TOKEN": " "})
    assert found == ["twilio.validate_signatures: true needs the Twilio auth token, but "
                     "$VOXD_TWILIO_AUTH_TOKEN is empty"]


def test_an_empty_credential_file_with_the_variable_set_is_not_a_problem(tmp_path):
    (tmp_path / "twilio_auth_token").write_text("")
    settings = load_settings(None, {"CREDENTIALS_DIRECTORY": str(tmp_path),
                                    "VOXD_TWILIO_AUTH_TOKEN": "t"}, text="")
    assert settings.secrets.twilio_auth_token is not None


def test_an_empty_credential_file_nothing_needs_is_a_warning(tmp_path):
    (tmp_path / "api_token").write_text("")
    settings = load_settings(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}, text=UNSIGNED)
    assert config_warnings(settings) == [
        f"credential api_token: the credential file {tmp_path / 'api_token'} is empty; "
        "it is ignored"]
    assert config_warnings(load_settings(None, {"VOXD_API_TOKEN": ""}, text=UNSIGNED)) == []


def test_a_reload_forgets_an_empty_source_the_running_config_filled():
    """After a reload the scrubbed environment is empty; the running secret is used, and no
    message blames the (now absent) variable."""
    running = load_settings(None, {"VOXD_TWILIO_AUTH_TOKEN": "t"}, text="")
    again = load_settings(None, {"VOXD_TWILIO_AUTH_TOKEN": ""}, text="",
                          secrets_before=running.secrets)
    assert again.secrets.twilio_auth_token == running.secrets.twilio_auth_token
    assert again.secrets.empty == {}


@pytest.mark.parametrize(("listen", "public_url"), [
    ("0.0.0.0:3027", "http://127.0.0.1:3000"),       # listen changed, public_url left as shipped
    ("0.0.0.0:3027", "http://voice.example.com:3000"),
    ("[::]:3027", "https://voice.example.com:8443"),
    ("10.0.0.5:3027", "http://10.0.0.5:3028"),
])
def test_a_public_port_voxd_does_not_listen_on_is_a_warning(listen, public_url):
    config = parse_config({"server": {"listen": listen, "public_url": public_url}})
    port = public_url.rsplit(":", 1)[1]
    assert port_mismatch(config) == (
        f"server.public_url: names port {port}, but server.listen is {listen}: Twilio reaches "
        f"voxd at {public_url} only if something forwards port {port} to "
        f"{listen.rsplit(':', 1)[1]}")


@pytest.mark.parametrize(("listen", "public_url"), [
    ("127.0.0.1:3000", "https://voice.example.com"),  # behind a TLS proxy on this machine
    ("127.0.0.1:3000", "https://voice.example.com:8443"),  # any port: the proxy is local
    ("localhost:3000", "http://voice.example.com:8080"),
    ("[::1]:3000", "http://[::1]:3001"),
    ("0.0.0.0:3027", "https://voice.example.com"),    # a load balancer on 443
    ("0.0.0.0:3027", "https://voice.example.com:443"),
    ("0.0.0.0:3027", "http://voice.example.com"),
    ("0.0.0.0:3027", "http://voice.example.com:3027"),  # voxd reached directly
    ("0.0.0.0:0", "http://127.0.0.1:3000"),           # the kernel picks the port
])
def test_ports_that_are_normal_are_not_warned(listen, public_url):
    config = parse_config({"server": {"listen": listen, "public_url": public_url}})
    assert port_mismatch(config) is None


def test_the_port_warning_is_among_the_config_warnings():
    settings = load_settings(None, {}, text='[server]\nlisten = "0.0.0.0:3027"\n' + UNSIGNED)
    assert [w.split(":")[0] for w in config_warnings(settings)] == ["server.public_url"]


def test_a_reload_keeps_listen_and_says_so():
    running = load_settings(None, {}, text='[server]\nlisten = "127.0.0.1:3000"\n' + UNSIGNED)
    new = load_settings(None, {}, text='[server]\nlisten = "0.0.0.0:4000"\nworkers = 3\n'
                                       'metrics_listen = "127.0.0.1:9100"\n' + UNSIGNED)
    kept, lines = keep_restart_only(new, running)
    assert kept.config.server.listen == "127.0.0.1:3000"
    assert kept.config.server.workers == 1 and kept.config.server.metrics_listen == ""
    assert lines == [
        "server.listen change ignored until restart: still listening on 127.0.0.1:3000 "
        "(the file now says 0.0.0.0:4000)",
        "server.metrics_listen change ignored until restart: still serving /metrics on the "
        "public port (the file now says 127.0.0.1:9100)",
        "server.workers change ignored until restart: still 1 worker (the file now says 3)",
    ]
    assert keep_restart_only(running, running) == (running, [])


def test_counts_are_pluralised():
    assert plural(1, "active call") == "1 active call"
    assert plural(0, "active call") == "0 active calls"
    assert plural(2, "child", "children") == "2 children"
    settings = load_settings(None, {}, text="[call]\nmax_concurrent_calls = 1\n" + UNSIGNED)
    from voxd.config import summary
    assert summary(settings).endswith("max 1 call")


def test_a_worker_marks_its_lines(monkeypatch):
    from voxd.observability.logging import VoxdFormatter, stderr_problem

    record = logging.LogRecord("voxd.server", logging.INFO, __file__, 1, "listening", (), None)
    assert " INFO voxd.server listening" in VoxdFormatter(journal=False).format(record)
    monkeypatch.setenv("VOXD_WORKER", "1")  # the supervisor's index 1: the second worker
    assert VoxdFormatter(journal=True).format(record) == "<6>INFO voxd.server worker=2 listening"
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert stderr_problem("voxd: one\ntwo") == "worker=2 voxd: one\nworker=2 two"


@pytest.mark.parametrize(("url", "problem"), [
    ("https://[oops", "server.public_url: not a valid URL: Invalid IPv6 URL (got 'https://[oops')"),
    ("https://:443", "server.public_url: must be an http:// or https:// origin such as "
                     "https://voice.example.com (got 'https://:443')"),
    ("https://example.com:abc", "server.public_url: not a valid URL: "),
    ("https://example.com:99999", "server.public_url: not a valid URL: "),
    ("https://example.com:0", "server.public_url: port 0 cannot be reached"),
    ("https://user:secret@example.com", "server.public_url: must not carry a user name or "
                                        "password (got the URL with one)"),
    ("https://h\x1b[31m.example.com", "server.public_url: must not contain spaces or control "
                                      "characters (got 'https://h\\x1b[31m.example.com')"),
    ("https://example.com/?a=1", "server.public_url: must not carry a query or fragment"),
])
def test_a_public_url_that_cannot_be_used_is_one_line_naming_the_key(url, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"public_url": url}, "twilio": {"validate_signatures": False}})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(problem)
    assert "secret" not in caught.value.problems[0]


def test_an_assistant_url_that_cannot_be_used_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_config({"assistant": {"provider": "websocket"},
                      "websocket": {"url": "ws://[::1"},
                      "twilio": {"validate_signatures": False}})
    assert caught.value.problems == ["websocket.url: not a valid URL: Invalid IPv6 URL "
                                     "(got 'ws://[::1')"]

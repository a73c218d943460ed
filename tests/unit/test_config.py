"""voxd.toml parsing: defaults, every problem named by its key, secrets kept secret."""

from __future__ import annotations

import pytest

from voxd.config import (
    Secret,
    load_secrets,
    load_settings,
    parse_config,
    resolve_config_path,
)
from voxd.errors import ConfigError

TOKEN_ENV = {"VOXD_TWILIO_AUTH_TOKEN": "tok"}


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, TOKEN_ENV if env is None else env, text=text)
    return exc.value.problems


def test_shipped_file_is_valid_and_runs_the_echo_assistant(tmp_path):
    from pathlib import Path

    settings = load_settings(Path(__file__).parents[2] / "voxd.toml", {})
    assert settings.config.assistant.provider == "echo"
    assert settings.config.server.listen == "127.0.0.1:3000"


def test_empty_file_gives_the_documented_defaults():
    config = load_settings(None, TOKEN_ENV, text="").config
    assert config.server.public_url == "http://127.0.0.1:3000"
    assert config.twilio.validate_signatures is True
    assert config.assistant.audio == "pcm16"
    assert config.call.keepalive_interval == 10.0
    assert config.call.max_concurrent_calls == 200


def test_every_problem_is_reported_at_once_with_its_key():
    found = problems("""
        [server]
        listen = "nowhere"
        workers = "two"
        colour = "blue"
        [assistant]
        provider = "vapi"
        [call]
        keepalive_timeout = -1
        fallback_twiml = "<Say>unclosed"
        [nonsense]
    """)
    assert "server.workers: input should be a valid integer (got 'two')" in found
    assert "server.colour: unknown key" in found
    assert "nonsense: unknown key" in found
    assert "call.keepalive_timeout: input should be greater than 0 (got -1)" in found
    assert any(p.startswith("server.listen: expected host:port") for p in found)
    assert any(p.startswith('vapi.assistant_id: required when assistant.provider = "vapi"')
               for p in found)
    assert any(p.startswith("call.fallback_twiml: not valid TwiML") for p in found)


@pytest.mark.parametrize(("text", "problem"), [
    ('[assistant]\nprovider = "gemini"', "assistant.provider: input should be 'echo', 'vapi', "),
    ('[assistant]\nprovider = "elevenlabs"',
     'elevenlabs.agent_id: required when assistant.provider = "elevenlabs"'),
    ('[assistant]\nprovider = "deepgram"\n[deepgram]\nbase_url = "https://x"',
     "deepgram.base_url: must be a ws:// or wss:// origin"),
    ('[assistant]\naudio = "opus"', "assistant.audio: input should be 'pcm16' or 'mulaw'"),
    ('[server]\npublic_url = "ftp://x"', "server.public_url: must be an http:// or https://"),
    ('[server]\nlisten = "127.0.0.1:99999"', "server.listen: port must be a number"),
    ('[twilio]\nvalidate_signatures = "yes"', "twilio.validate_signatures: input should be a "
                                              "valid boolean"),
    ('[websocket]\nurl = ""\n[assistant]\nprovider = "websocket"',
     'websocket.url: required when assistant.provider = "websocket"'),
    ('[websocket]\nurl = "http://x"\n[assistant]\nprovider = "websocket"',
     "websocket.url: must be a ws:// or wss:// URL"),
    ("server = 3", "server: must be a table ([server])"),
    ("[server\n", "not valid TOML"),
])
def test_single_problems(text, problem):
    assert any(p.startswith(problem) or problem in p for p in problems(text)), problems(text)


def test_validation_on_needs_the_auth_token():
    found = problems("", env={})
    assert found == [
        "twilio.validate_signatures: true needs the Twilio auth token (set "
        "VOXD_TWILIO_AUTH_TOKEN or the systemd credential twilio_auth_token), or set it to "
        "false for local testing"
    ]
    assert load_settings(None, {}, text="[twilio]\nvalidate_signatures = false")


def test_integers_are_accepted_for_seconds():
    config = parse_config({"call": {"keepalive_interval": 3}})
    assert config.call.keepalive_interval == 3.0


def test_secrets_come_from_credentials_before_the_environment(tmp_path):
    (tmp_path / "twilio_auth_token").write_text("from-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "VOXD_TWILIO_AUTH_TOKEN": "from-env",
           "VAPI_API_KEY": "vapi-key"}
    found = load_secrets(env)
    assert found.twilio_auth_token.reveal() == "from-credential"
    assert found.vapi_api_key.reveal() == "vapi-key"
    assert len(found.stream_secret.reveal()) >= 32  # generated when absent
    assert load_secrets({}).twilio_auth_token is None


def test_secrets_never_print():
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret} {secret!r}"
    assert "hunter2" not in repr(load_secrets({"VAPI_API_KEY": "hunter2"}))


def test_config_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config file"):
        resolve_config_path(None, {})
    (tmp_path / "voxd.toml").write_text("")
    assert str(resolve_config_path(None, {})) == "voxd.toml"
    other = tmp_path / "other.toml"
    other.write_text("")
    assert resolve_config_path(None, {"VOXD_CONFIG": str(other)}) == other
    assert resolve_config_path(str(other), {"VOXD_CONFIG": "/nope"}) == other
    with pytest.raises(ConfigError, match=r"\$VOXD_CONFIG: no such file: /nope"):
        resolve_config_path(None, {"VOXD_CONFIG": "/nope"})
    with pytest.raises(ConfigError, match="--config: no such file"):
        resolve_config_path("/nope", {})


def test_urls_derived_from_public_url():
    settings = load_settings(None, TOKEN_ENV,
                             text='[server]\npublic_url = "https://voice.example.com/"')
    assert settings.webhook_url == "https://voice.example.com/twilio/voice"
    assert settings.stream_url == "wss://voice.example.com/media-stream"
    plain = load_settings(None, TOKEN_ENV, text='[server]\npublic_url = "http://[::1]:3000"')
    assert plain.stream_url == "ws://[::1]:3000/media-stream"


# -- arbitrary input: a Config or a ConfigError naming keys, never another exception --

import re  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from voxd.config import Config  # noqa: E402

SECTIONS = {name: list(field.annotation.model_fields)  # type: ignore[union-attr]
            for name, field in Config.model_fields.items()}
SCALARS = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=True) | st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
SECTION = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(
        st.sampled_from(SECTIONS[name]) | st.text(max_size=10), VALUES, max_size=4)))
TABLES = st.dictionaries(st.text(max_size=10), VALUES, max_size=2).flatmap(
    lambda junk: st.lists(SECTION, max_size=4).map(lambda pairs: {**junk, **dict(pairs)}))


@settings(max_examples=300, deadline=None)
@given(TABLES)
def test_any_table_gives_a_config_or_problems_naming_keys(raw):
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:  # "key: what is wrong", the key as TOML writes it
            key, sep, _ = problem.partition(": ")
            bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", key)  # quoted parts may hold anything
            assert sep and key and " " not in bare and ":" not in bare, problem
        return
    assert isinstance(config, Config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_settings_or_config_errors(text):
    try:
        load_settings(None, TOKEN_ENV, text=text)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


def test_an_unreadable_credential_is_a_config_error_naming_it(tmp_path):
    """Not a traceback: one line naming the credential."""
    from voxd.config import ConfigError, read_secret

    (tmp_path / "vapi_api_key").mkdir()  # a directory where the file should be: unreadable
    (tmp_path / "vapi_api_key" / "x").write_text("")
    (tmp_path / "twilio_auth_token").write_bytes(b"\xff\xfe")
    assert read_secret("vapi_api_key", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    with pytest.raises(ConfigError, match="credential twilio_auth_token: cannot read"):
        read_secret("twilio_auth_token", {"CREDENTIALS_DIRECTORY": str(tmp_path)})


@pytest.mark.parametrize(("provider", "extra", "words"), [
    ("openai", "", "needs the OpenAI API key (set OPENAI_API_KEY"),
    ("deepgram", "", "needs the Deepgram API key (set DEEPGRAM_API_KEY"),
    ("elevenlabs", '[elevenlabs]\nagent_id = "a"\nsigned_url = true\n',
     "elevenlabs.signed_url: true needs the ElevenLabs API key"),
])
def test_a_vendor_without_its_key_is_a_config_error(provider: str, extra: str,
                                                    words: str) -> None:
    text = ('[twilio]\nvalidate_signatures = false\n'
            f'[assistant]\nprovider = "{provider}"\n{extra}')
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {}, text=text)
    assert any(words in problem for problem in refused.value.problems), refused.value.problems
    key = {"openai": "OPENAI_API_KEY", "deepgram": "DEEPGRAM_API_KEY",
           "elevenlabs": "ELEVENLABS_API_KEY"}[provider]
    assert load_settings(None, {key: "k"}, text=text).config.assistant.provider == provider

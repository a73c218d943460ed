"""voxd.toml -> frozen typed settings, and secrets from the environment or systemd credentials.

The file is parsed once (`load_settings`); nothing reads the raw TOML dict afterwards. Every
problem is reported as one line naming its key ("call.keepalive_timeout: must be > 0"), all
problems at once, so `voxd check-config` can print them together.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import secrets as _random
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voxd.audio.dtmf import KEYS
from voxd.errors import ConfigError
from voxd.observability.untrusted import show

SEARCH_PATHS = (Path("voxd.toml"), Path("/etc/voxd/voxd.toml"))
"""Where the config is looked for when neither --config nor $VOXD_CONFIG names a file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServerConfig(_Section):
    """`[server]`: where voxd listens and how Twilio reaches it."""

    listen: str = "127.0.0.1:3000"
    public_url: str = "http://127.0.0.1:3000"
    workers: Annotated[int, Field(ge=1)] = 1
    handshake_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds a new connection has to send its first complete request head."""
    max_connections: Annotated[int, Field(ge=1)] = 1000
    """Open TCP connections (calls, webhooks, scrapes, and ones still handshaking)."""
    max_connections_per_address: Annotated[int, Field(ge=1)] = 250
    """Open TCP connections from one remote address (behind a proxy, the proxy's)."""
    ipv6_prefix_length: Annotated[int, Field(ge=1, le=128)] = 64
    """IPv6 peers count against max_connections_per_address per network of this prefix."""
    metrics_listen: str = ""
    """host:port to serve /metrics on instead of the public port ("": the public port)."""


class TwilioConfig(_Section):
    """`[twilio]`: signature checking and REST call control."""

    validate_signatures: bool = True
    account_sid: str = ""
    """The account REST requests name ("": the account of each call, from Twilio's request)."""
    rest_call_control: bool = True
    """End, redirect and transfer live calls with Twilio's REST API whenever the auth token is
    there (false: never; calls then end through `<Connect action>`)."""
    api_base_url: str = "https://api.twilio.com"


class AssistantConfig(_Section):
    """`[assistant]`: which assistant answers, and the audio format spoken to it."""

    provider: Literal["echo", "vapi", "websocket", "openai", "elevenlabs", "deepgram"] = "echo"
    audio: Literal["pcm16", "mulaw"] = "pcm16"
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest message accepted from the assistant's socket. Assistants may send a whole
    utterance as one message: 1 MiB holds 32 s of pcm16 (131 s of mulaw), and bounds what one
    call can make voxd buffer. Twilio's own limit is call.max_message_bytes."""


class VapiConfig(_Section):
    """`[vapi]`: Vapi's API and the assistant to call."""

    base_url: str = "https://api.vapi.ai"
    assistant_id: str = ""
    assistant: dict[str, Any] = {}
    early_start: bool = True
    create_timeout: Annotated[float, Field(gt=0)] = 8.0
    create_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    transfer_tool: str = "transfer_call"
    """Name of the assistant's client-side function tool that transfers the call (its
    `destination` argument names a [transfer.to] entry; "" = none)."""
    dtmf_tool: str = "send_dtmf"
    """Name of the client-side tool that presses keys (argument `digits`; "" = none)."""
    end_call_tool: str = "end_call"
    """Name of a client-side tool that ends the call (Vapi's own endCall tool works too)."""


class ToolNames(_Section):
    """The function tools through which a real-time model uses voxd's call control (a name
    "" leaves that tool out)."""

    transfer_tool: str = "transfer_call"
    """Hand the caller to a person: argument `destination` (a [transfer.to] name), optional
    `announce`."""
    dtmf_tool: str = "send_dtmf"
    """Press keys on the call: argument `digits` (0-9 * # A-D, w = 500 ms pause)."""
    end_call_tool: str = "end_call"
    """End the call (after the last words play)."""


class OpenAIConfig(ToolNames):
    """`[openai]`: OpenAI Realtime over WebSocket."""

    base_url: str = "wss://api.openai.com"
    model: str = "gpt-realtime"
    voice: str = "alloy"
    instructions: str = "You are a helpful assistant on a phone call. Keep answers short."
    turn_detection: dict[str, Any] = {"type": "server_vad"}
    """The session's `turn_detection` object (server_vad or semantic_vad and their options)."""
    tools: list[dict[str, Any]] = []
    """More function tools for the model (voxd's own are added unless named "" above)."""
    greeting: bool = True
    """Ask the model to speak first (a `response.create` once the session is set up)."""


class ElevenLabsConfig(ToolNames):
    """`[elevenlabs]`: an ElevenLabs Agents (Conversational AI) agent over WebSocket."""

    base_url: str = "wss://api.elevenlabs.io"
    agent_id: str = ""
    signed_url: bool = False
    """Private agent: fetch a signed URL with the API key (else a public agent by id)."""
    api_base_url: str = "https://api.elevenlabs.io"
    """The HTTP API the signed URL comes from."""
    conversation_config_override: dict[str, Any] = {}


class DeepgramConfig(ToolNames):
    """`[deepgram]`: Deepgram Voice Agent over WebSocket."""

    base_url: str = "wss://agent.deepgram.com"
    settings: dict[str, Any] = {}
    """The `Settings` message's body (agent: listen/think/speak providers, prompt, greeting,
    functions); voxd fills in `audio` and adds its client-side call-control functions."""
    keepalive_interval: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds between `KeepAlive` messages (Deepgram closes an idle agent after ~10 s)."""


class WebsocketConfig(_Section):
    """`[websocket]`: a generic upstream speaking raw binary audio."""

    url: str = ""
    headers: dict[str, str] = {}


class CallConfig(_Section):
    """`[call]`: per-call behaviour and limits."""

    keepalive_interval: Annotated[float, Field(gt=0)] = 10.0
    keepalive_timeout: Annotated[float, Field(gt=0)] = 5.0
    preconnect_buffer_seconds: Annotated[float, Field(ge=0)] = 5.0
    max_concurrent_calls: Annotated[int, Field(ge=1)] = 200
    fallback_twiml: str = "<Say>Sorry, the assistant is unavailable right now.</Say>"
    start_timeout: Annotated[float, Field(gt=0)] = 10.0
    media_timeout: Annotated[float, Field(gt=0)] = 5.0
    stream_token: bool = True
    stream_token_ttl: Annotated[float, Field(gt=0, le=3600)] = 60.0
    playback_queue_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_message_bytes: Annotated[int, Field(ge=1024)] = 65536
    """Largest WebSocket message accepted from Twilio (a media message is about 400 bytes)."""
    max_payload_bytes: Annotated[int, Field(ge=160)] = 8000
    """Largest decoded media payload accepted from Twilio (it sends 160 bytes, 20 ms)."""
    max_call_seconds: Annotated[float, Field(gt=0)] = 4 * 3600.0
    send_timeout: Annotated[float, Field(gt=0)] = 5.0
    """Queued audio that cannot be sent to Twilio for this long ends the call."""
    upstream_send_timeout: Annotated[float, Field(gt=0)] = 5.0
    """Caller audio the assistant does not take for this long ends the call
    (reason=upstream-stalled); Twilio keeps being read meanwhile."""


class TransferConfig(_Section):
    """`[transfer]`: the people an assistant may hand the caller to (cold transfer)."""

    default: str = ""
    """The [transfer.to] name used when the assistant names none ("": none)."""
    to: dict[str, str] = {}
    """name -> "+E164" number or "sip:" URI: the only destinations an assistant may use."""
    announce: str = ""
    """Said to the caller before dialling, unless the assistant gives its own ("": nothing)."""
    caller_id: str = ""
    """callerId of the dialled leg ("": Twilio's default, the caller's number)."""
    timeout: Annotated[int, Field(ge=5, le=600)] = 30
    """Seconds the destination rings before it counts as not answering."""
    no_answer_twiml: str = ("<Say>Sorry, nobody can take your call right now. Please try "
                            "again later.</Say>")
    """TwiML verbs run when the destination is busy, does not answer or fails."""


class KeypadConfig(_Section):
    """`[keypad]`: the caller's key presses, passed on to the assistant."""

    forward: bool = True
    template: str = "The caller pressed {digits} on the keypad."
    """What an assistant that takes text hears (Vapi); {digits} becomes the keys, spaced."""
    collect: bool = False
    """Gather presses into one entry, ended by `finish_on` or `inter_digit_timeout`."""
    finish_on: str = "#"
    """The key that ends a collected entry (kept in it); "" for none."""
    inter_digit_timeout: Annotated[float, Field(gt=0, le=60)] = 3.0
    max_digits: Annotated[int, Field(ge=1, le=64)] = 32
    """Longest collected entry; longer ones are passed on in parts."""
    log_digits: bool = False
    """Show the keys in debug logs (off: key presses may be PINs)."""


class RecordingConfig(_Section):
    """`[recording]`: each call written by voxd as one stereo file (caller | what they heard)."""

    enabled: bool = False
    directory: str = "/var/lib/voxd/recordings"
    """Where the files go (the systemd unit's StateDirectory=voxd is /var/lib/voxd)."""
    format: Literal["wav", "flac", "opus"] = "wav"
    announce: str = ""
    """TwiML verbs played before the stream starts (e.g. a consent notice); "" for none."""
    keep_days: Annotated[float, Field(ge=0)] = 30.0
    """Recordings older than this are deleted by voxd (0: kept for ever)."""
    transcripts: bool = True
    """Put the assistant's transcripts (where its provider sends them) in the call's record."""


class OutboundConfig(_Section):
    """`[outbound]`: calls voxd places (`voxd dial`, `POST /calls`)."""

    from_number: str = ""
    """Caller id of outbound calls (a Twilio number of the account, E.164)."""
    allowed_to: list[str] = []
    """Shell-style patterns a destination must match, e.g. ["+1415555*"]; empty: none."""
    calls_per_second: Annotated[float, Field(gt=0, le=100)] = 1.0
    """Calls created per second by each voxd (shared out among server.workers); Twilio's
    default limit is 1."""
    queue_seconds: Annotated[float, Field(ge=0, le=20)] = 10.0
    """How long a `POST /calls` beyond the rate waits for its turn before it is refused (at
    most 20: the front door gives an HTTP connection 30 s in all)."""
    machine_detection: bool = True
    """Twilio's asynchronous answering-machine detection on every outbound call."""
    on_machine: Literal["continue", "hangup", "message"] = "continue"
    """When a machine answers: let the assistant go on (it is told), hang up, or play
    `machine_message` after the greeting's beep and hang up."""
    machine_message: str = ""
    """TwiML verbs for on_machine = "message" (e.g. <Say>...</Say>)."""
    ring_timeout: Annotated[int, Field(ge=5, le=600)] = 30
    """Seconds Twilio lets the callee's phone ring."""


class BargeInConfig(_Section):
    """`[barge_in]`: interrupting the assistant when the caller talks over it."""

    local_vad: bool | Literal["auto"] = "auto"
    min_speech_ms: Annotated[int, Field(ge=20, le=2000)] = 80
    playback_lead_ms: Annotated[int, Field(ge=20, le=2000)] = 200
    echo_margin_db: Annotated[float, Field(ge=0, le=60)] = 15.0
    resume_after_ms: Annotated[int, Field(ge=20, le=5000)] = 300


class DrainConfig(_Section):
    """`[drain]`: how a SIGTERM lets live calls finish."""

    timeout_seconds: Annotated[float, Field(ge=0)] = 120.0


class LoggingConfig(_Section):
    """`[logging]`: verbosity."""

    level: Literal["debug", "info", "warning", "error"] = "info"


class StateConfig(_Section):
    """`[state]`: state shared by several hosts behind one proxy."""

    redis_url: str = ""
    """redis:// or rediss:// URL of a Redis every host shares ("": this host only). One with a
    password belongs in the `redis_url` secret, which wins over this key."""


class Config(_Section):
    """The whole voxd.toml."""

    server: ServerConfig = ServerConfig()
    twilio: TwilioConfig = TwilioConfig()
    assistant: AssistantConfig = AssistantConfig()
    vapi: VapiConfig = VapiConfig()
    websocket: WebsocketConfig = WebsocketConfig()
    openai: OpenAIConfig = OpenAIConfig()
    elevenlabs: ElevenLabsConfig = ElevenLabsConfig()
    deepgram: DeepgramConfig = DeepgramConfig()
    call: CallConfig = CallConfig()
    barge_in: BargeInConfig = BargeInConfig()
    transfer: TransferConfig = TransferConfig()
    keypad: KeypadConfig = KeypadConfig()
    recording: RecordingConfig = RecordingConfig()
    outbound: OutboundConfig = OutboundConfig()
    drain: DrainConfig = DrainConfig()
    logging: LoggingConfig = LoggingConfig()
    state: StateConfig = StateConfig()


class Secret:
    """A secret string whose repr and str are `***`, so it never lands in a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must use it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Secrets:
    """Secrets, read from `$CREDENTIALS_DIRECTORY/NAME` or the environment, never from the file."""

    twilio_auth_token: Secret | None = None
    vapi_api_key: Secret | None = None
    websocket_auth: Secret | None = None
    redis_url: Secret | None = None
    api_token: Secret | None = None
    """voxd's own API token: `POST /calls` is served only when it is set."""
    openai_api_key: Secret | None = None
    elevenlabs_api_key: Secret | None = None
    deepgram_api_key: Secret | None = None
    stream_secret: Secret = field(default_factory=lambda: Secret(_random.token_urlsafe(32)))
    stream_secret_generated: bool = True
    """No stream secret was configured: this one was made at start (a reload keeps it, so the
    tokens given out before the reload stay valid)."""
    empty: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Secret name -> the source of it that was there but empty ("the credential file
    /run/credentials/voxd.service/twilio_auth_token is empty"), so a message can name it."""

    def filled_from(self, before: Secrets) -> Secrets:
        """These secrets, with what is missing taken from `before` (a reload: the environment
        was scrubbed; a credential file that is still there wins), and a generated stream
        secret replaced by the one in use."""
        generated = self.stream_secret_generated
        filled = replace(
            self,
            twilio_auth_token=self.twilio_auth_token or before.twilio_auth_token,
            vapi_api_key=self.vapi_api_key or before.vapi_api_key,
            websocket_auth=self.websocket_auth or before.websocket_auth,
            redis_url=self.redis_url or before.redis_url,
            api_token=self.api_token or before.api_token,
            openai_api_key=self.openai_api_key or before.openai_api_key,
            elevenlabs_api_key=self.elevenlabs_api_key or before.elevenlabs_api_key,
            deepgram_api_key=self.deepgram_api_key or before.deepgram_api_key,
            stream_secret=before.stream_secret if generated else self.stream_secret,
            stream_secret_generated=before.stream_secret_generated if generated else False,
        )
        return replace(filled, empty={name: source for name, source in self.empty.items()
                                      if getattr(filled, name) is None})


SECRET_SOURCES = {
    "twilio_auth_token": "VOXD_TWILIO_AUTH_TOKEN",
    "vapi_api_key": "VAPI_API_KEY",
    "websocket_auth": "VOXD_WEBSOCKET_AUTH",
    "stream_secret": "VOXD_STREAM_SECRET",
    "redis_url": "VOXD_REDIS_URL",
    "api_token": "VOXD_API_TOKEN",
    "openai_api_key": "OPENAI_API_KEY",
    "elevenlabs_api_key": "ELEVENLABS_API_KEY",
    "deepgram_api_key": "DEEPGRAM_API_KEY",
}
"""systemd credential name -> environment variable."""


def read_secret(name: str, environ: dict[str, str] | None = None) -> Secret | None:
    """One secret: the systemd credential file if present, else the environment variable."""
    return _read_secret(name, os.environ if environ is None else environ)[0]


def _read_secret(name: str, env: Mapping[str, str]) -> tuple[Secret | None, str | None]:
    """The secret `name` and, when a source of it was there but empty (an empty credential
    file, a variable set to ""), that source's description, for a message naming it."""
    empty: str | None = None
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / name
        try:
            value = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"credential {name}: cannot read $CREDENTIALS_DIRECTORY/{name}: "
                               f"{getattr(exc, 'strerror', None) or exc}"]) from None
        if value:
            return Secret(value), None
        if value is not None:
            empty = f"the credential file {path} is empty"
    variable = SECRET_SOURCES[name]
    value = env.get(variable, "").strip()
    if value:
        return Secret(value), None
    if empty is None and variable in env:
        empty = f"${variable} is empty"
    return None, empty


def scrub_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Remove the secrets' environment variables (once read), so no child process inherits
    them and nothing that dumps the environment shows them. (Linux keeps the process's
    initial environment block in /proc/PID/environ, readable by the same user and root only:
    systemd credentials avoid even that.)"""
    env = os.environ if environ is None else environ
    for variable in SECRET_SOURCES.values():
        env.pop(variable, None)


def load_secrets(environ: dict[str, str] | None = None) -> Secrets:
    """All secrets; the stream secret is generated when none is configured."""
    env = os.environ if environ is None else environ
    found = {name: _read_secret(name, env) for name in SECRET_SOURCES}
    empty = {name: source for name, (_, source) in found.items() if source is not None}
    secrets = Secrets(
        twilio_auth_token=found["twilio_auth_token"][0],
        vapi_api_key=found["vapi_api_key"][0],
        websocket_auth=found["websocket_auth"][0],
        redis_url=found["redis_url"][0],
        api_token=found["api_token"][0],
        openai_api_key=found["openai_api_key"][0],
        elevenlabs_api_key=found["elevenlabs_api_key"][0],
        deepgram_api_key=found["deepgram_api_key"][0],
        empty=empty,
    )
    stream = found["stream_secret"][0]
    if stream is None:
        return secrets
    return replace(secrets, stream_secret=stream, stream_secret_generated=False)


@dataclass(frozen=True)
class Settings:
    """Config plus secrets plus where the config came from: everything a running voxd reads."""

    config: Config
    secrets: Secrets
    source: Path | None = None

    @property
    def redis_url(self) -> str:
        """The shared Redis (the `redis_url` secret, else `[state] redis_url`; "" for none)."""
        secret = self.secrets.redis_url
        return secret.reveal() if secret is not None else self.config.state.redis_url

    @property
    def public_origin(self) -> str:
        """`server.public_url` without a trailing slash: the base of every URL Twilio gets."""
        return self.config.server.public_url.rstrip("/")

    @property
    def webhook_url(self) -> str:
        """The public URL Twilio POSTs the voice webhook to (and signs)."""
        return self.public_origin + "/twilio/voice"

    @property
    def stream_url(self) -> str:
        """The public ws(s):// URL of the media endpoint put in the TwiML (and signed)."""
        base = self.config.server.public_url.rstrip("/")
        scheme, rest = base.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + "/media-stream"


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:3000"); raises ValueError with a readable reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port!r}")
    return host, int(port)


def resolve_config_path(explicit: str | None, environ: dict[str, str] | None = None) -> Path:
    """--config, else $VOXD_CONFIG, else ./voxd.toml, else /etc/voxd/voxd.toml."""
    env = os.environ if environ is None else environ
    named = explicit or env.get("VOXD_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            origin = "--config" if explicit else "$VOXD_CONFIG"
            if path.is_dir():
                raise ConfigError([f"{origin}: {path} is a directory; name the config file in "
                                   f"it (such as {path / 'voxd.toml'})"])
            raise ConfigError([f"{origin}: no such file: {path}"])
        return path
    for path in SEARCH_PATHS:
        if path.is_file():
            return path
    raise ConfigError(
        ["no config file: pass --config PATH or set $VOXD_CONFIG "
         f"(looked for {', '.join(str(p) for p in SEARCH_PATHS)})"]
    )


def _user() -> str:
    """This process's user name (or uid), for a permission problem."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def load_settings(
    path: Path | None, environ: dict[str, str] | None = None, *, text: str | None = None,
    secrets_before: Secrets | None = None,
) -> Settings:
    """Read, validate and freeze the config at `path` (or `text`) plus secrets; ConfigError lists
    every problem. On a reload, `secrets_before` fills in what the environment no longer holds
    (voxd removes secrets from it once read: see `scrub_environment`)."""
    if text is None:
        if path is None:
            raise ConfigError(["no config file given"])
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ConfigError([f"{path}: is a directory, not a config file"]) from None
        except PermissionError:
            raise ConfigError([f"{path}: cannot read: permission denied (voxd runs as "
                               f"{_user()})"]) from None
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})"]
                              ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path or 'config'}: not valid TOML: {exc}"]) from exc
    config = parse_config(raw)
    secrets = load_secrets(environ)
    if secrets_before is not None:
        secrets = secrets.filled_from(secrets_before)
    problems = check_settings(config, secrets)
    if problems:
        raise ConfigError(problems)
    return Settings(config=config, secrets=secrets, source=path)


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate the raw TOML table into a frozen Config, or raise ConfigError naming each key."""
    problems: list[str] = []
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = _describe_all(errors)
        # Check the rest too, so one run reports every problem: drop what is wrong, retry.
        raw = _without(raw, [tuple(err["loc"]) for err in errors])
        try:
            config = Config.model_validate(raw)
        except ValidationError:
            raise ConfigError(problems) from None
    problems += _check_values(config)
    if problems:
        raise ConfigError(problems)
    return config


def _without(raw: dict[str, Any], locations: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of the raw table without the keys at `locations` (their defaults apply)."""
    copy = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for loc in locations:
        if len(loc) == 1:
            copy.pop(str(loc[0]), None)
        elif isinstance(copy.get(str(loc[0])), dict):
            copy[str(loc[0])].pop(str(loc[1]), None)
    return copy


ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
"""Twilio's AccountSid: AC and 32 lower-case hex digits."""
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
SIP_URI = re.compile(r"sips?:[^\s<>\"'&@]+@[^\s<>\"'&@]+")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
OUTBOUND_PATTERN = re.compile(r"\+[0-9*?\[\]!-]{1,40}")

_TYPE_TAGS = {"bool", "int", "float", "str"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(loc: tuple[Any, ...]) -> str:
    """The config key of an error location, without pydantic's union-member tags; a part that
    is not a bare TOML key is quoted, as TOML would write it."""
    parts = [str(p) for p in loc]
    while len(parts) > 2 and (parts[-1] in _TYPE_TAGS or "[" in parts[-1]):
        parts.pop()
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _describe_all(errors: list[Any]) -> list[str]:
    """One line per key: a value failing every member of a union is one problem."""
    lines: dict[str, list[str]] = {}
    for err in errors:
        key, _, message = _describe(err).partition(": ")
        lines.setdefault(key, []).append(message.rsplit(" (got ", 1)[0])
    got = {_key(err["loc"]): err.get("input") for err in errors}
    result: list[str] = []
    for key, messages in lines.items():
        if len(messages) == 1:
            result.extend(_describe(e) for e in errors if _key(e["loc"]) == key)
        else:
            result.append(f"{key}: {' or '.join(messages)} (got {got[key]!r})")
    return result


def _describe(err: Any) -> str:
    key = _key(err["loc"])
    if err["type"] == "extra_forbidden":
        guess = _did_you_mean(tuple(str(p) for p in err["loc"]), err.get("input"))
        return f"{key}: unknown key" + (f" (did you mean {guess}?)" if guess else "")
    if err["type"] == "model_type":
        return f"{key}: must be a table ([{key}])"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:]
    return f"{key}: {msg} (got {err['input']!r})"


def _did_you_mean(loc: tuple[str, ...], value: Any) -> str | None:
    """The key an unknown one was probably meant to be: a close spelling among the keys of
    its own section (`server.listne` -> `server.listen`, `[servr]` -> `[server]`), else the
    same name in another section (`call.workers` -> `server.workers`, a top-level `listen`
    -> `server.listen`); None when nothing is close."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field_info = model.model_fields.get(part)
        annotation = field_info.annotation if field_info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None  # inside a free-form table (vapi.assistant, deepgram.settings)
        model = annotation
    name = loc[-1]
    prefix = ".".join(loc[:-1])
    sections = {n: f.annotation for n, f in Config.model_fields.items()}
    if model is Config and isinstance(value, dict):
        close = difflib.get_close_matches(name, list(sections), n=1)
        return f"[{close[0]}]" if close else None
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    if close:
        return f"{prefix}.{close[0]}" if prefix else close[0]
    elsewhere = [f"{section}.{name}" for section, annotation in sections.items()
                 if section != prefix and isinstance(annotation, type)
                 and issubclass(annotation, BaseModel) and name in annotation.model_fields]
    return " or ".join(elsewhere[:3]) or None


def _check_values(config: Config) -> list[str]:
    problems: list[str] = []
    try:
        parse_listen(config.server.listen)
    except ValueError as exc:
        problems.append(f"server.listen: {exc}")
    if config.state.redis_url and not config.state.redis_url.startswith(
            ("redis://", "rediss://", "unix://")):
        problems.append("state.redis_url: must be a redis://, rediss:// or unix:// URL")
    if config.server.metrics_listen:
        try:
            parse_listen(config.server.metrics_listen)
        except ValueError as exc:
            problems.append(f"server.metrics_listen: {exc}")
        if config.server.metrics_listen == config.server.listen:
            problems.append("server.metrics_listen: must differ from server.listen")
    public = _url_problems("server.public_url", config.server.public_url, _HTTP,
                           "an http:// or https:// origin such as https://voice.example.com")
    if not public and {"?", "#"} & set(config.server.public_url):
        public.append("server.public_url: must not carry a query or fragment")
    problems += public
    if config.assistant.provider == "vapi":
        if not config.vapi.assistant_id and not config.vapi.assistant:
            problems.append('vapi.assistant_id: required when assistant.provider = "vapi" '
                            "(or an inline [vapi.assistant] table)")
        elif config.vapi.assistant_id and config.vapi.assistant:
            problems.append("vapi.assistant: set either vapi.assistant_id or an inline "
                            "[vapi.assistant], not both")
        problems += _url_problems("vapi.base_url", config.vapi.base_url, _HTTP, "an http(s) URL")
    if config.assistant.provider == "elevenlabs" and not config.elevenlabs.agent_id:
        problems.append('elevenlabs.agent_id: required when assistant.provider = "elevenlabs"')
    for section, url in (("openai", config.openai.base_url),
                         ("elevenlabs", config.elevenlabs.base_url),
                         ("deepgram", config.deepgram.base_url)):
        if config.assistant.provider == section:
            problems += _url_problems(f"{section}.base_url", url, _WS, "a ws:// or wss:// origin")
    if config.assistant.provider == "websocket":
        if not config.websocket.url:
            problems.append('websocket.url: required when assistant.provider = "websocket"')
        else:
            problems += _url_problems("websocket.url", config.websocket.url, _WS,
                                      "a ws:// or wss:// URL")
    problems += _check_verbs("call.fallback_twiml", config.call.fallback_twiml)
    if config.twilio.account_sid and not ACCOUNT_SID.fullmatch(config.twilio.account_sid):
        problems.append("twilio.account_sid: must be AC followed by 32 lower-case hex digits "
                        f"(got {config.twilio.account_sid!r})")
    problems += _check_transfer(config.transfer)
    if config.recording.enabled:
        problems += _check_verbs("recording.announce", config.recording.announce)
    problems += _check_keypad(config.keypad)
    problems += _check_outbound(config.outbound)
    problems += _url_problems("twilio.api_base_url", config.twilio.api_base_url, _HTTP,
                              "an http(s) URL")
    return problems


_HTTP = ("http", "https")
_WS = ("ws", "wss")


def _url_problem(key: str, url: str, schemes: tuple[str, ...], what: str) -> str | None:
    """Why `url` cannot be `key`'s value (one line naming the key, the value escaped), or
    None: one of `schemes`, a host, a port (if any) in 1-65535, no user or password, and no
    space or control character anywhere."""
    shown = show(url, 120)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return f"{key}: must not contain spaces or control characters (got '{shown}')"
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number in 0-65535 raises here
    except ValueError as exc:
        return f"{key}: not a valid URL: {exc} (got '{shown}')"
    if parts.scheme not in schemes or not parts.hostname:
        return f"{key}: must be {what} (got '{shown}')"
    if port == 0:
        return f"{key}: port 0 cannot be reached (got '{shown}')"
    if parts.username is not None or parts.password is not None:
        return f"{key}: must not carry a user name or password (got the URL with one)"
    return None


def _url_problems(key: str, url: str, schemes: tuple[str, ...], what: str) -> list[str]:
    problem = _url_problem(key, url, schemes, what)
    return [] if problem is None else [problem]


def _check_transfer(transfer: TransferConfig) -> list[str]:
    problems: list[str] = []
    for name, destination in transfer.to.items():
        key = f"transfer.to.{_key((name,))}"
        if not NAME.fullmatch(name):
            problems.append(f"{key}: a name is 1-64 letters, digits, '_' or '-'")
        if not (E164.fullmatch(destination) or SIP_URI.fullmatch(destination)):
            problems.append(f'{key}: must be a "+E164" number such as "+14155550100" or a '
                            f'"sip:" URI such as "sip:desk@pbx.example.com" (got {destination!r})')
    if transfer.default and transfer.default not in transfer.to:
        problems.append(f"transfer.default: {transfer.default!r} is not a name in [transfer.to]")
    if transfer.caller_id and not E164.fullmatch(transfer.caller_id):
        problems.append(f'transfer.caller_id: must be a "+E164" number (got '
                        f'{transfer.caller_id!r})')
    problems += _check_verbs("transfer.no_answer_twiml", transfer.no_answer_twiml)
    return problems


def _check_keypad(keypad: KeypadConfig) -> list[str]:
    problems: list[str] = []
    if "{digits}" not in keypad.template:
        problems.append("keypad.template: must contain {digits}")
    if keypad.finish_on not in ("", *KEYS):
        problems.append(f"keypad.finish_on: must be one key (0-9, *, #, A-D) or \"\" (got "
                        f"{keypad.finish_on!r})")
    return problems


def _check_verbs(key: str, verbs: str) -> list[str]:
    try:
        ET.fromstring(f"<Response>{verbs}</Response>")
    except ET.ParseError as exc:
        return [f"{key}: not valid TwiML verbs: {exc}"]
    return []


def _check_outbound(outbound: OutboundConfig) -> list[str]:
    problems: list[str] = []
    if outbound.from_number and not E164.fullmatch(outbound.from_number):
        problems.append("outbound.from_number: must be an E.164 number such as +14155550100 "
                        f"(got {outbound.from_number!r})")
    for pattern in outbound.allowed_to:
        if not OUTBOUND_PATTERN.fullmatch(pattern):
            problems.append("outbound.allowed_to: each pattern is + and digits with shell "
                            f"wildcards (* ? [0-9]), such as \"+1415555*\" (got {pattern!r})")
    if outbound.on_machine == "message":
        if not outbound.machine_message.strip():
            problems.append('outbound.machine_message: required when outbound.on_machine = '
                            '"message"')
        else:
            problems += _check_verbs("outbound.machine_message", outbound.machine_message)
    return problems


def check_settings(config: Config, secrets: Secrets) -> list[str]:
    """Problems that need config and secrets together (e.g. a required secret is missing)."""
    problems: list[str] = []

    def needs(name: str) -> str:
        """Where the missing secret `name` comes from, or which source of it is empty."""
        empty = secrets.empty.get(name)
        if empty is not None:
            return f", but {empty}"
        return f" (set {SECRET_SOURCES[name]} or the systemd credential {name})"

    if config.twilio.validate_signatures and secrets.twilio_auth_token is None:
        tail = ("" if "twilio_auth_token" in secrets.empty
                else ", or set it to false for local testing")
        problems.append("twilio.validate_signatures: true needs the Twilio auth token"
                        f"{needs('twilio_auth_token')}{tail}")
    if ("rest_call_control" in config.twilio.model_fields_set
            and config.twilio.rest_call_control and secrets.twilio_auth_token is None):
        problems.append("twilio.rest_call_control: true needs the Twilio auth token"
                        f"{needs('twilio_auth_token')}")
    if config.assistant.provider == "vapi" and secrets.vapi_api_key is None:
        problems.append('assistant.provider: "vapi" needs the Vapi private API key'
                        f"{needs('vapi_api_key')}")
    if config.assistant.provider == "openai" and secrets.openai_api_key is None:
        problems.append('assistant.provider: "openai" needs the OpenAI API key'
                        f"{needs('openai_api_key')}")
    if config.assistant.provider == "deepgram" and secrets.deepgram_api_key is None:
        problems.append('assistant.provider: "deepgram" needs the Deepgram API key'
                        f"{needs('deepgram_api_key')}")
    if (config.assistant.provider == "elevenlabs" and config.elevenlabs.signed_url
            and secrets.elevenlabs_api_key is None):
        problems.append("elevenlabs.signed_url: true needs the ElevenLabs API key"
                        f"{needs('elevenlabs_api_key')}")
    return problems


def is_loopback_host(host: str) -> bool:
    """True for a host name or address only this machine reaches (127.0.0.0/8, ::1,
    localhost)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def port_mismatch(config: Config) -> str | None:
    """A warning when `server.public_url` names a port voxd does not listen on, where that is
    likely a mistake; None otherwise.

    The rule: warn when the public URL names a port other than its scheme's default
    (`http://host:3000`), that port differs from `server.listen`'s, and voxd listens on a
    non-loopback address (so Twilio is meant to reach it directly). Not warned: a loopback
    `listen` (a proxy on this machine forwards to it, whatever the public port is); a public
    URL on its scheme's default port (https on 443, http on 80: a TLS proxy or load balancer
    in front is normal); `listen` on port 0 (the kernel picks one)."""
    try:
        host, port = parse_listen(config.server.listen)
        public = urlsplit(config.server.public_url)
        public_port = public.port
    except ValueError:
        return None  # reported as a problem already
    default = {"http": 80, "https": 443}.get(public.scheme)
    if (port == 0 or public_port is None or public_port in (port, default)
            or is_loopback_host(host)):
        return None
    return (f"server.public_url: names port {public_port}, but server.listen is "
            f"{config.server.listen}: Twilio reaches voxd at {config.server.public_url} only "
            f"if something forwards port {public_port} to {port}")


def config_warnings(settings: Settings) -> list[str]:
    """What is valid but probably not meant: one line each, naming the key (check-config
    prints them, `voxd serve` logs them at start and after a reload)."""
    warnings: list[str] = []
    mismatch = port_mismatch(settings.config)
    if mismatch is not None:
        warnings.append(mismatch)
    for name, source in settings.secrets.empty.items():
        if source.startswith("the credential file"):
            warnings.append(f"credential {name}: {source}; it is ignored")
    return warnings


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 call`, `2 calls` (`nouns` for an irregular plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def summary(settings: Settings) -> str:
    """One line describing a valid config, for `voxd check-config` and the start-up log."""
    c = settings.config
    signatures = "on" if c.twilio.validate_signatures else "OFF"
    return (
        f"ok: {settings.source or 'built-in defaults'}: listen {c.server.listen}, "
        f"public {c.server.public_url}, assistant {c.assistant.provider} ({c.assistant.audio}), "
        f"signatures {signatures}, max {plural(c.call.max_concurrent_calls, 'call')}"
        + (f", {c.server.workers} workers" if c.server.workers > 1 else "")
    )

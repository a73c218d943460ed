"""A real voxd on an ephemeral loopback port, per test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

import pytest
import trio

from voxd.config import Secret, Secrets, Settings, parse_config
from voxd.runtime import Runtime
from voxd.server import bound_origin, open_listener, serve


@dataclass
class RunningVoxd:
    """A voxd serving in the test's nursery."""

    origin: str
    token: str | None
    runtime: Runtime

    @property
    def webhook(self) -> str:
        return self.origin + "/twilio/voice"

    @property
    def stream_url(self) -> str:
        return self.runtime.settings.stream_url


def make_settings(origin: str, token: str | None, secrets: dict[str, str] | None = None,
                  **sections: dict[str, Any]) -> Settings:
    raw: dict[str, Any] = {k: dict(v) for k, v in sections.items()}
    raw.setdefault("server", {}).update(listen="127.0.0.1:0", public_url=origin)
    raw.setdefault("twilio", {}).setdefault("validate_signatures", token is not None)
    # No Twilio REST API here unless a test brings its fake (then it sets this): calls end
    # through the stream's <Connect action>, which the simulator follows.
    raw["twilio"].setdefault("rest_call_control", False)
    config = parse_config(raw)  # the same checks as a config file gets
    named = {k: Secret(v) for k, v in (secrets or {}).items()}
    return Settings(config=config,
                    secrets=Secrets(twilio_auth_token=Secret(token) if token else None, **named))


@pytest.fixture
async def start_voxd(nursery: trio.Nursery) -> Callable[..., Any]:
    """`await start_voxd(signed=True, call={...}, assistant={...})` -> RunningVoxd."""
    sockets = []

    async def start(signed: bool = True, secrets: dict[str, str] | None = None,
                    **sections: dict[str, Any]) -> RunningVoxd:
        sock = open_listener("127.0.0.1:0")
        sockets.append(sock)
        origin = bound_origin(sock)
        token = token_hex(16) if signed else None
        settings = make_settings(origin, token, secrets, **sections)
        runtime = await nursery.start(serve, settings, sock)
        return RunningVoxd(origin, token, runtime)

    yield start
    for sock in sockets:
        sock.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Conformance tests a provider's protocol cannot do are skipped here, with the reason
    its row gives (a skip from inside a trio test would lose the reason)."""
    for item in items:
        check = getattr(getattr(item, "function", None), "needs", None)
        callspec = getattr(item, "callspec", None)
        if check is None or callspec is None or "line" not in callspec.params:
            continue
        reason = item.module.skip_reason(callspec.params["line"], check)  # type: ignore[attr-defined]
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))

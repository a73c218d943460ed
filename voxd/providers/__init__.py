"""Assistants voxd can connect a call to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxd.errors import ConfigError

if TYPE_CHECKING:
    from voxd.config import Settings
    from voxd.providers.base import Provider


def build_provider(settings: Settings) -> Provider:
    """The provider `assistant.provider` names, configured from the settings."""
    config = settings.config
    name = config.assistant.provider
    if name == "echo":
        from voxd.providers.echo import EchoProvider

        return EchoProvider(config.assistant.audio)
    if name == "vapi":
        from voxd.providers.vapi import VapiProvider

        return VapiProvider(settings)
    if name == "websocket":
        from voxd.providers.websocket import WebSocketProvider

        return WebSocketProvider(settings)
    raise ConfigError([f'assistant.provider: "{name}" is not available in this version'])

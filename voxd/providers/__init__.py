"""Assistants voxd can connect a call to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxd.errors import ConfigError

if TYPE_CHECKING:
    from voxd.config import Settings
    from voxd.providers.base import EarlyStarts, Provider


def build_provider(settings: Settings, early: EarlyStarts | None = None) -> Provider:
    """The provider `assistant.provider` names, configured from the settings; `early` is the
    server's registry of work started at the webhook (shared across reloads)."""
    config = settings.config
    name = config.assistant.provider
    if name == "echo":
        from voxd.providers.echo import EchoProvider

        return EchoProvider(config.assistant.audio,
                            echo_margin_db=config.barge_in.echo_margin_db)
    if name == "vapi":
        from voxd.providers.vapi import VapiProvider

        return VapiProvider(settings, early)
    if name == "websocket":
        from voxd.providers.websocket import WebSocketProvider

        return WebSocketProvider(settings)
    if name == "openai":
        from voxd.providers.openai import OpenAIProvider

        return OpenAIProvider(settings)
    if name == "elevenlabs":
        from voxd.providers.elevenlabs import ElevenLabsProvider

        return ElevenLabsProvider(settings)
    if name == "deepgram":
        from voxd.providers.deepgram import DeepgramProvider

        return DeepgramProvider(settings)
    raise ConfigError([f'assistant.provider: "{name}" is not available in this version'])

"""BotContext: PTB's CallbackContext with a typed `services` property."""

from __future__ import annotations

from typing import Any

from telegram.ext import CallbackContext, ExtBot

from imagebot.services import Services

SERVICES_KEY = "services"


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    """What every handler receives; `context.services` is the app object."""

    @property
    def services(self) -> Services:
        services = self.bot_data[SERVICES_KEY]
        assert isinstance(services, Services)
        return services

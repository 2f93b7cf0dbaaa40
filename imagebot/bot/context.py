"""BotContext: PTB's CallbackContext with a typed `services` property."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telegram.ext import CallbackContext, ExtBot

from imagebot.services import Services

if TYPE_CHECKING:
    from imagebot.bot.callbacks import ChoicePress, Press

SERVICES_KEY = "services"


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    """What every handler receives; `context.services` is the app object."""

    # The button press the gate (bot/callbacks.py) accepted for this update, if any; one
    # context serves every handler group of an update, so the buttons read it here.
    button_press: Press | None = None
    # a /style or /settings choice press the gate accepted (its presser owns the buttons)
    choice_press: ChoicePress | None = None

    @property
    def services(self) -> Services:
        services = self.bot_data[SERVICES_KEY]
        assert isinstance(services, Services)
        return services

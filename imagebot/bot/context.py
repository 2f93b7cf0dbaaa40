"""BotContext: PTB's CallbackContext with a typed `services` property."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from telegram.ext import Application, CallbackContext, ExtBot

if TYPE_CHECKING:
    # Typing only: at run time the bot layer must not pull in the runner and the providers.
    from imagebot.bot.callbacks import ChoicePress, Press
    from imagebot.services import Services
    from imagebot.store.prefs import Prefs

SERVICES_KEY = "services"


def services_of(application: Application[Any, Any, Any, Any, Any, Any]) -> Services:
    """The app object, for code that runs without an update (scheduled passes)."""
    return cast("Services", application.bot_data[SERVICES_KEY])


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    """What every handler receives; `context.services` is the app object."""

    # The button press the gate (bot/callbacks.py) accepted for this update, if any; one
    # context serves every handler group of an update, so the buttons read it here.
    button_press: Press | None = None
    # a /style or /settings choice press the gate accepted (its presser owns the buttons)
    choice_press: ChoicePress | None = None
    # run inside the transaction that creates this update's job (the /edit conversation
    # ends there: bot/edit.py), with the write connection
    also_in_job_transaction: Callable[[Any], object] | None = None
    # the user's stored choices, read with their language at the start of the update
    # (bot/language.py) so that a request reads the user_prefs row once, not twice
    prefs: Prefs | None = None

    @property
    def services(self) -> Services:
        return services_of(self.application)

"""Telegram's "/" command menus: the user commands for everyone, user + admin commands in each
admin's own chat, set with setMyCommands at start-up only when a list changed.

`build_menus` makes every list from the texts (imagebot/texts.py), one `Menu` per scope and
language; a per-language menu is one more `Menu` with its `language_code`. What was last set
is kept per scope as a SHA-256 of the list (bot_state.command_menus), so a restart storm makes
no Bot API call, and a scope that failed (Telegram unreachable) is tried again next start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from telegram import Bot, BotCommand, BotCommandScope, BotCommandScopeChat, BotCommandScopeDefault
from telegram.error import TelegramError

from imagebot import texts
from imagebot.config import Settings
from imagebot.logs import get_logger
from imagebot.store.access import AccessStore

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Menu:
    """One setMyCommands call: the scope, its language (None = every language), the list."""

    key: str  # "default", "chat:<id>", with "/<language>" when language_code is set
    scope: BotCommandScope
    language_code: str | None
    commands: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.commands).encode()).hexdigest()

    def bot_commands(self) -> list[BotCommand]:
        return [BotCommand(name, description) for name, description in self.commands]


def _key(base: str, language: str | None) -> str:
    return f"{base}/{language}" if language else base


def build_menus(settings: Settings, languages: Sequence[str | None] = (None,)) -> list[Menu]:
    """Every menu to set: the default scope, and each admin's chat, per language (a Telegram
    language_code such as "ru"; None: the menu for every other language)."""
    credits = settings.credits.enabled
    menus: list[Menu] = []
    for language in languages:
        # each language's descriptions from its catalog (None: the default menu, English)
        with texts.speaking(texts.negotiate(language)):
            users = tuple(texts.user_commands(credits))
            admins = users + tuple(texts.admin_commands(credits))
        menus.append(Menu(_key("default", language), BotCommandScopeDefault(), language, users))
        for admin_id in sorted(set(settings.access.admins)):
            menus.append(
                Menu(
                    _key(f"chat:{admin_id}", language),
                    BotCommandScopeChat(admin_id),
                    language,
                    admins,
                )
            )
    return menus


def _scope_of(key: str) -> tuple[BotCommandScope, str | None] | None:
    """The scope and language a stored key names (for deleting a menu no longer wanted)."""
    base, _, language = key.partition("/")
    if base == "default":
        return BotCommandScopeDefault(), language or None
    if base.startswith("chat:"):
        try:
            return BotCommandScopeChat(int(base.removeprefix("chat:"))), language or None
        except ValueError:
            return None
    return None


async def publish(bot: Bot, access: AccessStore, menus: list[Menu]) -> int:
    """Set the menus that changed since the last start; return the Bot API calls made."""
    stored = (await access.state()).command_menus
    done: dict[str, str] = {}
    calls = 0
    for menu in menus:
        if stored.get(menu.key) == menu.digest:
            done[menu.key] = menu.digest
            continue
        calls += 1
        try:
            await bot.set_my_commands(
                menu.bot_commands(), scope=menu.scope, language_code=menu.language_code
            )
        except TelegramError as exc:
            log.warning("command_menu_failed", scope=menu.key, error=str(exc))
            continue
        done[menu.key] = menu.digest
        log.info("command_menu_set", scope=menu.key, commands=len(menu.commands))
    wanted = {menu.key for menu in menus}
    for key in sorted(stored.keys() - wanted):  # e.g. an admin no longer in config.toml
        target = _scope_of(key)
        if target is None:
            continue
        calls += 1
        try:
            await bot.delete_my_commands(scope=target[0], language_code=target[1])
        except TelegramError as exc:
            log.warning("command_menu_failed", scope=key, error=str(exc))
            done[key] = stored[key]  # try again next start
            continue
        log.info("command_menu_removed", scope=key)
    if done != stored:
        await access.set_command_menus(done)
    return calls

"""Callback data of the bot's buttons: the one format, encoded and parsed here (a leaf).

Job buttons are `<button>:<job id>[:<image>|:<name>]`; the choice buttons of /style and
/settings are `p<s|h|c>:<user id>:<value>`. At most 64 bytes (Telegram's limit), ASCII digits
only. bot/callbacks.py checks who may press; delivery.py puts the buttons under messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAX_DATA_BYTES = 64  # Telegram's limit for callback_data: anything longer was not our button
MAX_JOB_ID = 2**63 - 1  # SQLite's INTEGER; a bigger number would overflow the query
MAX_INDEX = 99  # an album has at most 10 images
_SHAPE = re.compile(r"([a-z]):([1-9][0-9]{0,18})(?::([0-9]{1,2}|\*))?", re.ASCII)
# a job button naming a choice by name (h:<job>:<shape name>)
_NAMED = re.compile(r"([a-z]):([1-9][0-9]{0,18}):([a-z0-9-]{1,32})", re.ASCII)
# a choice button of /style or /settings: p<field>:<user id>:<value>
_CHOICE = re.compile(r"p([shc]):([1-9][0-9]{0,18}):([a-z0-9-]{1,32})", re.ASCII)


class Button(StrEnum):
    """The buttons the bot puts under its messages; the value is the data prefix."""

    AGAIN = "a"
    EDIT = "e"
    ORIGINAL = "o"
    CANCEL = "x"
    REMIX = "r"  # 🎨 Remix: ask for a new description, same style, shape and count
    SHAPE = "h"  # Square / Portrait / …: the same prompt again in that shape
    UPSCALE = "u"  # ⤴ under a result image (issue 17)
    DELETE = "d"  # 🗑 under a result: removes its messages
    HISTORY = "g"  # a /history entry: the result sent again ("get") by file_id


class _Index(StrEnum):
    NONE = "none"  # a:<job>, x:<job>
    ONE = "one"  # e:<job>:<n>
    ONE_OR_ALL = "one_or_all"  # o:<job>:<n> or o:<job>:*
    NAME = "name"  # h:<job>:<shape name>


_INDEX = {
    Button.AGAIN: _Index.NONE,
    Button.CANCEL: _Index.NONE,
    Button.EDIT: _Index.ONE,
    Button.ORIGINAL: _Index.ONE_OR_ALL,
    Button.REMIX: _Index.NONE,
    Button.SHAPE: _Index.NAME,
    Button.UPSCALE: _Index.ONE,
    Button.DELETE: _Index.NONE,
    Button.HISTORY: _Index.NONE,
}


@dataclass(frozen=True, slots=True)
class ButtonData:
    """What a button's callback data says: which button, which job, which image (None = all)."""

    button: Button
    job_id: int
    index: int | None = None
    name: str | None = None  # NAME buttons: the choice they name (a shape)

    def encode(self) -> str:
        if _INDEX[self.button] is _Index.NONE:
            return f"{self.button.value}:{self.job_id}"
        if _INDEX[self.button] is _Index.NAME:
            return f"{self.button.value}:{self.job_id}:{self.name}"
        return f"{self.button.value}:{self.job_id}:{'*' if self.index is None else self.index}"


def parse_button_data(data: object) -> ButtonData | None:
    """The button data in a press, or None when it is not exactly what our buttons send."""
    if not isinstance(data, str) or len(data.encode("utf-8", "replace")) > MAX_DATA_BYTES:
        return None
    named = _NAMED.fullmatch(data)
    if named is not None and named.group(1) in _NAMED_PREFIXES:
        job_id = int(named.group(2))
        if job_id > MAX_JOB_ID:
            return None
        return ButtonData(Button(named.group(1)), job_id, name=named.group(3))
    match = _SHAPE.fullmatch(data)
    if match is None:
        return None
    prefix, job_text, index_text = match.groups()
    try:
        button = Button(prefix)
    except ValueError:
        return None
    job_id = int(job_text)
    if job_id > MAX_JOB_ID:
        return None
    shape = _INDEX[button]
    if shape is _Index.NAME:
        return None  # its name was not a valid one (handled above)
    if shape is _Index.NONE:
        return ButtonData(button, job_id) if index_text is None else None
    if index_text is None or (index_text == "*" and shape is not _Index.ONE_OR_ALL):
        return None
    if index_text == "*":
        return ButtonData(button, job_id, None)
    index = int(index_text)
    if index > MAX_INDEX or (len(index_text) > 1 and index_text.startswith("0")):
        return None
    return ButtonData(button, job_id, index)


_NAMED_PREFIXES = frozenset(b.value for b, shape in _INDEX.items() if shape is _Index.NAME)


class Choice(StrEnum):
    """What a /style or /settings button sets; the value is its data's second letter."""

    STYLE = "s"
    SHAPE = "h"
    COUNT = "c"


@dataclass(frozen=True, slots=True)
class ChoiceData:
    """A choice button's data: which choice, for which user, which value (a style id, a shape
    name or an image count)."""

    choice: Choice
    user_id: int
    value: str

    def encode(self) -> str:
        return f"p{self.choice.value}:{self.user_id}:{self.value}"


def parse_choice_data(data: object) -> ChoiceData | None:
    """The choice in a press, or None when it is not exactly what a choice button sends."""
    if not isinstance(data, str) or len(data.encode("utf-8", "replace")) > MAX_DATA_BYTES:
        return None
    match = _CHOICE.fullmatch(data)
    if match is None:
        return None
    user_id = int(match.group(2))
    if user_id > MAX_JOB_ID:
        return None
    return ChoiceData(Choice(match.group(1)), user_id, match.group(3))

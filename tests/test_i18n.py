"""Languages: every text through the gettext catalogs, chosen per user and per job (issue 19)."""

from __future__ import annotations

import gettext
import io
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from imagebot import texts
from imagebot.models import JobKind
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.test_e2e import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID
ROOT = Path(__file__).resolve().parents[1]
LOCALE = texts.locale_dir()
TRANSLATED = sorted(code for code in texts.LANGUAGES if code != texts.DEFAULT_LANGUAGE)
# {name}, {0}, %s, %(name)s, %d: whatever a format call fills in
_PLACEHOLDER = re.compile(r"\{[^{}]*\}|%\([a-z_]+\)[sdif]|%[sdif]")


def speaking_as(update: dict[str, Any], language_code: str | None) -> dict[str, Any]:
    """The update as sent by a user whose Telegram app is set to `language_code`."""
    for key in ("message", "callback_query"):
        if key in update:
            update[key]["from"]["language_code"] = language_code
    return update


def send(telegram: FakeTelegram, text: str, language_code: str | None = "ru") -> None:
    telegram.push_update(speaking_as(updates.command(text), language_code))


def buttons(sent: SentMessage) -> list[str]:
    markup = sent.reply_markup or {}
    return [b["text"] for row in markup.get("inline_keyboard", []) for b in row]


def in_language(language: str, fn: Any, *args: Any) -> str:
    with texts.speaking(language):
        return str(fn(*args))


def placeholders(text: str) -> list[str]:
    return sorted(_PLACEHOLDER.findall(text))


def emoji(text: str) -> list[str]:
    """Pictographs and dingbats (not letterlike symbols such as №)."""
    return sorted(ch for ch in text if unicodedata.category(ch) == "So" and ord(ch) >= 0x2300)


def catalog(language: str) -> Any:
    path = LOCALE / language / "LC_MESSAGES" / f"{texts.DOMAIN}.po"
    with path.open("rb") as f:
        return read_po(f, locale=language)


def template() -> Any:
    with (LOCALE / f"{texts.DOMAIN}.pot").open("rb") as f:
        return read_po(f)


# -- the catalogs ------------------------------------------------------------------------------


def test_every_text_in_the_code_is_in_the_template() -> None:
    """Extracting the code again gives exactly the template's messages: a text added (or
    changed) in the code without `pybabel extract` fails here."""
    method_map = [("**.py", "python")]
    extracted = {
        msg if isinstance(msg, str) else msg[0]
        for _file, _line, msg, _comments, _context in extract_from_dir(
            str(ROOT / "imagebot"), method_map=method_map
        )
    }
    in_template = {m.id if isinstance(m.id, str) else m.id[0] for m in template() if m.id}
    assert extracted - in_template == set(), "run pybabel extract (README: Languages)"
    assert in_template - extracted == set(), "run pybabel extract (README: Languages)"


@pytest.mark.parametrize("language", TRANSLATED)
def test_catalog_translates_every_message(language: str) -> None:
    """Each catalog has every message of the template, translated (every plural form), none
    left fuzzy, and none it no longer needs."""
    wanted = {(m.id, m.context) for m in template() if m.id}
    cat = catalog(language)
    have = {(m.id, m.context): m for m in cat if m.id}
    assert wanted - have.keys() == set(), f"run pybabel update, then translate ({language})"
    assert {k for k, m in have.items() if k not in wanted and not m.obsolete} == set()
    for msg_id in wanted:
        msg = have[msg_id]
        forms = msg.string if isinstance(msg.string, tuple) else (msg.string,)
        assert all(forms), f"{language}: untranslated {msg_id!r}"
        assert len(forms) == (cat.num_plurals if msg.pluralizable else 1), msg_id
        assert not msg.fuzzy, f"{language}: fuzzy {msg_id!r}"


@pytest.mark.parametrize("language", TRANSLATED)
def test_translations_keep_placeholders_and_emoji(language: str) -> None:
    """A translation fills exactly the English placeholders ({name}, %s, %(x)s) and keeps the
    English emoji, in every plural form; a translation that still formats cleanly proves it."""
    for msg in catalog(language):
        if not msg.id:
            continue
        english = msg.id if isinstance(msg.id, tuple) else (msg.id,)
        forms = msg.string if isinstance(msg.string, tuple) else (msg.string,)
        for form in forms:
            assert placeholders(form) == placeholders(english[-1]), (language, msg.id, form)
            assert emoji(form) == emoji(english[-1]), (language, msg.id, form)
            names = {p.strip("{}") for p in placeholders(form) if p.startswith("{")}
            assert form.format(**dict.fromkeys(names, "x")), (language, msg.id)


@pytest.mark.parametrize("language", TRANSLATED)
def test_compiled_catalogs_match_their_sources(language: str) -> None:
    """The .mo shipped in the package says exactly what its .po says (run `pybabel compile`
    after every edit of a .po)."""
    buffer = io.BytesIO()
    write_mo(buffer, catalog(language))
    buffer.seek(0)
    fresh = gettext.GNUTranslations(buffer)
    shipped_path = LOCALE / language / "LC_MESSAGES" / f"{texts.DOMAIN}.mo"
    with shipped_path.open("rb") as f:
        shipped = gettext.GNUTranslations(f)
    fresh_catalog = {k: v for k, v in fresh._catalog.items() if k != ""}  # type: ignore[attr-defined]
    shipped_catalog = {k: v for k, v in shipped._catalog.items() if k != ""}  # type: ignore[attr-defined]
    assert shipped_catalog == fresh_catalog, "run pybabel compile (README: Languages)"
    assert shipped.plural(5) == fresh.plural(5) and shipped.plural(21) == fresh.plural(21)  # type: ignore[attr-defined]


def test_every_catalog_is_offered_and_every_offer_has_a_catalog() -> None:
    """The /language menu lists exactly English plus the languages with a catalog."""
    on_disk = {p.parent.parent.name for p in LOCALE.glob("*/LC_MESSAGES/*.po")}
    assert on_disk == set(TRANSLATED)
    assert {"ru", "es", "pt_BR"} <= on_disk


@pytest.mark.parametrize(
    ("language_code", "expected"),
    [
        ("ru", "ru"),
        ("ru-RU", "ru"),
        ("pt-br", "pt_BR"),
        ("pt-BR", "pt_BR"),
        ("pt", "pt_BR"),  # no plain pt catalog: the Brazilian one beats English
        ("pt-PT", "pt_BR"),
        ("es-419", "es"),
        ("en-US", "en"),
        ("de", "en"),
        ("zz-Latn", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_language_code_falls_back_to_a_catalog_or_english(
    language_code: str | None, expected: str
) -> None:
    """Telegram's language_code picks the catalog: pt-br -> pt_BR -> pt -> English."""
    assert texts.negotiate(language_code) == expected


def test_texts_made_far_from_any_update_speak_the_given_language() -> None:
    """Status lines, plurals and durations come out in the language in force, and English
    again outside it."""
    assert in_language("ru", texts.status_working, JobKind.GENERATE, 7, 75) == (
        "Рисую… 1 мин 15 сек (задача 7)"
    )
    assert in_language("ru", texts.many_results, 3, 5) == "5 изображений (задача 3)."
    assert in_language("ru", texts.many_results, 3, 2) == "2 изображения (задача 3)."
    assert in_language("es", texts.status_queued, 4, 2) == "Tu lugar en la fila: 2. (tarea 4)"
    assert in_language("pt_BR", texts.job_failed, 9, "timeout").startswith(
        "Desculpe, a tarefa 9 falhou"
    )
    assert texts.status_working(JobKind.GENERATE, 7, 75) == "Generating… 1 min 15 s (job 7)"


# -- in the chat -------------------------------------------------------------------------------


async def test_russian_user_gets_russian_start_help_status_and_result(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A user whose Telegram is in Russian gets /start, /help, the status line of a
    /generate and the result's buttons in Russian; the job row keeps the language."""
    replicate.latency_s = 0.5
    async with bot() as app:
        send(telegram, "/start")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
        send(telegram, "/help")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
        send(telegram, "/generate рыжая лиса")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        # the status line goes once the result is there
        await wait_until(lambda: any(m.deleted for m in telegram.messages(CHAT, True)))
    start, help_text = telegram.texts(CHAT)[:2]
    assert start.startswith("Привет, Alice! Я рисую картинки")
    assert help_text.startswith("Что я умею:") and "/generate <описание>" in help_text
    status = [m for m in telegram.messages(CHAT, include_deleted=True) if m.deleted]
    assert status and (status[0].text or "").startswith("Рисую…")
    assert (status[0].text or "").endswith("(задача 1)")
    photo = telegram.photos(CHAT)[0]
    assert photo.caption == "рыжая лиса"
    shown = buttons(photo)
    assert shown[:3] == ["🔁 Ещё раз", "✏️ Изменить", "📎 Оригинал"]
    assert "🎨 Ремикс" in shown and "Вертикальный" in shown
    assert [r["language"] for r in rows(db_path(app))] == ["ru"]


async def test_language_command_switches_and_survives_a_restart(
    bot, telegram: FakeTelegram
) -> None:
    """`/language en` from a Russian-speaking user answers in English, and after a restart the
    bot still speaks English to them (the choice is stored, not the app's language_code)."""
    async with bot() as app:
        send(telegram, "/language en")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
        assert telegram.texts(CHAT)[0] == "Okay, I'll speak English with you now."
    async with bot():
        send(telegram, "/start")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
    assert telegram.texts(CHAT)[1].startswith("Hi Alice! I draw pictures")
    stored = rows(db_path(app), "SELECT user_id, language FROM user_prefs")
    assert [tuple(r) for r in stored] == [(CHAT, "en")]


async def test_language_buttons_choose_and_forged_ones_change_nothing(
    bot, telegram: FakeTelegram
) -> None:
    """/language shows one button per language (the current one ticked); pressing Español
    turns the message Spanish and later answers too; a made-up language code is refused."""
    async with bot() as app:
        send(telegram, "/language", "pt-br")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
        menu = telegram.messages(CHAT)[0]
        assert menu.text == "Escolha o idioma em que eu falo com você:"
        assert buttons(menu) == ["English", "Español", "✓ Português (Brasil)", "Русский"]
        forged = updates.callback_query(
            "lang:xx", message=updates.bot_message_dict(menu), user_id=CHAT
        )
        telegram.push_update(speaking_as(forged, "pt-br"))
        await wait_until(lambda: len(telegram.answered_callbacks) == 1)
        assert telegram.answered_callbacks[0].get("text") == "Este botão expirou."
        assert rows(db_path(app), "SELECT * FROM user_prefs WHERE language IS NOT NULL") == []
        press = updates.callback_query(
            "lang:es", message=updates.bot_message_dict(menu), user_id=CHAT
        )
        telegram.push_update(speaking_as(press, "pt-br"))
        await wait_until(
            lambda: telegram.messages(CHAT)[0].text == "Listo, idioma cambiado: Español."
        )
        send(telegram, "/usage", "pt-br")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
    assert telegram.texts(CHAT)[1].startswith("Hoy (UTC):")


async def test_pt_br_user_gets_brazilian_portuguese(bot, telegram: FakeTelegram) -> None:
    """A user whose Telegram says "pt-br" is greeted in Brazilian Portuguese."""
    async with bot():
        send(telegram, "/start", "pt-br")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
    assert telegram.texts(CHAT)[0].startswith("Oi, Alice! Eu desenho imagens")


async def test_unknown_language_falls_back_to_english(bot, telegram: FakeTelegram) -> None:
    """A user whose Telegram is in a language without a catalog (German), or says none, reads
    English; asking /language for it lists the languages there are."""
    async with bot():
        send(telegram, "/start", "de")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
        send(telegram, "/help", None)
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
        send(telegram, "/language de", "de")
        await wait_until(lambda: len(telegram.texts(CHAT)) == 3)
    start, help_text, refused = telegram.texts(CHAT)
    assert start.startswith("Hi Alice!")
    assert help_text.startswith("What I can do:")
    assert refused == (
        "I don't speak de yet. I can speak: English (en), Español (es), "
        "Português (Brasil) (pt-br), Русский (ru)."
    )


async def test_a_job_ending_after_a_restart_speaks_its_requesters_language(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A Russian user's job still at the vendor when the bot stops fails after the restart,
    with no update of theirs in sight: the failure notice is Russian all the same."""
    replicate.next_behaviours.append({"outcome": "failed", "latency_s": 2.0})
    async with bot():
        send(telegram, "/generate закат")
        await wait_until(lambda: len(replicate.creates) == 1)
        await wait_until(lambda: any(t.startswith("Рисую…") for t in telegram.texts(CHAT)))
    async with bot():
        await wait_until(lambda: any("не выполнена" in t for t in telegram.texts(CHAT)))
    failed = next(t for t in telegram.texts(CHAT) if "не выполнена" in t)
    assert failed.startswith("Увы, задача 1 не выполнена:")
    assert failed.endswith("В дневной лимит она не засчитана.")  # noqa: RUF001 - Russian


async def test_command_menus_are_set_per_language(bot, telegram: FakeTelegram) -> None:
    """At start the "/" menu is set once for every language (English) and once per translated
    language with its two-letter language_code; Brazilian Portuguese serves "pt"."""
    async with bot():
        pass

    def described(language: str) -> dict[str, str]:
        menu = telegram.command_menus.get(("default", language), [])
        return {c["command"]: c["description"] for c in menu}

    assert described("")["generate"] == "Draw an image from a description"
    assert described("ru")["generate"] == "Нарисовать картинку по описанию"
    assert described("es")["language"] == "Elegir el idioma"
    assert described("pt")["help"] == "O que eu sei fazer"
    assert set(described("ru")) == set(described(""))
    assert {lang for scope, lang in telegram.command_menus if scope == "default"} == {
        "",
        "es",
        "pt",
        "ru",
    }

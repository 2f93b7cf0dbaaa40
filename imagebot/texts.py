"""Every string a user can see, in the user's language. Short, friendly, no vendor parameter
names, no tracebacks.

English is the source language: each text is written here in English and translated through
the gettext catalogs in imagebot/locale/<lang>/LC_MESSAGES/imagebot.po (compiled .mo files
ship in the wheel; see README "Languages" for the pybabel commands).

Which language a text comes out in is the context's: `current_language()`, a ContextVar set
for each update from the user's stored choice or Telegram `language_code` (bot/language.py)
and for each job run from the job's row (`speaking(job.language)`), so texts made far from
any update (status lines, captions, failure notices) still speak the requester's language.

Constants are written `NAME = N_("English")`: reading `texts.NAME` translates them into the
current language at that moment (this module's class does it), so a constant read while
handling a Russian user's update is Russian. Inside this module, use `_(NAME)`.

This module is a leaf: it imports only the standard library and imagebot.models.
"""

from __future__ import annotations

import gettext
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from imagebot.models import JobKind

DOMAIN = "imagebot"
DEFAULT_LANGUAGE = "en"
# The languages a user can pick (catalog name -> the language's own name). A new language:
# its catalog under imagebot/locale/ and a line here (README "Languages").
LANGUAGES: dict[str, str] = {
    "en": "English",
    "es": "Español",
    "pt_BR": "Português (Brasil)",
    "ru": "Русский",
}


def locale_dir() -> Path:
    """Where the catalogs live (inside the package, so they ship in the wheel)."""
    return Path(str(resources.files("imagebot") / "locale"))


_language: ContextVar[str] = ContextVar("imagebot_language", default=DEFAULT_LANGUAGE)
_catalogs: dict[str, gettext.NullTranslations] = {}


def _catalog(language: str) -> gettext.NullTranslations:
    catalog = _catalogs.get(language)
    if catalog is None:
        if language == DEFAULT_LANGUAGE:
            catalog = gettext.NullTranslations()  # the source texts are English
        else:
            catalog = gettext.translation(
                DOMAIN, locale_dir(), languages=[language], fallback=True
            )
        _catalogs[language] = catalog
    return catalog


def negotiate(code: str | None) -> str:
    """The catalog for a Telegram `language_code` (an IETF tag such as "ru", "pt-br", "en-US"):
    the exact tag (pt-br -> pt_BR), else the bare language (pt), else another region of it (pt
    -> pt_BR), else English."""
    if not code:
        return DEFAULT_LANGUAGE
    language, _sep, region = code.strip().replace("-", "_").partition("_")
    language = language.lower()
    candidates = [f"{language}_{region.upper()}"] if region else []
    candidates.append(language)
    for candidate in candidates:
        if candidate in LANGUAGES:
            return candidate
    for known in LANGUAGES:
        if known.partition("_")[0] == language:
            return known
    return DEFAULT_LANGUAGE


def current_language() -> str:
    """The language texts are made in right now (in this task)."""
    return _language.get()


def use_language(language: str | None) -> None:
    """Speak `language` for the rest of this task (an update's handlers run in one task)."""
    _language.set(language if language in LANGUAGES else DEFAULT_LANGUAGE)


@contextmanager
def speaking(language: str | None) -> Iterator[None]:
    """Speak `language` inside the block (a job's texts: its requester's language)."""
    token = _language.set(language if language in LANGUAGES else DEFAULT_LANGUAGE)
    try:
        yield
    finally:
        _language.reset(token)


def _(message: str) -> str:
    """`message` (English) in the current language."""
    return str(_catalog(_language.get()).gettext(message))


def ngettext(singular: str, plural: str, n: int) -> str:
    """The form of a message for the number `n`, in the current language."""
    return str(_catalog(_language.get()).ngettext(singular, plural, n))


def pgettext(context: str, message: str) -> str:
    """`message` in the current language, where the same English means different things."""
    return str(_catalog(_language.get()).pgettext(context, message))


def tr(message: str) -> str:
    """A message kept untranslated (e.g. a constant in a table built at import) translated now."""
    return _(message)


class _Message(str):
    """A constant's English text; translated each time it is read as `texts.NAME`."""

    __slots__ = ()


def N_(message: str) -> str:
    """Mark a constant for the catalogs; it is translated when read through the module."""
    return _Message(message)


class _TextsModule(ModuleType):
    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if type(value) is _Message:
            return _(value)
        return value


sys.modules[__name__].__class__ = _TextsModule


CAPTION_LIMIT = 1024  # Telegram's caption limit (counted here in UTF-16 code units, the stricter)
TEXT_LIMIT = 4096

BUTTON_AGAIN = N_("🔁 Again")
BUTTON_EDIT = N_("✏️ Edit this")
BUTTON_ORIGINAL = N_("📎 Original")
BUTTON_CANCEL = N_("✖ Cancel")


_LABEL = {
    JobKind.GENERATE: N_("Generate"),
    JobKind.EDIT: N_("Edit"),
    JobKind.UPSCALE: N_("Upscale"),
}


def kind_label(kind: JobKind) -> str:
    """The short name of an operation, as in /usage and /balance ("Generate", "Edit")."""
    return _(_LABEL[kind])


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        # TRANSLATORS: a short duration, as in "Try again in 45 s".
        return _("{seconds} s").format(seconds=seconds)
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        if seconds:
            return _("{minutes} min {seconds} s").format(minutes=minutes, seconds=seconds)
        return _("{minutes} min").format(minutes=minutes)
    hours, minutes = divmod(minutes, 60)
    if minutes:
        return _("{hours} h {minutes} min").format(hours=hours, minutes=minutes)
    return _("{hours} h").format(hours=hours)


def utf16_trim(text: str, limit: int) -> str:
    """Trim to `limit` UTF-16 code units (how Telegram counts), adding … when cut."""
    if len(text.encode("utf-16-le")) // 2 <= limit:
        return text
    out: list[str] = []
    used = 0
    for ch in text:
        width = 2 if ord(ch) > 0xFFFF else 1
        if used + width > limit - 1:
            break
        out.append(ch)
        used += width
    return "".join(out).rstrip() + "…"


def start(first_name: str | None, user_id: int, allowed: bool, bootstrap: bool = False) -> str:
    hello = _("Hi {name}!").format(name=first_name) if first_name else _("Hi!")
    if not allowed:
        return _(
            "{hello} This bot is private. Your Telegram user id is {user_id}: "
            "send it to the bot's owner to ask for access."
        ).format(hello=hello, user_id=user_id) + _operator_way_in(user_id, bootstrap)
    return _(
        "{hello} I draw pictures from your words and edit your photos.\n\n"
        "• /generate a red fox in the snow\n"
        "• send a photo with the caption /edit make it night\n\n"
        "/help lists everything I can do."
    ).format(hello=hello)


def help_text(max_chars: int) -> str:
    parts = [
        _("What I can do:"),
        "",
        _(
            "/generate <description> - draw a new image\n"
            "   e.g. /generate a lighthouse at dawn, watercolor"
        ),
        _(
            "/edit <instruction> - change a photo. Send the photo with that caption, reply to a "
            "photo with it, or send /edit alone and I'll ask for the photo\n"
            "   e.g. /edit make the sky purple"
        ),
        _("/cancel - stop your running request (or an edit in progress)\n   e.g. /cancel"),
        _("/usage - what you've used today and what's left\n   e.g. /usage"),
        _("/settings - choose the style, shape and number of images"),
        _("/style - choose the style"),
        _("/history - your last requests here, to get a result again"),
        _("/language - choose the language I speak\n   e.g. /language es"),
        _("/help - this message"),
        "",
        _(
            "Descriptions can be up to {max_chars} characters. Under each result: "
            "{again} makes another, {edit} edits it, {original} sends the full-size file."
        ).format(
            max_chars=max_chars,
            again=_(BUTTON_AGAIN),
            edit=_(BUTTON_EDIT),
            original=_(BUTTON_ORIGINAL),
        ),
    ]
    return "\n".join(parts)


_STARTED = {
    JobKind.GENERATE: N_("Generating… (job {job_id})"),
    JobKind.EDIT: N_("Editing… (job {job_id})"),
    JobKind.UPSCALE: N_("Upscaling… (job {job_id})"),
}
_WORKING = {
    JobKind.GENERATE: N_("Generating… {elapsed} (job {job_id})"),
    JobKind.EDIT: N_("Editing… {elapsed} (job {job_id})"),
    JobKind.UPSCALE: N_("Upscaling… {elapsed} (job {job_id})"),
}


def status_started(kind: JobKind, job_id: int) -> str:
    return _(_STARTED[kind]).format(job_id=job_id)


def status_working(kind: JobKind, job_id: int, elapsed_s: float) -> str:
    return _(_WORKING[kind]).format(elapsed=duration(elapsed_s), job_id=job_id)


def status_queued(job_id: int, position: int) -> str:
    """`position` is the place among waiting jobs: 1 means the next free slot is yours."""
    if position <= 1:
        return _("You're next in line. (job {job_id})").format(job_id=job_id)
    return _("You're #{position} in line. (job {job_id})").format(position=position, job_id=job_id)


def status_canceled(job_id: int) -> str:
    return _("Canceled (job {job_id}). It didn't count against your daily limit.").format(
        job_id=job_id
    )


_FAILURES = {
    "safety": N_("the model refused this request (safety filter). Try different words."),
    "timeout": N_("it took too long, so I stopped it."),
    "results_expired": N_("the result expired before I could fetch it."),
    "submit_unknown": N_("I lost track of it while restarting."),
    "not_an_image": N_("that file isn't a JPEG, PNG or WebP image."),
    "broken_image": N_("that image file is damaged or incomplete. Please send it again."),
    "too_large": N_("that image is too large."),
    "too_many_pixels": N_("that image has too many pixels."),
    "input_unavailable": N_("Telegram no longer has that photo."),
    "invalid_input": N_("the image service didn't accept this request."),
    "blocked_address": N_("the image service returned a file I'm not allowed to fetch."),
    "delivery_failed": N_("I couldn't send the result to this chat."),
    "provider_unavailable": N_(
        "the image service is having trouble right now. Please try again in a few minutes."
    ),
    "rate_limited": N_("the image service is too busy right now. Please try again in a minute."),
    "circuit_open": N_(
        "the image service is having trouble right now. Please try again in a few minutes."
    ),
    "delivery_gave_up": N_(
        "Telegram couldn't take the result for a long time, so I stopped trying."
    ),
}


def failure_reason(code: str | None) -> str:
    """Why a job failed, in words a user may see, by error code (see errors.ExternalError)."""
    return _(_FAILURES.get(code or "", N_("something went wrong on our side.")))


def job_failed(job_id: int, code: str | None) -> str:
    return _(
        "Sorry, job {job_id} failed: {reason}\nIt didn't count against your daily limit."
    ).format(job_id=job_id, reason=failure_reason(code))


def input_problem(code: str | None, limit: float | None, used: float | None, kind: JobKind) -> str:
    if code == "too_long":
        return _("That's {used} characters; the limit is {limit}. Please make it shorter.").format(
            used=int(used or 0), limit=int(limit or 0)
        )
    if code == "control_chars":
        return _("That text has invisible control characters. Please retype it.")
    if kind is JobKind.GENERATE:
        return _("Tell me what to draw, for example:\n/generate a red fox in the snow")
    return _("Tell me what to change, for example:\n/edit make the sky purple")


def not_allowed(user_id: int, bootstrap: bool = False) -> str:
    return _(
        "Sorry, this bot is private. Your Telegram user id is {user_id}: "
        "send it to the bot's owner to ask for access."
    ).format(user_id=user_id) + _operator_way_in(user_id, bootstrap)


def rate_limited(limit: float, retry_after_s: float) -> str:
    return _("Easy there: at most {limit} requests a minute. Try again in {wait}.").format(
        limit=int(limit), wait=duration(retry_after_s)
    )


_SWITCHED_OFF = {
    JobKind.GENERATE: N_("Generate is switched off on this bot."),
    JobKind.EDIT: N_("Edit is switched off on this bot."),
    JobKind.UPSCALE: N_("Upscale is switched off on this bot."),
}
_CAP_REACHED = {
    JobKind.GENERATE: N_(
        "You've used all {limit} image generations for today. "
        "The count resets at 00:00 UTC (in {wait})."
    ),
    JobKind.EDIT: N_(
        "You've used all {limit} photo edits for today. The count resets at 00:00 UTC (in {wait})."
    ),
    JobKind.UPSCALE: N_(
        "You've used all {limit} upscales for today. The count resets at 00:00 UTC (in {wait})."
    ),
}


def cap_reached(kind: JobKind, limit: float, retry_after_s: float, disabled: bool) -> str:
    if disabled:
        return _(_SWITCHED_OFF[kind])
    return _(_CAP_REACHED[kind]).format(limit=int(limit), wait=duration(retry_after_s))


def spend_cap_reached(retry_after_s: float) -> str:
    return _(
        "The bot has reached today's budget, so it isn't taking new requests. "
        "Please try again after 00:00 UTC (in {wait})."
    ).format(wait=duration(retry_after_s))


def usage(
    used: dict[JobKind, int],
    caps: dict[JobKind, int],
    is_admin: bool,
    counts_images: bool = False,
) -> str:
    """`counts_images`: users may ask for several images per request, so the limits count
    images (and the text says so)."""
    lines = [_("Today (UTC):")]
    for kind in caps:  # the operations this bot offers
        if is_admin and counts_images:
            line = _("• {label}: {used} images used (no limit for admins)")
        elif is_admin:
            line = _("• {label}: {used} used (no limit for admins)")
        elif counts_images:
            line = _("• {label}: {used} of {cap} images used, {left} left")
        else:
            line = _("• {label}: {used} of {cap} used, {left} left")
        lines.append(
            line.format(
                label=kind_label(kind),
                used=used[kind],
                cap=caps[kind],
                left=max(0, caps[kind] - used[kind]),
            )
        )
    if counts_images:
        lines.append(
            _(
                "Each image counts: a request for 3 images uses 3. "
                "Images the safety filter held back don't count."
            )
        )
    lines.append(_("Failed or canceled requests don't count."))
    return "\n".join(lines)


def caption(prompt: str) -> str:
    return utf16_trim(prompt, CAPTION_LIMIT)


def many_results(job_id: int, count: int) -> str:
    return ngettext(
        "{count} image (job {job_id}).", "{count} images (job {job_id}).", count
    ).format(count=count, job_id=job_id)


NOTHING_TO_CANCEL = N_("You have nothing running to cancel.")
CANCELED_SHORT = N_("Canceled.")
TOO_LATE_TO_CANCEL = N_("Too late to cancel: the result is on its way.")
NOT_YOUR_JOB = N_("That isn't your request.")
BUTTON_EXPIRED = N_("This button has expired.")
BUTTON_OTHER_CHAT = N_("This button works only in the chat where the request was made.")
ORIGINAL_GONE = N_("The original file isn't kept any more.")
ORIGINAL_SENDING = N_("Sending the original…")
GENERIC_ERROR = N_("Sorry, something went wrong. Please try again in a moment.")
PRIVATE_TEXT_HINT = N_("I didn't get that. Here's what I can do:")

EDIT_ASK_PHOTO = N_("Send me the photo you want to edit (or /cancel).")
EDIT_ASK_INSTRUCTION = N_("What should I change? For example: make the sky purple (or /cancel).")
EDIT_WRONG_KIND = N_(
    "I need a photo: send it as a photo or as a JPEG, PNG or WebP file. /cancel to stop."
)
EDIT_NEED_TEXT = N_("Tell me in words what to change, e.g. make the sky purple. /cancel to stop.")
EDIT_CANCELED = N_("Okay, edit canceled.")
EDIT_TIMED_OUT = N_("Edit canceled: I waited too long. Send /edit to start again.")
EDIT_UNSUPPORTED_MEDIA = N_(
    "I can only edit still photos (JPEG, PNG or WebP), not stickers, GIFs or videos."
)
EDIT_FILE_TOO_BIG = N_("That file is over 20 MB, the most Telegram lets bots download.")
PHOTO_HINT = N_(
    "Nice photo! To edit it, reply to it with /edit and what to change, "
    "e.g. /edit make it look like a painting."
)
EDIT_NOT_IMAGE_FILE = N_("That file isn't an image I can edit. Send a JPEG, PNG or WebP.")


def unknown_command(command: str) -> str:
    return _("I don't know {command}. Try /help.").format(command=utf16_trim(command, 64))


# -- languages (/language) -------------------------------------------------------------------

LANGUAGE_CHOOSE = N_("Choose the language I speak with you:")


def language_set(language: str) -> str:
    """Said in the newly chosen language."""
    return _("Okay, I'll speak {language} with you now.").format(
        language=LANGUAGES.get(language, language)
    )


def language_unknown(wanted: str) -> str:
    return _("I don't speak {wanted} yet. I can speak: {languages}.").format(
        wanted=utf16_trim(wanted, 32),
        languages=", ".join(
            f"{name} ({code.replace('_', '-').lower()})" for code, name in LANGUAGES.items()
        ),
    )


# -- credits and payments (Telegram Stars) -------------------------------------------------

STAR = "⭐"
BUY_CHOOSE = N_("Choose a pack of credits (paid with Telegram Stars):")
BUY_UNKNOWN_PACK = N_("I don't know that pack. Send /buy to see the packs.")
BUY_FAILED = N_("Sorry, I couldn't create the invoice. Please try again in a moment.")
PAY_UNKNOWN_ORDER = N_("This invoice isn't valid any more. Send /buy for a new one.")
PAY_NOT_YOURS = N_("This invoice was made for someone else. Send /buy to get your own.")
PAY_ALREADY_PAID = N_("This invoice is already paid. Send /buy to buy more credits.")
PAY_PRICE_CHANGED = N_("The amount doesn't match this invoice. Send /buy for a new one.")
REFUND_USAGE = N_("Usage: /refund <charge id> (the charge id is in the receipt and in /balance).")
GRANT_USAGE = N_(
    "Usage: /grant <user id> <credits> [note], e.g. /grant 12345 10 sorry for the wait"
)


def _credits(n: int) -> str:
    return ngettext("{n} credit", "{n} credits", n).format(n=n)


def pack_button(title: str, stars: int) -> str:
    return f"{title} - {stars} {STAR}"


def invoice_description(credits: int) -> str:
    return _(
        "{credits} for images in this bot, used once your free daily allowance is spent."
    ).format(credits=_credits(credits))


def receipt(credits: int, stars: int, balance: int) -> str:
    if credits <= 0:
        return _(
            "Payment of {stars} ⭐ received, but I couldn't match it to an order. "
            "The bot's owner will sort it out; /paysupport if you have questions."
        ).format(stars=stars)
    return _("Thank you! {stars} ⭐ received: +{credits}.\nYour balance: {balance}.").format(
        stars=stars, credits=_credits(credits), balance=_credits(balance)
    )


_NOT_FREE = {
    JobKind.GENERATE: N_(
        "Generate isn't free on this bot. This one costs {needed} and you have "
        "{balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
    JobKind.EDIT: N_(
        "Edit isn't free on this bot. This one costs {needed} and you have "
        "{balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
    JobKind.UPSCALE: N_(
        "Upscale isn't free on this bot. This one costs {needed} and you have "
        "{balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
}
_FREE_USED = {
    JobKind.GENERATE: N_(
        "You've used today's free image generations. This one costs {needed} and you "
        "have {balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
    JobKind.EDIT: N_(
        "You've used today's free photo edits. This one costs {needed} and you "
        "have {balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
    JobKind.UPSCALE: N_(
        "You've used today's free upscales. This one costs {needed} and you "
        "have {balance}.\nBuy credits below (paid with Telegram Stars):"
    ),
}


def not_enough_credits(kind: JobKind, needed: int, balance: int, free_disabled: bool) -> str:
    text = _((_NOT_FREE if free_disabled else _FREE_USED)[kind])
    return text.format(needed=_credits(needed), balance=_credits(balance))


def balance_text(
    balance: int,
    costs: dict[str, int],
    purchases: list[tuple[str, int, int, str]],
    is_admin: bool,
) -> str:
    """`costs`: operation label -> credits; `purchases`: (date, credits, stars, charge id),
    newest first."""
    lines = [_("Your balance: {balance}.").format(balance=_credits(balance))]
    if is_admin:
        lines.append(_("As an admin you don't spend credits."))
    lines.append(_("Once your free daily allowance is used, each image costs:"))
    for name, cost in costs.items():
        lines.append(f"• {name}: {_credits(cost)}")
    if purchases:
        lines.append(_("Your last purchases:"))
        for day, credits, stars, charge_id in purchases:
            lines.append(
                _("• {day}: +{credits} for {stars} ⭐ (charge {charge_id})").format(
                    day=day, credits=_credits(credits), stars=stars, charge_id=charge_id
                )
            )
    lines.append(_("/buy to get more credits."))
    return "\n".join(lines)


def paysupport(support_text: str, charges: list[tuple[str, int, str]]) -> str:
    """`charges`: (date, stars, charge id) of the user's last payments."""
    text = support_text.strip()
    if charges:
        listed = "\n".join(
            _("• {day}: {stars} ⭐, charge {charge_id}").format(
                day=day, stars=stars, charge_id=cid
            )
            for day, stars, cid in charges
        )
        text += "\n\n" + _(
            "Your last payments (quote the charge id when you write):\n{payments}"
        ).format(payments=listed)
    return text


def refund_unknown(charge_id: str) -> str:
    return _("No purchase with charge id {charge_id} is recorded.").format(
        charge_id=utf16_trim(charge_id, 200)
    )


def refund_already(charge_id: str) -> str:
    return _("Charge {charge_id} is already refunded.").format(charge_id=charge_id)


def refund_refused_balance(user_id: int, balance: int, credits: int) -> str:
    return _(
        "Not refunded: user {user_id} has {balance} left and this purchase gave "
        "{credits}. A refund takes the credits back and a balance can't go below "
        "zero. /grant them first if you want to refund anyway."
    ).format(user_id=user_id, balance=_credits(balance), credits=_credits(credits))


def refund_failed(charge_id: str, error: str) -> str:
    return _("Telegram didn't refund charge {charge_id}: {error}. Nothing changed.").format(
        charge_id=charge_id, error=utf16_trim(error, 300)
    )


def refund_done(charge_id: str, user_id: int, stars: int, balance: int) -> str:
    return _(
        "Refunded charge {charge_id}: {stars} ⭐ back to user {user_id}; "
        "their balance is now {balance}."
    ).format(charge_id=charge_id, stars=stars, user_id=user_id, balance=_credits(balance))


def refund_notice(stars: int, balance: int) -> str:
    return _("{stars} ⭐ were refunded to you. Your balance: {balance}.").format(
        stars=stars, balance=_credits(balance)
    )


def grant_done(user_id: int, credits: int, balance: int) -> str:
    return _("Gave user {user_id} {credits}; their balance is now {balance}.").format(
        user_id=user_id, credits=_credits(credits), balance=_credits(balance)
    )


def granted_notice(credits: int, balance: int) -> str:
    return _("You got {credits} from the bot's owner. Your balance: {balance}.").format(
        credits=_credits(credits), balance=_credits(balance)
    )


# -- albums, upscale, delete, history (issue 17) ---------------------------------------------

BUTTON_UPSCALE = N_("⤴ Upscale")
BUTTON_DELETE = N_("🗑 Delete")
DELETED = N_("Deleted.")
ALREADY_DELETED = N_("That result was already deleted.")
UPSCALE_GONE = N_("That image isn't available to upscale any more.")
HISTORY_EMPTY = N_("You have no finished requests here yet. Try /generate a red fox in the snow")
HISTORY_GONE = N_("I can't send that result again: Telegram no longer has it.")
HISTORY_NOTHING = N_("That request has no result to send again.")
HISTORY_SENDING = N_("Sending it again…")
ALBUM_HINT = N_(
    "Nice photos! To edit them together, send them again as one album with the caption "
    "/edit and what to change, e.g. /edit put us on a beach"
)
ALBUM_NOTHING_TO_EDIT = N_("None of the files in that album is a photo I can edit.")

_HISTORY_KIND = {JobKind.GENERATE: "🖼", JobKind.EDIT: "✏️", JobKind.UPSCALE: "⤴"}


def album_first_used(sent: int, used: int) -> str:
    """An album with more photos than one edit takes."""
    return _(
        "You sent {sent} photos; I'm editing the first {used} together "
        "(that's the most one edit can use)."
    ).format(sent=sent, used=used)


def upscale_caption(prompt: str) -> str:
    return utf16_trim(_("⤴ Upscaled: {prompt}").format(prompt=prompt), CAPTION_LIMIT)


def history_line(when: str, kind: JobKind, prompt: str, status: str, deleted: bool) -> str:
    """One finished job in /history: when (UTC), what, the prompt, how it ended."""
    short = utf16_trim(prompt, 60)
    state = _history_state(status)
    if deleted:
        state = _("{state}, deleted").format(state=state)
    return _("{when} UTC {icon} {label}: “{prompt}” ({state})").format(
        when=when,
        icon=_HISTORY_KIND.get(kind, ""),
        label=kind_label(kind),
        prompt=short,
        state=state,
    )


def _history_state(status: str) -> str:
    if status == "succeeded":
        return pgettext("history", "done")
    if status == "failed":
        return pgettext("history", "failed")
    if status == "canceled":
        return pgettext("history", "canceled")
    return status


def history_text(lines: list[str]) -> str:
    head = _("Your last requests here (newest first). Tap one to get its result again:")
    return "\n".join([head, *(f"• {line}" for line in lines)])


def history_button(job_id: int, prompt: str) -> str:
    return utf16_trim(f"↩ {job_id}: {prompt}", 40)


# -- the operator's control room: admin commands, invites, pause, menus (issue 19) ---------


def _operator_way_in(user_id: int, bootstrap: bool) -> str:
    """With no admin configured yet, the documented first step for whoever runs the bot
    (it names only the reader's own id)."""
    if not bootstrap:
        return ""
    return "\n\n" + _(
        "Running this bot yourself? No admin is set up yet: on the server, run\n"
        "imagebot users allow {user_id}\n"
        "(or add your id to access.admins in config.toml to get the admin commands)."
    ).format(user_id=user_id)


def user_commands(credits: bool) -> list[tuple[str, str]]:
    """The "/" menu everyone sees: (command, description), in the current language."""
    commands = [
        ("generate", _("Draw an image from a description")),
        ("edit", _("Change a photo")),
        ("cancel", _("Stop your running request")),
        ("usage", _("What you've used today")),
        ("settings", _("Style, shape and number of images")),
        ("style", _("Choose a style")),
        ("history", _("Your last requests, to get a result again")),
        ("language", _("Choose the language")),
        ("help", _("What I can do")),
    ]
    if credits:
        commands += [
            ("buy", _("Buy credits with Telegram Stars")),
            ("balance", _("Your credits")),
        ]
    return commands


def admin_commands(credits: bool) -> list[tuple[str, str]]:
    """The admins' extra entries in their own "/" menu, in the current language."""
    commands = [
        ("allow", _("Let a user in (id, or reply to them)")),
        ("deny", _("Take a user's access away")),
        ("users", _("Who may use the bot")),
        ("invite", _("Make an invite link: [uses] [hours]")),
        ("invites", _("Open invites; revoke one")),
        ("stats", _("Today's numbers")),
        ("pause", _("Stop taking new requests: [message]")),
        ("resume", _("Take requests again")),
    ]
    if credits:
        commands += [
            ("grant", _("Give a user credits")),
            ("refund", _("Refund a Stars payment")),
        ]
    return commands


def menu_language_codes() -> list[str]:
    """The language_code of each translated "/" menu: Telegram takes two-letter ISO 639-1
    codes there, so pt_BR's menu is the one for every Portuguese app ("pt")."""
    return sorted({code.partition("_")[0] for code in LANGUAGES if code != DEFAULT_LANGUAGE})


PAUSED_DEFAULT = N_(
    "The bot is taking a short break and isn't taking new requests right now. "
    "Please try again a bit later."
)
ACCESS_GRANTED = N_("Good news: you can use this bot now. Send /help to see what I can do.")
ALLOW_USAGE = N_(
    "Usage: /allow <user id>, or reply /allow to a message of the person to let in. "
    "They can find their id by sending me /start."
)
DENY_USAGE = N_("Usage: /deny <user id>, or reply /deny to a message of theirs.")
INVITE_USAGE = N_(
    "Usage: /invite [uses] [hours], e.g. /invite 5 24 (default: 1 use, valid 72 hours)."
)
INVITES_USAGE = N_(
    "Usage: /invites to list open invites, /invites revoke <number> to withdraw one."
)
NO_INVITES = N_("No open invites. /invite makes one.")
RESUME_NOT_PAUSED = N_("The bot isn't paused.")
RESUMED = N_("Resumed: the bot takes new requests again.")


def _who(user_id: int, name: str | None) -> str:
    return f"{user_id} ({name})" if name else str(user_id)


def allowed_done(user_id: int, name: str | None) -> str:
    return _("Done: {who} can use the bot now. /deny {user_id} takes it back.").format(
        who=_who(user_id, name), user_id=user_id
    )


def allow_already(user_id: int, in_config: bool) -> str:
    if in_config:
        return _("{user_id} can use the bot already (listed in config.toml).").format(
            user_id=user_id
        )
    return _("{user_id} can use the bot already.").format(user_id=user_id)


def denied_done(user_id: int) -> str:
    return _("Done: {user_id} can no longer use the bot.").format(user_id=user_id)


def deny_config(user_id: int, role: str) -> str:
    key = "access.admins" if role == "admin" else "access.users"
    return _(
        "{user_id} is listed in config.toml ({key}), which I can't change from here. "
        "Remove them there and restart the bot."
    ).format(user_id=user_id, key=key)


def deny_not_listed(user_id: int) -> str:
    return _("{user_id} isn't on the list, so there's nothing to take away.").format(
        user_id=user_id
    )


def users_text(
    admins: list[int],
    config_users: list[int],
    added: list[tuple[int, str | None, str, str]],
    chats: list[int],
    used: dict[int, int],
    is_open: bool,
) -> str:
    """`added`: (user id, name, how they got in, date), oldest first; `used`: jobs today."""

    def today(user_id: int) -> str:
        n = used.get(user_id, 0)
        return ngettext("{n} request today", "{n} requests today", n).format(n=n)

    def entry(user_id: int) -> str:
        return _("• {who}: {today}").format(who=user_id, today=today(user_id))

    none = _("• none")
    lines = []
    if is_open:
        lines.append(_("Anyone may use the bot (access.open = true in config.toml)."))
    lines.append(_("Admins (config.toml):"))
    lines += [entry(uid) for uid in admins] or [none]
    lines.append(_("Users (config.toml, read-only here):"))
    lines += [entry(uid) for uid in config_users] or [none]
    lines.append(_("Let in here (/deny takes them off):"))
    lines += [
        _("• {who}: {how}, {day}; {today}").format(
            who=_who(uid, name), how=how, day=day, today=today(uid)
        )
        for uid, name, how, day in added
    ] or [none]
    if chats:
        lines.append(
            _("Group chats (config.toml): {chats}").format(chats=", ".join(str(c) for c in chats))
        )
    return utf16_trim("\n".join(lines), TEXT_LIMIT)


def added_how(source: str, added_by: int | None, invite_id: int | None) -> str:
    if source == "invite":
        return _("invite #{number}").format(number=invite_id) if invite_id else _("invite")
    if source == "shell":
        return _("from the shell")
    return _("by {admin_id}").format(admin_id=added_by)


def invite_created(link: str | None, code: str, uses: int, expires: str) -> str:
    if uses == 1:
        head = _("Invite link (works once, until {expires} UTC):")
    else:
        head = ngettext(
            "Invite link (works {uses} time, until {expires} UTC):",
            "Invite link (works {uses} times, until {expires} UTC):",
            uses,
        )
    how = link if link else _("Ask them to send me: /start {code}").format(code=code)
    return (
        head.format(uses=uses, expires=expires)
        + f"\n{how}\n\n"
        + _("Anyone who opens it can use the bot. /invites lists open invites.")
    )


def invites_text(invites: list[tuple[int, int, int, str, int | None]]) -> str:
    """`invites`: (number, uses left, uses, expiry, made by), newest first."""
    lines = [_("Open invites:")]
    for number, left, uses, expires, by in invites:
        if by:
            line = _("• #{number}: {left} of {uses} uses left, until {expires} UTC, made by {by}")
        else:
            line = _(
                "• #{number}: {left} of {uses} uses left, until {expires} UTC, made from the shell"
            )
        lines.append(line.format(number=number, left=left, uses=uses, expires=expires, by=by))
    lines.append(_("/invites revoke <number> withdraws one."))
    return utf16_trim("\n".join(lines), TEXT_LIMIT)


def invite_revoked(number: int) -> str:
    return _("Invite #{number} is withdrawn: its link no longer works.").format(number=number)


def invite_revoke_unknown(number: int) -> str:
    return _("There's no invite #{number}.").format(number=number)


def invite_revoke_already(number: int) -> str:
    return _("Invite #{number} was withdrawn already.").format(number=number)


def invite_welcome(first_name: str | None) -> str:
    hello = _("Welcome, {name}!").format(name=first_name) if first_name else _("Welcome!")
    return _(
        "{hello} The invite worked: you can use this bot now.\n\n"
        "• /generate a red fox in the snow\n"
        "• send a photo with the caption /edit make it night\n\n"
        "/help lists everything I can do."
    ).format(hello=hello)


_INVITE_REFUSED = {
    "used_up": N_("This invite link has been used up."),
    "expired": N_("This invite link has expired."),
    "revoked": N_("This invite link was withdrawn."),
    "unknown": N_("I don't recognize this invite link."),
}


def invite_refused(why: str, user_id: int) -> str:
    return _(
        "Sorry! {reason} Ask whoever sent it for a new one. Your Telegram user id is {user_id}."
    ).format(reason=_(_INVITE_REFUSED.get(why, _INVITE_REFUSED["unknown"])), user_id=user_id)


def paused_notice(message: str | None, is_admin: bool) -> str:
    text = message or _(PAUSED_DEFAULT)  # the operator's own words are sent as written
    if is_admin:
        text += "\n\n" + _("(The bot is paused: /resume takes requests again.)")
    return text


def paused_done(message: str | None) -> str:
    return _(
        "Paused: new requests are refused, running and queued ones finish. "
        "Users are told:\n{told}\n\n/resume to take requests again."
    ).format(told=message or _(PAUSED_DEFAULT))


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return _("{seconds} s").format(seconds=f"{value:.1f}") if value < 10 else duration(value)


_STATUSES = {
    "queued": N_("queued"),
    "running": N_("running"),
    "succeeded": N_("succeeded"),
    "failed": N_("failed"),
    "canceled": N_("canceled"),
}


def stats_text(
    total: int,
    per_kind: dict[str, dict[str, int]],
    images: int,
    spend_usd: float,
    p50_s: float | None,
    p95_s: float | None,
    errors: list[tuple[str, int]],
    queued: int,
    running: int,
    paused: bool,
) -> str:
    """`per_kind`: kind -> status -> jobs created today."""
    lines = [
        ngettext("Today (UTC): {total} request", "Today (UTC): {total} requests", total).format(
            total=total
        )
    ]
    for kind in JobKind:
        counts = per_kind.get(kind.value, {})
        if counts:
            parts = ", ".join(
                # TRANSLATORS: a count of jobs in one status, e.g. "3 succeeded".
                _("{n} {status}").format(n=n, status=_(_STATUSES.get(status, status)))
                for status, n in sorted(counts.items())
            )
            lines.append(f"• {kind_label(kind)}: {parts}")
    lines.append(_("Images delivered: {images}").format(images=images))
    lines.append(_("Estimated spend: ${spend}").format(spend=f"{spend_usd:.2f}"))
    lines.append(
        _("Time to result: median {p50}, 95% within {p95}").format(
            p50=seconds(p50_s), p95=seconds(p95_s)
        )
    )
    if errors:
        listed = ", ".join(f"{code} ({n})" for code, n in errors)
        lines.append(_("Top errors: {errors}").format(errors=listed))
    else:
        lines.append(_("Top errors: none"))
    lines.append(
        _("Now: {running} running, {queued} waiting").format(running=running, queued=queued)
    )
    if paused:
        lines.append(_("The bot is paused (/resume)."))
    return "\n".join(lines)


# -- styles, shapes, image counts, remix (issue 17) ----------------------------------------

BUTTON_REMIX = N_("🎨 Remix")
NOT_YOUR_CHOICES = N_("These buttons belong to someone else. Send /settings for your own.")
STYLE_CHOOSE = N_("Choose a style for your new images:")
NO_STYLES = N_("This bot has a single style, so there's nothing to choose.")
REMIX_ASK = N_(
    "🎨 Remix: reply to this message with a new description. "
    "I'll keep the same style, shape and number of images."
)
REMIX_PLACEHOLDER = N_("A new description")
REMIX_EXPIRED = N_("That remix question has expired. Press 🎨 Remix under the picture again.")
REMIX_NOT_YOURS = N_("That remix question was for someone else.")
CHOICE_GONE = N_("That choice isn't offered any more. Send /settings to see what is.")

# The shapes a bot has when the operator names none (config.DEFAULT_SHAPES); other names
# are the operator's own and shown as written.
_SHAPES = {"square": N_("Square"), "portrait": N_("Portrait"), "landscape": N_("Landscape")}


def shape_label(name: str) -> str:
    """A shape's plain name as users see it: "portrait" -> "Portrait"."""
    known = _SHAPES.get(name)
    return _(known) if known else name.replace("-", " ").capitalize()


def images_label(count: int) -> str:
    return ngettext("{count} image", "{count} images", count).format(count=count)


def withheld_note(withheld: int, asked: int) -> str:
    return ngettext(
        "{withheld} of {asked} images was withheld by the provider's safety filter.",
        "{withheld} of {asked} images were withheld by the provider's safety filter.",
        withheld,
    ).format(withheld=withheld, asked=asked)


def result_caption(
    prompt: str, style_name: str | None = None, withheld: int = 0, asked: int = 0
) -> str:
    """The prompt, the style it was made in, and how many images the safety filter kept back."""
    lines = [prompt]
    if style_name:
        lines.append(style_chosen(style_name))
    if withheld:
        lines.append(f"⚠️ {withheld_note(withheld, asked)}")
    if len(lines) == 1:
        return caption(prompt)
    tail = "\n" + "\n".join(lines[1:])
    room = CAPTION_LIMIT - len(tail.encode("utf-16-le")) // 2
    return utf16_trim(prompt, max(16, room)) + tail


def settings_text(style_name: str | None, shape: str | None, count: int, max_count: int) -> str:
    lines = [_("Your choices for new images:")]
    if style_name:
        lines.append(_("• Style: {style}").format(style=style_name))
    if shape:
        lines.append(_("• Shape: {shape}").format(shape=shape_label(shape)))
    else:
        lines.append(_("• Shape: as the bot is set up"))
    if max_count > 1:
        lines.append(_("• Images per request: {count}").format(count=count))
    lines.append(_("Tap a button to change them."))
    return "\n".join(lines)


def style_chosen(name: str) -> str:
    return _("Style: {style}").format(style=name)


def shape_chosen(name: str) -> str:
    return _("Shape: {shape}").format(shape=shape_label(name))


def count_chosen(count: int) -> str:
    return ngettext("{count} image per request", "{count} images per request", count).format(
        count=count
    )


def cap_too_many(kind: JobKind, left: int, retry_after_s: float) -> str:
    """Some of today's images are left, but fewer than the request asks for."""
    if kind is JobKind.GENERATE:
        text = ngettext(
            "You have {left} image left today for image generations, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            "You have {left} images left today for image generations, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            left,
        )
    elif kind is JobKind.EDIT:
        text = ngettext(
            "You have {left} image left today for photo edits, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            "You have {left} images left today for photo edits, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            left,
        )
    else:
        text = ngettext(
            "You have {left} image left today for upscales, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            "You have {left} images left today for upscales, fewer than this "
            "request asks for. Choose fewer images in /settings, or try again after "
            "00:00 UTC (in {wait}).",
            left,
        )
    return text.format(left=left, wait=duration(retry_after_s))

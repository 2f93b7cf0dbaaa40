"""Every string a user can see. Short, friendly, no vendor parameter names, no tracebacks."""

from __future__ import annotations

from imagebot.models import JobKind

CAPTION_LIMIT = 1024  # Telegram's caption limit (counted here in UTF-16 code units, the stricter)
TEXT_LIMIT = 4096

BUTTON_AGAIN = "🔁 Again"
BUTTON_EDIT = "✏️ Edit this"
BUTTON_ORIGINAL = "📎 Original"
BUTTON_CANCEL = "✖ Cancel"

_VERB = {JobKind.GENERATE: "Generating", JobKind.EDIT: "Editing"}
_NOUN = {JobKind.GENERATE: "image generations", JobKind.EDIT: "photo edits"}
_LABEL = {JobKind.GENERATE: "Generate", JobKind.EDIT: "Edit"}


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


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


def start(first_name: str | None, user_id: int, allowed: bool) -> str:
    hello = f"Hi {first_name}!" if first_name else "Hi!"
    if not allowed:
        return (
            f"{hello} This bot is private. Your Telegram user id is {user_id}: "
            "send it to the bot's owner to ask for access."
        )
    return (
        f"{hello} I draw pictures from your words and edit your photos.\n\n"
        "• /generate a red fox in the snow\n"
        "• send a photo with the caption /edit make it night\n\n"
        "/help lists everything I can do."
    )


def help_text(max_chars: int) -> str:
    return (
        "What I can do:\n\n"
        "/generate <description> - draw a new image\n"
        "   e.g. /generate a lighthouse at dawn, watercolor\n"
        "/edit <instruction> - change a photo. Send the photo with that caption, reply to a "
        "photo with it, or send /edit alone and I'll ask for the photo\n"
        "   e.g. /edit make the sky purple\n"
        "/cancel - stop your running request (or an edit in progress)\n"
        "   e.g. /cancel\n"
        "/usage - what you've used today and what's left\n"
        "   e.g. /usage\n"
        "/help - this message\n\n"
        f"Descriptions can be up to {max_chars} characters. Under each result: "
        f"{BUTTON_AGAIN} makes another, {BUTTON_EDIT} edits it, "
        f"{BUTTON_ORIGINAL} sends the full-size file."
    )


def status_started(kind: JobKind, job_id: int) -> str:
    return f"{_VERB[kind]}… (job {job_id})"


def status_working(kind: JobKind, job_id: int, elapsed_s: float) -> str:
    return f"{_VERB[kind]}… {duration(elapsed_s)} (job {job_id})"


def status_queued(job_id: int, position: int) -> str:
    """`position` is the place among waiting jobs: 1 means the next free slot is yours."""
    if position <= 1:
        return f"You're next in line. (job {job_id})"
    return f"You're #{position} in line. (job {job_id})"


def status_canceled(job_id: int) -> str:
    return f"Canceled (job {job_id}). It didn't count against your daily limit."


_FAILURES = {
    "safety": "the model refused this request (safety filter). Try different words.",
    "timeout": "it took too long, so I stopped it.",
    "results_expired": "the result expired before I could fetch it.",
    "submit_unknown": "I lost track of it while restarting.",
    "not_an_image": "that file isn't a JPEG, PNG or WebP image.",
    "broken_image": "that image file is damaged or incomplete. Please send it again.",
    "too_large": "that image is too large.",
    "too_many_pixels": "that image has too many pixels.",
    "input_unavailable": "Telegram no longer has that photo.",
    "invalid_input": "the image service didn't accept this request.",
    "blocked_address": "the image service returned a file I'm not allowed to fetch.",
    "delivery_failed": "I couldn't send the result to this chat.",
    "provider_unavailable": "the image service is having trouble right now. "
    "Please try again in a few minutes.",
    "rate_limited": "the image service is too busy right now. Please try again in a minute.",
    "circuit_open": "the image service is having trouble right now. "
    "Please try again in a few minutes.",
    "delivery_gave_up": "Telegram couldn't take the result for a long time, so I stopped trying.",
}


def failure_reason(code: str | None) -> str:
    """Why a job failed, in words a user may see, by error code (see errors.ExternalError)."""
    return _FAILURES.get(code or "", "something went wrong on our side.")


def job_failed(job_id: int, code: str | None) -> str:
    reason = failure_reason(code)
    return f"Sorry, job {job_id} failed: {reason}\nIt didn't count against your daily limit."


def input_problem(code: str | None, limit: float | None, used: float | None, kind: JobKind) -> str:
    example = (
        "/generate a red fox in the snow"
        if kind is JobKind.GENERATE
        else "/edit make the sky purple"
    )
    if code == "too_long":
        return (
            f"That's {int(used or 0)} characters; the limit is {int(limit or 0)}. "
            "Please make it shorter."
        )
    if code == "control_chars":
        return "That text has invisible control characters. Please retype it."
    what = "what to draw" if kind is JobKind.GENERATE else "what to change"
    return f"Tell me {what}, for example:\n{example}"


def not_allowed(user_id: int) -> str:
    return (
        f"Sorry, this bot is private. Your Telegram user id is {user_id}: "
        "send it to the bot's owner to ask for access."
    )


def rate_limited(limit: float, retry_after_s: float) -> str:
    return (
        f"Easy there: at most {int(limit)} requests a minute. "
        f"Try again in {duration(retry_after_s)}."
    )


def cap_reached(kind: JobKind, limit: float, retry_after_s: float, disabled: bool) -> str:
    if disabled:
        return f"{_LABEL[kind]} is switched off on this bot."
    return (
        f"You've used all {int(limit)} {_NOUN[kind]} for today. "
        f"The count resets at 00:00 UTC (in {duration(retry_after_s)})."
    )


def spend_cap_reached(retry_after_s: float) -> str:
    return (
        "The bot has reached today's budget, so it isn't taking new requests. "
        f"Please try again after 00:00 UTC (in {duration(retry_after_s)})."
    )


def usage(used: dict[JobKind, int], caps: dict[JobKind, int], is_admin: bool) -> str:
    lines = ["Today (UTC):"]
    for kind in JobKind:
        if is_admin:
            lines.append(f"• {_LABEL[kind]}: {used[kind]} used (no limit for admins)")
        else:
            left = max(0, caps[kind] - used[kind])
            lines.append(f"• {_LABEL[kind]}: {used[kind]} of {caps[kind]} used, {left} left")
    lines.append("Failed or canceled requests don't count.")
    return "\n".join(lines)


def caption(prompt: str) -> str:
    return utf16_trim(prompt, CAPTION_LIMIT)


def many_results(job_id: int, count: int) -> str:
    return f"{count} images (job {job_id})."


NOTHING_TO_CANCEL = "You have nothing running to cancel."
CANCELED_SHORT = "Canceled."
TOO_LATE_TO_CANCEL = "Too late to cancel: the result is on its way."
NOT_YOUR_JOB = "That isn't your request."
BUTTON_EXPIRED = "This button has expired."
BUTTON_OTHER_CHAT = "This button works only in the chat where the request was made."
ORIGINAL_GONE = "The original file isn't kept any more."
ORIGINAL_SENDING = "Sending the original…"
GENERIC_ERROR = "Sorry, something went wrong. Please try again in a moment."
PRIVATE_TEXT_HINT = "I didn't get that. Here's what I can do:"

EDIT_ASK_PHOTO = "Send me the photo you want to edit (or /cancel)."
EDIT_ASK_INSTRUCTION = "What should I change? For example: make the sky purple (or /cancel)."
EDIT_WRONG_KIND = (
    "I need a photo: send it as a photo or as a JPEG, PNG or WebP file. /cancel to stop."
)
EDIT_NEED_TEXT = "Tell me in words what to change, e.g. make the sky purple. /cancel to stop."
EDIT_CANCELED = "Okay, edit canceled."
EDIT_TIMED_OUT = "Edit canceled: I waited too long. Send /edit to start again."
EDIT_UNSUPPORTED_MEDIA = (
    "I can only edit still photos (JPEG, PNG or WebP), not stickers, GIFs or videos."
)
EDIT_FILE_TOO_BIG = "That file is over 20 MB, the most Telegram lets bots download."
PHOTO_HINT = (
    "Nice photo! To edit it, reply to it with /edit and what to change, "
    "e.g. /edit make it look like a painting."
)
EDIT_NOT_IMAGE_FILE = "That file isn't an image I can edit. Send a JPEG, PNG or WebP."


def unknown_command(command: str) -> str:
    return f"I don't know {utf16_trim(command, 64)}. Try /help."


# -- credits and payments (Telegram Stars) -------------------------------------------------

STAR = "⭐"
BUY_CHOOSE = "Choose a pack of credits (paid with Telegram Stars):"
BUY_UNKNOWN_PACK = "I don't know that pack. Send /buy to see the packs."
BUY_FAILED = "Sorry, I couldn't create the invoice. Please try again in a moment."
PAY_UNKNOWN_ORDER = "This invoice isn't valid any more. Send /buy for a new one."
PAY_NOT_YOURS = "This invoice was made for someone else. Send /buy to get your own."
PAY_ALREADY_PAID = "This invoice is already paid. Send /buy to buy more credits."
PAY_PRICE_CHANGED = "The amount doesn't match this invoice. Send /buy for a new one."
ADMIN_ONLY = "Only the bot's admins can do that."
REFUND_USAGE = "Usage: /refund <charge id> (the charge id is in the receipt and in /balance)."
GRANT_USAGE = "Usage: /grant <user id> <credits> [note], e.g. /grant 12345 10 sorry for the wait"


def _credits(n: int) -> str:
    return f"{n} credit" if n == 1 else f"{n} credits"


def pack_button(title: str, stars: int) -> str:
    return f"{title} - {stars} {STAR}"


def invoice_description(credits: int) -> str:
    return (
        f"{_credits(credits)} for images in this bot, used once your free daily allowance "
        "is spent."
    )


def receipt(credits: int, stars: int, balance: int) -> str:
    if credits <= 0:
        return (
            f"Payment of {stars} {STAR} received, but I couldn't match it to an order. "
            "The bot's owner will sort it out; /paysupport if you have questions."
        )
    return (
        f"Thank you! {stars} {STAR} received: +{_credits(credits)}.\n"
        f"Your balance: {_credits(balance)}."
    )


def not_enough_credits(kind: JobKind, needed: int, balance: int, free_disabled: bool) -> str:
    free = (
        f"{_LABEL[kind]} isn't free on this bot"
        if free_disabled
        else f"You've used today's free {_NOUN[kind]}"
    )
    return (
        f"{free}. This one costs {_credits(needed)} and you have {_credits(balance)}.\n"
        "Buy credits below (paid with Telegram Stars):"
    )


def balance_text(
    balance: int,
    costs: dict[str, int],
    purchases: list[tuple[str, int, int, str]],
    is_admin: bool,
) -> str:
    """`purchases`: (date, credits, stars, charge id), newest first."""
    lines = [f"Your balance: {_credits(balance)}."]
    if is_admin:
        lines.append("As an admin you don't spend credits.")
    lines.append("Once your free daily allowance is used, each image costs:")
    for name, cost in costs.items():
        lines.append(f"• {name}: {_credits(cost)}")
    if purchases:
        lines.append("Your last purchases:")
        for day, credits, stars, charge_id in purchases:
            lines.append(f"• {day}: +{_credits(credits)} for {stars} {STAR} (charge {charge_id})")
    lines.append("/buy to get more credits.")
    return "\n".join(lines)


def paysupport(support_text: str, charges: list[tuple[str, int, str]]) -> str:
    """`charges`: (date, stars, charge id) of the user's last payments."""
    text = support_text.strip()
    if charges:
        listed = "\n".join(f"• {day}: {stars} {STAR}, charge {cid}" for day, stars, cid in charges)
        text += f"\n\nYour last payments (quote the charge id when you write):\n{listed}"
    return text


def refund_unknown(charge_id: str) -> str:
    return f"No purchase with charge id {utf16_trim(charge_id, 200)} is recorded."


def refund_already(charge_id: str) -> str:
    return f"Charge {charge_id} is already refunded."


def refund_refused_balance(user_id: int, balance: int, credits: int) -> str:
    return (
        f"Not refunded: user {user_id} has {_credits(balance)} left and this purchase gave "
        f"{_credits(credits)}. A refund takes the credits back and a balance can't go below "
        "zero. /grant them first if you want to refund anyway."
    )


def refund_failed(charge_id: str, error: str) -> str:
    return f"Telegram didn't refund charge {charge_id}: {utf16_trim(error, 300)}. Nothing changed."


def refund_done(charge_id: str, user_id: int, stars: int, balance: int) -> str:
    return (
        f"Refunded charge {charge_id}: {stars} {STAR} back to user {user_id}; "
        f"their balance is now {_credits(balance)}."
    )


def refund_notice(stars: int, balance: int) -> str:
    return f"{stars} {STAR} were refunded to you. Your balance: {_credits(balance)}."


def grant_done(user_id: int, credits: int, balance: int) -> str:
    return f"Gave user {user_id} {_credits(credits)}; their balance is now {_credits(balance)}."


def granted_notice(credits: int, balance: int) -> str:
    return f"You got {_credits(credits)} from the bot's owner. Your balance: {_credits(balance)}."

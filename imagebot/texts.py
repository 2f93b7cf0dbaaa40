"""Every string a user can see. Short, friendly, no vendor parameter names, no tracebacks."""

from __future__ import annotations

from imagebot.models import JobKind

CAPTION_LIMIT = 1024  # Telegram's caption limit (counted here in UTF-16 code units, the stricter)
TEXT_LIMIT = 4096

BUTTON_AGAIN = "🔁 Again"
BUTTON_EDIT = "✏️ Edit this"
BUTTON_ORIGINAL = "📎 Original"
BUTTON_CANCEL = "✖ Cancel"

_VERB = {JobKind.GENERATE: "Generating", JobKind.EDIT: "Editing", JobKind.UPSCALE: "Upscaling"}
_NOUN = {
    JobKind.GENERATE: "image generations",
    JobKind.EDIT: "photo edits",
    JobKind.UPSCALE: "upscales",
}
_LABEL = {JobKind.GENERATE: "Generate", JobKind.EDIT: "Edit", JobKind.UPSCALE: "Upscale"}


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


def start(first_name: str | None, user_id: int, allowed: bool, bootstrap: bool = False) -> str:
    hello = f"Hi {first_name}!" if first_name else "Hi!"
    if not allowed:
        return (
            f"{hello} This bot is private. Your Telegram user id is {user_id}: "
            "send it to the bot's owner to ask for access." + _operator_way_in(user_id, bootstrap)
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
        "/settings - choose the style, shape and number of images\n"
        "/style - choose the style\n"
        "/history - your last requests here, to get a result again\n"
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


def not_allowed(user_id: int, bootstrap: bool = False) -> str:
    return (
        f"Sorry, this bot is private. Your Telegram user id is {user_id}: "
        "send it to the bot's owner to ask for access." + _operator_way_in(user_id, bootstrap)
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


def usage(
    used: dict[JobKind, int],
    caps: dict[JobKind, int],
    is_admin: bool,
    counts_images: bool = False,
) -> str:
    """`counts_images`: users may ask for several images per request, so the limits count
    images (and the text says so)."""
    unit = " images" if counts_images else ""
    lines = ["Today (UTC):"]
    for kind in caps:  # the operations this bot offers
        if is_admin:
            lines.append(f"• {_LABEL[kind]}: {used[kind]}{unit} used (no limit for admins)")
        else:
            left = max(0, caps[kind] - used[kind])
            lines.append(f"• {_LABEL[kind]}: {used[kind]} of {caps[kind]}{unit} used, {left} left")
    if counts_images:
        lines.append(
            "Each image counts: a request for 3 images uses 3. "
            "Images the safety filter held back don't count."
        )
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


# -- albums, upscale, delete, history (issue 17) ---------------------------------------------

BUTTON_UPSCALE = "⤴ Upscale"
BUTTON_DELETE = "🗑 Delete"
DELETED = "Deleted."
ALREADY_DELETED = "That result was already deleted."
UPSCALE_GONE = "That image isn't available to upscale any more."
HISTORY_EMPTY = "You have no finished requests here yet. Try /generate a red fox in the snow"
HISTORY_GONE = "I can't send that result again: Telegram no longer has it."
HISTORY_NOTHING = "That request has no result to send again."
HISTORY_SENDING = "Sending it again…"
ALBUM_HINT = (
    "Nice photos! To edit them together, send them again as one album with the caption "
    "/edit and what to change, e.g. /edit put us on a beach"
)
ALBUM_NOTHING_TO_EDIT = "None of the files in that album is a photo I can edit."

_HISTORY_KIND = {JobKind.GENERATE: "🖼", JobKind.EDIT: "✏️", JobKind.UPSCALE: "⤴"}
_HISTORY_STATUS = {"succeeded": "done", "failed": "failed", "canceled": "canceled"}


def album_first_used(sent: int, used: int) -> str:
    """An album with more photos than one edit takes."""
    return (
        f"You sent {sent} photos; I'm editing the first {used} together "
        f"(that's the most one edit can use)."
    )


def upscale_caption(prompt: str) -> str:
    return utf16_trim(f"⤴ Upscaled: {prompt}", CAPTION_LIMIT)


def history_line(when: str, kind: JobKind, prompt: str, status: str, deleted: bool) -> str:
    """One finished job in /history: when (UTC), what, the prompt, how it ended."""
    short = utf16_trim(prompt, 60)
    state = _HISTORY_STATUS.get(status, status) + (", deleted" if deleted else "")
    return f"{when} UTC {_HISTORY_KIND.get(kind, '')} {_LABEL[kind]}: “{short}” ({state})"


def history_text(lines: list[str]) -> str:
    head = "Your last requests here (newest first). Tap one to get its result again:"
    return "\n".join([head, *(f"• {line}" for line in lines)])


def history_button(job_id: int, prompt: str) -> str:
    return utf16_trim(f"↩ {job_id}: {prompt}", 40)


# -- the operator's control room: admin commands, invites, pause, menus (issue 19) ---------


def _operator_way_in(user_id: int, bootstrap: bool) -> str:
    """With no admin configured yet, the documented first step for whoever runs the bot
    (it names only the reader's own id)."""
    if not bootstrap:
        return ""
    return (
        "\n\nRunning this bot yourself? No admin is set up yet: on the server, run\n"
        f"imagebot users allow {user_id}\n"
        "(or add your id to access.admins in config.toml to get the admin commands)."
    )


def user_commands(credits: bool) -> list[tuple[str, str]]:
    """The "/" menu everyone sees: (command, description)."""
    commands = [
        ("generate", "Draw an image from a description"),
        ("edit", "Change a photo"),
        ("cancel", "Stop your running request"),
        ("usage", "What you've used today"),
        ("settings", "Style, shape and number of images"),
        ("style", "Choose a style"),
        ("history", "Your last requests, to get a result again"),
        ("help", "What I can do"),
    ]
    if credits:
        commands += [("buy", "Buy credits with Telegram Stars"), ("balance", "Your credits")]
    return commands


def admin_commands(credits: bool) -> list[tuple[str, str]]:
    """The admins' extra entries in their own "/" menu."""
    commands = [
        ("allow", "Let a user in (id, or reply to them)"),
        ("deny", "Take a user's access away"),
        ("users", "Who may use the bot"),
        ("invite", "Make an invite link: [uses] [hours]"),
        ("invites", "Open invites; revoke one"),
        ("stats", "Today's numbers"),
        ("pause", "Stop taking new requests: [message]"),
        ("resume", "Take requests again"),
    ]
    if credits:
        commands += [("grant", "Give a user credits"), ("refund", "Refund a Stars payment")]
    return commands


PAUSED_DEFAULT = (
    "The bot is taking a short break and isn't taking new requests right now. "
    "Please try again a bit later."
)
ACCESS_GRANTED = "Good news: you can use this bot now. Send /help to see what I can do."
ALLOW_USAGE = (
    "Usage: /allow <user id>, or reply /allow to a message of the person to let in. "
    "They can find their id by sending me /start."
)
DENY_USAGE = "Usage: /deny <user id>, or reply /deny to a message of theirs."
INVITE_USAGE = "Usage: /invite [uses] [hours], e.g. /invite 5 24 (default: 1 use, valid 72 hours)."
INVITES_USAGE = "Usage: /invites to list open invites, /invites revoke <number> to withdraw one."
NO_INVITES = "No open invites. /invite makes one."
RESUME_NOT_PAUSED = "The bot isn't paused."
RESUMED = "Resumed: the bot takes new requests again."


def _who(user_id: int, name: str | None) -> str:
    return f"{user_id} ({name})" if name else str(user_id)


def allowed_done(user_id: int, name: str | None) -> str:
    return f"Done: {_who(user_id, name)} can use the bot now. /deny {user_id} takes it back."


def allow_already(user_id: int, in_config: bool) -> str:
    where = " (listed in config.toml)" if in_config else ""
    return f"{user_id} can use the bot already{where}."


def denied_done(user_id: int) -> str:
    return f"Done: {user_id} can no longer use the bot."


def deny_config(user_id: int, role: str) -> str:
    key = "access.admins" if role == "admin" else "access.users"
    return (
        f"{user_id} is listed in config.toml ({key}), which I can't change from here. "
        "Remove them there and restart the bot."
    )


def deny_not_listed(user_id: int) -> str:
    return f"{user_id} isn't on the list, so there's nothing to take away."


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
        return f"{n} request today" if n == 1 else f"{n} requests today"

    lines = []
    if is_open:
        lines.append("Anyone may use the bot (access.open = true in config.toml).")
    lines.append("Admins (config.toml):")
    lines += [f"• {uid}: {today(uid)}" for uid in admins] or ["• none"]
    lines.append("Users (config.toml, read-only here):")
    lines += [f"• {uid}: {today(uid)}" for uid in config_users] or ["• none"]
    lines.append("Let in here (/deny takes them off):")
    lines += [
        f"• {_who(uid, name)}: {how}, {day}; {today(uid)}" for uid, name, how, day in added
    ] or ["• none"]
    if chats:
        lines.append("Group chats (config.toml): " + ", ".join(str(c) for c in chats))
    return utf16_trim("\n".join(lines), TEXT_LIMIT)


def added_how(source: str, added_by: int | None, invite_id: int | None) -> str:
    if source == "invite":
        return f"invite #{invite_id}" if invite_id else "invite"
    if source == "shell":
        return "from the shell"
    return f"by {added_by}"


def invite_created(link: str | None, code: str, uses: int, expires: str) -> str:
    times = "once" if uses == 1 else f"{uses} times"
    how = link if link else f"Ask them to send me: /start {code}"
    return (
        f"Invite link (works {times}, until {expires} UTC):\n{how}\n\n"
        "Anyone who opens it can use the bot. /invites lists open invites."
    )


def invites_text(invites: list[tuple[int, int, int, str, int | None]]) -> str:
    """`invites`: (number, uses left, uses, expiry, made by), newest first."""
    lines = ["Open invites:"]
    for number, left, uses, expires, by in invites:
        maker = f", made by {by}" if by else ", made from the shell"
        lines.append(f"• #{number}: {left} of {uses} uses left, until {expires} UTC{maker}")
    lines.append("/invites revoke <number> withdraws one.")
    return utf16_trim("\n".join(lines), TEXT_LIMIT)


def invite_revoked(number: int) -> str:
    return f"Invite #{number} is withdrawn: its link no longer works."


def invite_revoke_unknown(number: int) -> str:
    return f"There's no invite #{number}."


def invite_revoke_already(number: int) -> str:
    return f"Invite #{number} was withdrawn already."


def invite_welcome(first_name: str | None) -> str:
    hello = f"Welcome, {first_name}!" if first_name else "Welcome!"
    return (
        f"{hello} The invite worked: you can use this bot now.\n\n"
        "• /generate a red fox in the snow\n"
        "• send a photo with the caption /edit make it night\n\n"
        "/help lists everything I can do."
    )


_INVITE_REFUSED = {
    "used_up": "This invite link has been used up.",
    "expired": "This invite link has expired.",
    "revoked": "This invite link was withdrawn.",
    "unknown": "I don't recognize this invite link.",
}


def invite_refused(why: str, user_id: int) -> str:
    return (
        f"Sorry! {_INVITE_REFUSED.get(why, _INVITE_REFUSED['unknown'])} "
        f"Ask whoever sent it for a new one. Your Telegram user id is {user_id}."
    )


def paused_notice(message: str | None, is_admin: bool) -> str:
    text = message or PAUSED_DEFAULT
    if is_admin:
        text += "\n\n(The bot is paused: /resume takes requests again.)"
    return text


def paused_done(message: str | None) -> str:
    told = message or PAUSED_DEFAULT
    return (
        "Paused: new requests are refused, running and queued ones finish. "
        f"Users are told:\n{told}\n\n/resume to take requests again."
    )


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 10 else duration(value)


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
    lines = [f"Today (UTC): {total} request{'s' if total != 1 else ''}"]
    for kind, label in (("generate", "Generate"), ("edit", "Edit")):
        counts = per_kind.get(kind, {})
        if counts:
            parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            lines.append(f"• {label}: {parts}")
    lines.append(f"Images delivered: {images}")
    lines.append(f"Estimated spend: ${spend_usd:.2f}")
    lines.append(f"Time to result: median {seconds(p50_s)}, 95% within {seconds(p95_s)}")
    if errors:
        lines.append("Top errors: " + ", ".join(f"{code} ({n})" for code, n in errors))
    else:
        lines.append("Top errors: none")
    lines.append(f"Now: {running} running, {queued} waiting")
    if paused:
        lines.append("The bot is paused (/resume).")
    return "\n".join(lines)


# -- styles, shapes, image counts, remix (issue 17) ----------------------------------------

BUTTON_REMIX = "🎨 Remix"
NOT_YOUR_CHOICES = "These buttons belong to someone else. Send /settings for your own."
STYLE_CHOOSE = "Choose a style for your new images:"
NO_STYLES = "This bot has a single style, so there's nothing to choose."
REMIX_ASK = (
    "🎨 Remix: reply to this message with a new description. "
    "I'll keep the same style, shape and number of images."
)
REMIX_PLACEHOLDER = "A new description"
REMIX_EXPIRED = "That remix question has expired. Press 🎨 Remix under the picture again."
REMIX_NOT_YOURS = "That remix question was for someone else."
CHOICE_GONE = "That choice isn't offered any more. Send /settings to see what is."


def shape_label(name: str) -> str:
    """A shape's plain name as users see it: "portrait" -> "Portrait"."""
    return name.replace("-", " ").capitalize()


def images_label(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def withheld_note(withheld: int, asked: int) -> str:
    verb = "was" if withheld == 1 else "were"
    return f"{withheld} of {asked} images {verb} withheld by the provider's safety filter."


def result_caption(
    prompt: str, style_name: str | None = None, withheld: int = 0, asked: int = 0
) -> str:
    """The prompt, the style it was made in, and how many images the safety filter kept back."""
    lines = [prompt]
    if style_name:
        lines.append(f"Style: {style_name}")
    if withheld:
        lines.append(f"⚠️ {withheld_note(withheld, asked)}")
    if len(lines) == 1:
        return caption(prompt)
    tail = "\n" + "\n".join(lines[1:])
    room = CAPTION_LIMIT - len(tail.encode("utf-16-le")) // 2
    return utf16_trim(prompt, max(16, room)) + tail


def settings_text(style_name: str | None, shape: str | None, count: int, max_count: int) -> str:
    lines = ["Your choices for new images:"]
    if style_name:
        lines.append(f"• Style: {style_name}")
    lines.append(f"• Shape: {shape_label(shape) if shape else 'as the bot is set up'}")
    if max_count > 1:
        lines.append(f"• Images per request: {count}")
    lines.append("Tap a button to change them.")
    return "\n".join(lines)


def style_chosen(name: str) -> str:
    return f"Style: {name}"


def shape_chosen(name: str) -> str:
    return f"Shape: {shape_label(name)}"


def count_chosen(count: int) -> str:
    return f"{images_label(count)} per request"


def cap_too_many(kind: JobKind, left: int, retry_after_s: float) -> str:
    """Some of today's images are left, but fewer than the request asks for."""
    return (
        f"You have {images_label(left)} left today for {_NOUN[kind]}, fewer than this "
        "request asks for. Choose fewer images in /settings, or try again after 00:00 UTC "
        f"(in {duration(retry_after_s)})."
    )

"""Command line: `imagebot [--polling|--webhook] [--config PATH]`, `imagebot check-config`,
and the operator's shell controls `imagebot users allow|deny|list` and `imagebot invite`.

A configuration problem prints one line naming the setting and exits with code 2, before
anything touches the network. A setting the machine refuses at start-up (a port already in
use, a database or results path that cannot be created) prints one line naming the setting
and the address or path and exits with code 1, as a database problem does: the file may be
right and the machine about to change (the other program on the port stops, a disk gets
mounted), so systemd's Restart=on-failure tries again, while exit 2 is in
RestartPreventExitStatus because only an edit of the configuration can fix it.

`users` and `invite` work on the bot's database (same config, no token needed) while the bot
runs: SQLite in WAL mode with a busy timeout takes both, and the running bot picks the
change up within `access.refresh_interval_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Sequence

from imagebot import __version__
from imagebot.config import Settings, load_settings
from imagebot.errors import ConfigError, StartupError, StoreError
from imagebot.logs import configure_logging, get_logger, install_excepthook
from imagebot.runtime import tune_interpreter

EXIT_CONFIG = 2
EXIT_STARTUP = 1  # the machine refused a setting (port in use, path): a restart may help


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebot",
        description="Telegram bot that generates images (Replicate) and edits photos (fal.ai).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "check-config", "users", "invite", "migrate-store"],
        default="run",
        help="run the bot (default), validate the configuration and print it, "
        "`users allow <id>|deny <id>|list`, `invite` (a link that lets its opener in), or "
        "copy a SQLite store into PostgreSQL (migrate-store --from PATH --to URL, bot stopped)",
    )
    parser.add_argument("args", nargs="*", metavar="ARG", help="users: allow <id>|deny <id>|list")
    parser.add_argument(
        "--uses", type=int, default=None, metavar="N", help="invite: how many people (1)"
    )
    parser.add_argument(
        "--hours", type=float, default=None, metavar="H", help="invite: valid this long (72)"
    )
    parser.add_argument("--from", dest="copy_from", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--to", dest="copy_to", metavar="URL", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--polling",
        action="store_const",
        const="polling",
        dest="mode",
        help="receive updates with getUpdates long polling (development)",
    )
    mode.add_argument(
        "--webhook",
        action="store_const",
        const="webhook",
        dest="mode",
        help="receive updates on the webhook (production)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $IMAGEBOT_CONFIG, else ./config.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="log format (default: [logs] format, json unless a terminal)",
    )
    parser.add_argument(
        "--roles",
        metavar="ROLES",
        help="what this process does, comma-separated: intake,worker,maintenance"
        " (default: [cluster] roles, all three)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="same as the check-config command"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def _error(kind: str, exc: Exception) -> None:
    """One line on stderr, whatever the message holds (journald shows it as one entry)."""
    print(f"imagebot: {kind}: {' '.join(str(exc).split())}", file=sys.stderr)  # noqa: T201


def _migrate_store(source: str | None, target: str | None) -> int:
    """Copy a SQLite store into an empty PostgreSQL database; say what was done."""
    from pathlib import Path

    from imagebot.store.db import is_postgresql_url

    if not source or not target or not is_postgresql_url(target):
        _error(
            "usage",
            ValueError("imagebot migrate-store --from <sqlite path> --to postgresql://…"),
        )
        return EXIT_CONFIG
    from imagebot.store.copy import copy_store

    try:
        report = copy_store(Path(source), target)
    except StoreError as exc:
        _error("migrate-store", exc)
        return 1
    for line in report.lines():
        print(line)  # noqa: T201
    return 0


def effective_settings(settings: Settings) -> dict[str, object]:
    """Every setting as JSON, secrets masked (a set secret shows as '**********')."""
    data: dict[str, object] = settings.model_dump(mode="json")
    for key in (
        "telegram_bot_token",
        "replicate_api_token",
        "fal_key",
        "webhook_secret",
        "ops_token",
        "proxy_url",
    ):
        data[key] = "**********" if data.get(key) else None
    storage = data.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("database"), str):
        storage["database"] = _mask_url_password(storage["database"])
    return data


def _mask_url_password(url: str) -> str:
    """A postgresql:// URL with its password (user:password@ or ?password=) masked."""
    url = re.sub(r"^(postgres(?:ql)?://[^:/@]*):[^@/]*@", r"\1:**********@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1**********", url)


async def _serve(settings: Settings) -> int:
    tune_interpreter()  # a bad override stops here, before the heavy imports
    from imagebot.app import build, run  # the bot's heavy imports, only when running it

    app = build(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop, sig.name)
    return await run(app)


def main(argv: Sequence[str] | None = None) -> int:
    # Opt in to PTB's timedelta durations now: its RetryAfter warns on every flood wait
    # otherwise (imagebot reads both forms).
    os.environ.setdefault("PTB_TIMEDELTA", "true")
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.version:
        print(f"imagebot {__version__}")  # noqa: T201
        return 0
    if args.command == "migrate-store":
        return _migrate_store(args.copy_from, args.copy_to)
    if args.command in ("users", "invite"):
        return _shell(parser, args)
    if args.args:
        parser.error(f"unexpected argument: {args.args[0]}")
    try:
        roles = args.roles.split(",") if args.roles is not None else None
        settings = load_settings(args.config, mode=args.mode, roles=roles)
    except ConfigError as exc:
        _error("configuration error", exc)
        return EXIT_CONFIG
    if args.command == "check-config" or args.check_config:
        for old, new in settings.renamed_keys:
            print(f"imagebot: deprecated setting: {old} is now {new}", file=sys.stderr)  # noqa: T201
        print(json.dumps(effective_settings(settings), indent=2, default=str))  # noqa: T201
        return 0
    configure_logging(
        fmt=args.log_format or settings.logs.format,
        level=settings.logs.level,
        secrets=settings.secret_values(),
    )
    install_excepthook()
    for old, new in settings.renamed_keys:
        get_logger(__name__).warning("config_key_renamed", old_key=old, new_key=new)
    try:
        return asyncio.run(_serve(settings))
    except ConfigError as exc:
        _error("configuration error", exc)
        return EXIT_CONFIG
    except StartupError as exc:
        _error("start-up error", exc)
        return EXIT_STARTUP
    except StoreError as exc:
        _error("database error", exc)
        return 1


# -- the operator's shell controls (issue 19) ----------------------------------------------


def _shell_request(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, int | None]:
    """(action, user id) from the arguments; a usage error exits 2 through argparse."""
    if args.command == "invite":
        if args.args:
            parser.error("invite takes no arguments: imagebot invite [--uses N] [--hours H]")
        from imagebot.control import MAX_INVITE_HOURS, MAX_INVITE_USES

        if args.uses is not None and not 1 <= args.uses <= MAX_INVITE_USES:
            parser.error(f"--uses must be 1-{MAX_INVITE_USES}")
        if args.hours is not None and not 0 < args.hours <= MAX_INVITE_HOURS:
            parser.error(f"--hours must be more than 0 and at most {MAX_INVITE_HOURS:g}")
        return "invite", None
    if args.uses is not None or args.hours is not None:
        parser.error("--uses and --hours go with `imagebot invite`")
    match args.args:
        case ["list"]:
            return "list", None
        case ["allow" | "deny" as action, user_id] if user_id.isascii() and user_id.isdigit():
            if not 0 < int(user_id) < 2**63:
                parser.error("a Telegram user id is a positive number")
            return action, int(user_id)
    parser.error("usage: imagebot users allow <user id> | users deny <user id> | users list")
    raise AssertionError("argparse's error() exits")


def _shell(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    action, user_id = _shell_request(parser, args)
    try:
        settings = load_settings(args.config, secrets=False)
    except ConfigError as exc:
        _error("configuration error", exc)
        return EXIT_CONFIG
    # Logs (the admin_action audit line) on stderr: stdout is the answer, for scripts.
    configure_logging(
        fmt=args.log_format or settings.logs.format,
        level=settings.logs.level,
        secrets=settings.secret_values(),
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_shell_run(settings, action, user_id, args))
    except StoreError as exc:
        _error("database error", exc)
        return 1


async def _shell_run(
    settings: Settings, action: str, user_id: int | None, args: argparse.Namespace
) -> int:
    from imagebot.clock import utcnow
    from imagebot.control import DEFAULT_INVITE_HOURS, DEFAULT_INVITE_USES, Control, invite_link
    from imagebot.policy import Policy
    from imagebot.store.access import AccessStore
    from imagebot.store.db import connect_store
    from imagebot.store.migrate import migrate
    from imagebot.store.usage import Usage, day_start

    db = connect_store(settings.storage.database, synchronous=settings.storage.synchronous)
    await db.open()
    try:
        await migrate(db)  # the first run may come before the bot ever started
        policy = Policy(settings)
        control = Control(AccessStore(db), policy)
        await control.load()
        later = f"the running bot picks it up within {settings.access.refresh_interval_s:g} s"
        if action == "invite":
            uses = args.uses or DEFAULT_INVITE_USES
            hours = args.hours or DEFAULT_INVITE_HOURS
            code, made = await control.invite(uses=uses, hours=hours, admin_id=None)
            link = invite_link(control.bot_username, code)
            print(link or f"/start {code}")  # noqa: T201
            note = "" if link else " (send it to the bot: its @username is known once it ran)"
            expires = made.expires_at.strftime("%Y-%m-%d %H:%M")
            _say(f"invite #{made.id}: {uses} use(s), valid until {expires} UTC{note}")
            return 0
        if action == "list":
            access = settings.access
            used = await Usage(db).used_today_by_user(day_start(utcnow()))
            print("user_id\tallowed_by\tadded_at\trequests_today")  # noqa: T201
            for uid in sorted(set(access.admins)):
                print(f"{uid}\tconfig (admin)\t-\t{used.get(uid, 0)}")  # noqa: T201
            for uid in sorted(set(access.users) - set(access.admins)):
                print(f"{uid}\tconfig\t-\t{used.get(uid, 0)}")  # noqa: T201
            for user in await control.access.allowed():
                how = user.source.value + (f" {user.added_by}" if user.added_by else "")
                added = user.added_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                print(f"{user.user_id}\t{how}\t{added}\t{used.get(user.user_id, 0)}")  # noqa: T201
            if access.open:
                _say("access.open = true: anyone may use the bot")
            return 0
        assert user_id is not None
        role = policy.config_role(user_id)
        if action == "allow":
            if role is not None:
                _say(f"{user_id} is listed in config.toml already")
            elif await control.allow(user_id, admin_id=None):
                _say(f"{user_id} may use the bot now ({later})")
            else:
                _say(f"{user_id} may use the bot already")
            return 0
        if role is not None:
            key = "access.admins" if role == "admin" else "access.users"
            _error("not changed", ValueError(f"{user_id} is listed in config.toml ({key})"))
            return 1
        if await control.deny(user_id, admin_id=None) is None:
            _say(f"{user_id} was not on the list")
        else:
            _say(f"{user_id} may no longer use the bot ({later})")
        return 0
    finally:
        await db.close()


def _say(text: str) -> None:
    print(f"imagebot: {text}", file=sys.stderr)  # noqa: T201

"""Command line: `imagebot [--polling|--webhook] [--config PATH]`, `imagebot check-config`.

A configuration problem prints one line naming the setting and exits with code 2, before
anything touches the network. A setting the machine refuses at start-up (a port already in
use, a database or results path that cannot be created) prints one line naming the setting
and the address or path and exits with code 1, as a database problem does: the file may be
right and the machine about to change (the other program on the port stops, a disk gets
mounted), so systemd's Restart=on-failure tries again, while exit 2 is in
RestartPreventExitStatus because only an edit of the configuration can fix it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
        choices=["run", "check-config"],
        default="run",
        help="run the bot (default) or validate the configuration and print it",
    )
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
        "--check-config", action="store_true", help="same as the check-config command"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def _error(kind: str, exc: Exception) -> None:
    """One line on stderr, whatever the message holds (journald shows it as one entry)."""
    print(f"imagebot: {kind}: {' '.join(str(exc).split())}", file=sys.stderr)  # noqa: T201


def effective_settings(settings: Settings) -> dict[str, object]:
    """Every setting as JSON, secrets masked (a set secret shows as '**********')."""
    data: dict[str, object] = settings.model_dump(mode="json")
    for key in (
        "telegram_bot_token",
        "replicate_api_token",
        "fal_key",
        "webhook_secret",
        "ops_token",
    ):
        data[key] = "**********" if data.get(key) else None
    return data


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
    args = _parser().parse_args(argv)
    if args.version:
        print(f"imagebot {__version__}")  # noqa: T201
        return 0
    try:
        settings = load_settings(args.config, mode=args.mode)
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

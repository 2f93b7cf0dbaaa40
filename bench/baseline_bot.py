"""The thinnest python-telegram-bot 22 bot, behind the same kind of webhook as imagebot.

`python -m bench.baseline_bot --api-base URL --port N --secret S` (token from
TELEGRAM_BOT_TOKEN): an Application with `updater(None)` whose aiohttp route checks the
secret header in constant time, parses the JSON, answers an empty 200 and puts the Update on
`application.update_queue` (PTB's custom-webhook pattern, as imagebot's intake does, minus
the save to SQLite). Its one handler answers /generate with one sendMessage: no store, no
jobs, no rate limiter, updates processed concurrently. Prints "ready <port>" (the bound port)
once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update
from telegram.ext import Application, CommandHandler, ContextTypes
from telegram.request import HTTPXRequest

PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
REPLY = "Generating… (job 0)"


async def generate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Answer every /generate with one message."""
    if update.effective_chat is not None:
        await context.bot.send_message(update.effective_chat.id, REPLY)


def build(api_base: str, token: str) -> Application[Any, Any, Any, Any, Any, Any]:
    """The Application: same HTTP client pool size as imagebot, concurrent updates."""
    application = (
        Application.builder()
        .token(token)
        .base_url(f"{api_base}/bot")
        .base_file_url(f"{api_base}/file/bot")
        .updater(None)
        .request(HTTPXRequest(connection_pool_size=128, connect_timeout=10, read_timeout=20))
        .concurrent_updates(256)
        .build()
    )
    application.add_handler(CommandHandler("generate", generate))
    return application


def webhook_app(
    application: Application[Any, Any, Any, Any, Any, Any], secret: str
) -> web.Application:
    """The aiohttp app with the single webhook route."""
    expected = secret.encode()

    async def webhook(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            return web.Response(status=403)
        try:
            payload = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return web.Response(status=400)
        await application.update_queue.put(Update.de_json(payload, application.bot))
        return web.Response(status=200)

    app = web.Application(client_max_size=2 * 1024 * 1024)
    app.router.add_post(PATH, webhook)
    return app


async def serve(api_base: str, port: int, secret: str) -> None:
    """Run until SIGTERM/SIGINT."""
    token = os.environ["TELEGRAM_BOT_TOKEN"]
    application = build(api_base, token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with application:
        await application.start()
        runner = web.AppRunner(webhook_app(application, secret), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port  # port 0: the OS chose
        sys.stdout.write(f"ready {bound}\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await application.stop()


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-base", required=True, help="the (fake) Bot API base URL")
    parser.add_argument("--port", type=int, required=True, help="0: the OS picks (printed)")
    parser.add_argument("--secret", required=True)
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(urlsplit(args.api_base).hostname or "").is_loopback:
        parser.error("--api-base must be a loopback URL")
    asyncio.run(serve(args.api_base, args.port, args.secret))


if __name__ == "__main__":
    main()

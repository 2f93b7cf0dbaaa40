"""structlog set-up: one JSON object per line on stdout, library logs included, secrets masked."""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

MASK = "<redacted>"

# A bot token anywhere (URLs, reprs, also with the colon percent-encoded), and the token part of
# a Bot API or Telegram file URL (`/bot<token>/getMe`, `/file/bot<token>/photos/x.jpg`) even
# when the token is not one we were told about.
_TOKEN_RE = re.compile(r"\d{3,}(?::|%3[Aa])[A-Za-z0-9_-]{20,}")
_BOT_PATH_RE = re.compile(r"/(file/)?bot\d+(?::|%3[Aa])[^/\s\"'?&#]*")
_MIN_SECRET_LEN = 4
_MIN_PART_LEN = 8

# Libraries that log every request (URL with the token) or every scheduler tick at INFO.
_QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "apscheduler": logging.WARNING,
    "aiohttp.access": logging.WARNING,
    "telegram.ext.Application": logging.INFO,
    "telegram.Bot": logging.INFO,
    "hpack": logging.WARNING,
    "PIL": logging.INFO,  # Pillow logs every image chunk at DEBUG
}


class Redactor:
    """Masks configured secrets, bot tokens and Telegram bot/file URL paths in every string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found: set[str] = set()
        for secret in secrets:
            if len(secret) >= _MIN_SECRET_LEN:
                found.add(secret)
            # The secret half of "<bot id>:<secret>" or fal's "<key id>:<key secret>" alone.
            _, sep, tail = secret.partition(":")
            if sep and len(tail) >= _MIN_PART_LEN:
                found.add(tail)
        # Longest first so a secret that contains another is masked whole.
        self._secrets = sorted(found, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _TOKEN_RE.sub(MASK, text)
        return _BOT_PATH_RE.sub(lambda m: f"/{m.group(1) or ''}bot{MASK}", text)

    def scrub(self, value: Any) -> Any:
        """`value` with every string inside it redacted (dicts, lists, bytes included)."""
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self._walk(k): self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._walk(v) for v in value]
        if isinstance(value, bytes | bytearray):
            return self.redact(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.redact(str(value))

    def __call__(self, _logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        return {key: self._walk(value) for key, value in event_dict.items()}


_redactor = Redactor()


def _redact(logger: Any, name: str, event_dict: EventDict) -> EventDict:
    return _redactor(logger, name, event_dict)


def _drop_color_message(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def configure_logging(
    *,
    fmt: str = "auto",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging through one pipeline that ends in redaction + render."""
    global _redactor
    _redactor = Redactor(secrets)
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            # Drop events below the level before any other work is done on them.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet_level, logging.getLevelName(level)))


def install_excepthook() -> None:
    """Log uncaught exceptions (main thread and others) through the pipeline, redacted, instead
    of Python's plain traceback on stderr."""
    log = get_logger("imagebot")

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None:
            return
        log.critical(
            "uncaught_exception",
            thread=args.thread.name if args.thread else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = hook
    threading.excepthook = thread_hook


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def unbind_all() -> None:
    structlog.contextvars.clear_contextvars()


def redact(text: str) -> str:
    """Mask secrets in a string with the configured redactor (for texts stored or shown)."""
    return _redactor.redact(text)

"""Fake Telegram Bot API: a loopback HTTP server speaking the Bot API wire format to PTB."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import html
import io
import ipaddress
import json
import math
import re
import socket
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.multipart import parse_content_disposition
from PIL import Image

from tests import updates as _updates
from tests.fakes.base import FakeServer, serve_until_signalled
from tests.fakes.images import image_size

DEFAULT_TOKEN = "123456:TEST-token_abc"
SEND_METHODS: frozenset[str] = frozenset(
    {"sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup", "copyMessage"}
)

MAX_TEXT = 4096
MAX_CAPTION = 1024
# PTB's FileSizeLimit constants (decimal megabytes); stricter than 2**20 multiples.
MAX_PHOTO_UPLOAD = 10_000_000
MAX_FILE_UPLOAD = 50_000_000
MAX_DOWNLOAD = 20_000_000

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
WEBHOOK_CONFLICT = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
POLL_CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
CHAT_ACTIONS = frozenset(
    [
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    ]
)
# allowed_updates=[] means "all but these" (Bot API docs).
OPT_IN_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
# Parameters that are strings on the wire even when they look like JSON ("42", "true").
STRING_PARAMS = frozenset(
    [
        "text",
        "caption",
        "parse_mode",
        "action",
        "url",
        "secret_token",
        "callback_query_id",
        "file_id",
        "photo",
        "document",
        "video",
        "animation",
        "audio",
        "voice",
        "sticker",
        "inline_message_id",
        "ip_address",
        "business_connection_id",
        "message_effect_id",
        "emoji",
        "name",
        "title",
        "description",
        "short_description",
        "language_code",
        "data",
        "query",
    ]
)
_JSONISH = re.compile(r"^\s*(\{|\[|-?\d+(\.\d+)?([eE][-+]?\d+)?\s*$|true$|false$|null$)")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_COMMAND_RE = re.compile(r"^[a-z0-9_]{1,32}$")

UploadedFile = tuple[str, str, bytes]  # filename, content type, bytes


class TelegramApiError(Exception):
    """An error answer: HTTP status = error_code, Telegram's JSON error body."""

    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


def _bad(description: str) -> TelegramApiError:
    return TelegramApiError(400, f"Bad Request: {description}")


def error_body(code: int, description: str, retry_after: int | None = None) -> dict[str, Any]:
    """Telegram's error JSON, with `parameters.retry_after` when given."""
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return body


@dataclass
class StoredFile:
    """A file the fake knows: uploaded by the bot or registered by a test with `add_file`."""

    file_id: str
    file_unique_id: str
    data: bytes
    file_size: int
    file_path: str
    width: int | None = None
    height: int | None = None
    file_name: str | None = None
    mime_type: str | None = None


@dataclass
class SentMessage:
    """A message the bot sent, with its later edits and deletion."""

    message_id: int
    chat_id: int
    method: str
    kind: str  # "text", "photo", "document", "media_group_photo", "media_group_document", "copy"
    text: str | None = None
    caption: str | None = None
    file_bytes: bytes | None = None
    file_id: str | None = None
    reply_to_message_id: int | None = None
    reply_markup: dict[str, Any] | None = None
    media_group_id: str | None = None
    deleted: bool = False
    edits: list[dict[str, Any]] = field(default_factory=list)
    sent_at: float = field(default_factory=time.time)
    payload: dict[str, Any] = field(default_factory=dict)  # the Message JSON as last returned
    has_spoiler: bool = False  # sent with has_spoiler (a photo hidden until tapped)


@dataclass
class Invoice:
    """An invoice the bot sent (sendInvoice)."""

    message_id: int
    chat_id: int
    title: str
    description: str
    payload: str
    currency: str
    amount: int
    params: dict[str, Any]


@dataclass
class Checkout:
    """One tap on Pay: the pre_checkout_query and what the bot answered."""

    query_id: str
    user_id: int
    chat_id: int
    amount: int
    currency: str
    payload: str
    update_id: int = 0
    outcome: str = "pending"  # approved, refused, timeout, filtered
    error_message: str | None = None
    answers: int = 0


@dataclass
class Charge:
    """A completed Stars payment (a StarTransaction with this id)."""

    charge_id: str
    user_id: int
    chat_id: int
    amount: int
    payload: str
    refunded: bool = False
    update: dict[str, Any] = field(default_factory=dict)


@dataclass
class WebhookConfig:
    """What setWebhook stored."""

    url: str
    secret_token: str | None
    max_connections: int
    allowed_updates: list[str] | None


@dataclass
class _Flood:
    overall_per_s: float
    per_chat_per_s: float
    group_per_min: float
    methods: frozenset[str]
    overall: deque[float] = field(default_factory=deque)
    last_in_chat: dict[int, float] = field(default_factory=dict)
    in_group: dict[int, deque[float]] = field(default_factory=dict)

    def retry_after(self, chat_id: int | None, now: float) -> int | None:
        """Seconds until a call to `chat_id` would be allowed, or None if allowed now."""
        waits: list[float] = []
        while self.overall and now - self.overall[0] >= 1.0:
            self.overall.popleft()
        if len(self.overall) >= self.overall_per_s:
            waits.append(self.overall[0] + 1.0 - now)
        if chat_id is not None and chat_id > 0:
            last = self.last_in_chat.get(chat_id)
            gap = 1.0 / self.per_chat_per_s
            if last is not None and now - last < gap:
                waits.append(last + gap - now)
        elif chat_id is not None:
            window = self.in_group.setdefault(chat_id, deque())
            while window and now - window[0] >= 60.0:
                window.popleft()
            if len(window) >= self.group_per_min:
                waits.append(window[0] + 60.0 - now)
        if not waits:
            return None
        return max(1, math.ceil(max(waits)))

    def commit(self, chat_id: int | None, now: float) -> None:
        self.overall.append(now)
        if chat_id is not None and chat_id > 0:
            self.last_in_chat[chat_id] = now
        elif chat_id is not None:
            self.in_group.setdefault(chat_id, deque()).append(now)


class _LoopbackResolver(AbstractResolver):
    """Resolves only loopback names, so webhook delivery can never leave the machine."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = ["127.0.0.1", "::1"] if host == "localhost" else [host.strip("[]")]
        results: list[ResolveResult] = []
        for address in addresses:
            if not _is_loopback(address):
                raise OSError(f"refusing to connect to non-loopback host {host!r}")
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            results.append(
                ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0, flags=0)
            )
        return results

    async def close(self) -> None:
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _decode_value(key: str, value: Any) -> Any:
    """PTB JSON-encodes every non-string parameter into a form string; undo that."""
    if key in STRING_PARAMS or not isinstance(value, str) or not _JSONISH.match(value):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_multipart(
    body: bytes, content_type: str
) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    envelope = Message()
    envelope["content-type"] = content_type
    boundary = envelope.get_param("boundary")
    if not isinstance(boundary, str):
        raise _bad("can't parse multipart/form-data: no boundary")
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        content = content.removesuffix(b"\r\n")
        part_headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            header, colon, value = line.partition(":")
            if colon:
                part_headers[header.strip().lower()] = value.strip()
        _, disposition = parse_content_disposition(part_headers.get("content-disposition"))
        name = disposition.get("name")
        if not name:
            continue
        filename = disposition.get("filename")
        if filename is None:
            fields[name] = content.decode("utf-8")
        else:
            ctype = part_headers.get("content-type", "application/octet-stream")
            files[name] = (filename, ctype, content)
    return fields, files


def _plain_text(text: str, parse_mode: Any) -> str:
    """The text a user sees: HTML markup removed (other parse modes are kept as sent)."""
    if isinstance(parse_mode, str) and parse_mode.lower() == "html":
        return html.unescape(re.sub(r"<[^>]+>", "", text))
    return text


def _sniff_image(data: bytes) -> tuple[int, int, str] | None:
    """Width, height and format of image bytes; None if Pillow can't read them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = image_size(data)
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "bin").lower()
    except Exception:  # any unreadable upload is "not an image"
        return None
    return width, height, fmt


def _update_type(update: dict[str, Any]) -> str | None:
    return next((key for key in update if key != "update_id"), None)


def _update_chat_id(update: dict[str, Any]) -> int | None:
    for key, value in update.items():
        if key == "update_id" or not isinstance(value, dict):
            continue
        chat = value.get("chat") or (value.get("message") or {}).get("chat")
        if isinstance(chat, dict) and isinstance(chat.get("id"), int):
            return int(chat["id"])
        sender = value.get("from")
        if isinstance(sender, dict) and isinstance(sender.get("id"), int):
            return int(sender["id"])
    return None


def _strip_reply(message: dict[str, Any]) -> dict[str, Any]:
    """A Message as it appears inside reply_to_message: never with a nested reply."""
    out = copy.deepcopy(message)
    out.pop("reply_to_message", None)
    return out


MethodHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class FakeTelegram(FakeServer):
    """A Bot API server on 127.0.0.1 that PTB's real Bot talks to through base_url."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        bot_id: int = 123456,
        username: str = "imagebot_test_bot",
    ) -> None:
        super().__init__()
        self.token = token
        self.bot_id = bot_id
        self.username = username
        # state the tests read
        self.chats: dict[int, list[SentMessage]] = {}
        self.files: dict[str, StoredFile] = {}
        self.file_downloads: list[str] = []
        self.answered_callbacks: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.confirmed_update_ids: set[int] = set()
        self.filtered_update_ids: set[int] = set()
        self.allowed_updates: list[str] | None = None
        self.webhook: WebhookConfig | None = None
        self.webhook_retry_delay = 0.2
        self.webhook_timeout = 10.0
        self.webhook_acked_update_ids: set[int] = set()
        # (update_id, HTTP status or 0 for a connection error, seconds) for every attempt
        self.webhook_deliveries: list[tuple[int, int, float]] = []
        self.flood_429s = 0
        # getUpdates calls being answered now, the most at once, and the 409s one poll
        # superseding another cost (two pollers of one bot: what Telegram refuses)
        self.get_updates_in_flight = 0
        self.get_updates_max_in_flight = 0
        self.poll_conflicts = 0
        self._chat_actions: dict[int, list[tuple[str, float]]] = {}
        self._chat_info: dict[int, dict[str, Any]] = {}
        self._by_id: dict[tuple[int, int], SentMessage] = {}
        self._bot_message_ids: set[int] = set()
        self._user_messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._deleted_user_messages: set[tuple[int, int]] = set()
        self._forbidden_chats: dict[int, str] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._file_seq = 0
        self._media_group_seq = 0
        self._pending: list[dict[str, Any]] = []
        self._poll_generation = 0
        self._changed = asyncio.Event()
        self._closing = False
        self._flood: _Flood | None = None
        self._webhook_task: asyncio.Task[None] | None = None
        self._webhook_last_error: tuple[int, str] | None = None
        self._held_chats: dict[int, asyncio.Event] = {}
        self._methods: dict[str, tuple[str, MethodHandler]] = {}
        # an outage: (HTTP status, the methods it hits or None for all) until end_outage()
        self._outage: tuple[int, frozenset[str] | None] | None = None
        self._init_payments()
        self._init_command_menus()
        for name, handler in {
            **self._method_table(),
            **self._payment_methods(),
            **self._command_menu_methods(),
        }.items():
            self._methods[name.lower()] = (name, handler)
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        self.app.router.add_get("/file/bot{token}/{file_path:.+}", self._handle_file)
        self.app.router.add_post("/_fake/updates", self._control_updates)
        self.app.router.add_post("/_fake/files", self._control_files)
        self.app.router.add_get("/_fake/state", self._control_state)

    def _method_table(self) -> dict[str, MethodHandler]:
        return {
            "getMe": self._get_me,
            "getUpdates": self._get_updates_counted,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands,
            "deleteMyCommands": self._delete_my_commands,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "editMessageCaption": self._edit_message_caption,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "sendChatAction": self._send_chat_action,
            "sendPhoto": self._send_photo,
            "sendDocument": self._send_document,
            "sendMediaGroup": self._send_media_group,
            "copyMessage": self._copy_message,
            "getFile": self._get_file,
            "answerCallbackQuery": self._answer_callback_query,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, port: int = 0) -> FakeTelegram:
        self._closing = False
        await super().start(port)
        if self.webhook is not None:
            # Pending webhook updates survive a restart of the fake, as they do on Telegram.
            self._webhook_task = asyncio.create_task(self._webhook_loop(self.webhook))
        return self

    async def stop(self) -> None:
        # Wake long polls and held calls first: aiohttp waits for running handlers on cleanup.
        self._closing = True
        self._signal()
        await self._stop_webhook_delivery()
        await super().stop()

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def apply_delay(self, op: str) -> None:
        queue = self._delays.get(op)
        if queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_closing(), queue.pop(0))

    async def _wait_closing(self) -> None:
        while not self._closing:
            await self._changed.wait()

    def _signal(self) -> None:
        """Wake everything waiting for a state change (long polls, webhook dispatcher)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- scripting -----------------------------------------------------------------------

    def canonical(self, method: str) -> str:
        """The Bot API spelling of a method name given in any case."""
        entry = self._methods.get(method.lower())
        return entry[0] if entry else method

    def fail_method(
        self,
        method: str,
        error_code: int,
        description: str,
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` with a Telegram error (HTTP status too)."""
        body = error_body(error_code, description, retry_after)
        self.fail_next(self.canonical(method), error_code, body, times=times)

    def delay_next(self, op: str, seconds: float, times: int = 1) -> None:
        """Hold the next `times` calls of method `op` for `seconds`."""
        super().delay_next(self.canonical(op), seconds, times)

    def outage(self, status: int = 502, methods: frozenset[str] | None = None) -> None:
        """Answer every call (or the calls of `methods`) with `status` and Telegram's error
        body until `end_outage()`, as during a Telegram outage. (A refused connection: stop()
        the fake and start(port=...) it again.)"""
        names = frozenset(self.canonical(m) for m in methods) if methods is not None else None
        self._outage = (status, names)

    def end_outage(self) -> None:
        """Telegram is back: answer normally again."""
        self._outage = None

    def forbid_chat(
        self, chat_id: int, description: str = "Forbidden: bot was blocked by the user"
    ) -> None:
        """Refuse every later call for `chat_id` with 403, as after the user blocked the bot."""
        self._forbidden_chats[chat_id] = description

    def enforce_flood(
        self,
        overall_per_s: float = 30,
        per_chat_per_s: float = 1,
        group_per_min: float = 20,
        methods: frozenset[str] = SEND_METHODS,
    ) -> None:
        """Refuse calls over Telegram's documented flood limits with 429 + retry_after."""
        names = frozenset(self.canonical(m) for m in methods)
        self._flood = _Flood(overall_per_s, per_chat_per_s, group_per_min, names)

    def disable_flood(self) -> None:
        """Stop enforcing flood limits."""
        self._flood = None

    def hold_chat(self, chat_id: int) -> None:
        """Hold every call for `chat_id` (recorded, not answered) until `release_chat`."""
        self._held_chats.setdefault(chat_id, asyncio.Event())

    def release_chat(self, chat_id: int) -> None:
        """Answer the held calls for `chat_id` and hold no more."""
        held = self._held_chats.pop(chat_id, None)
        if held is not None:
            held.set()

    def push_update(self, update: dict[str, Any]) -> None:
        """Queue an update for getUpdates, or for webhook delivery while a webhook is set."""
        update_id = update.get("update_id")
        if not isinstance(update_id, int):
            raise TypeError("an update needs an int update_id")
        self._note_chat_and_message(update)
        kind = _update_type(update)
        if self.allowed_updates is not None and kind is not None:
            wanted = self.allowed_updates
            if (kind not in wanted) if wanted else (kind in OPT_IN_UPDATES):
                self.filtered_update_ids.add(update_id)
                return
        self._pending.append(copy.deepcopy(update))
        self._pending.sort(key=lambda u: u["update_id"])
        self._signal()

    def note_user_message(self, message: dict[str, Any]) -> None:
        """Tell the fake about a user's message (push_update does this itself)."""
        chat = message.get("chat") or {}
        if isinstance(chat.get("id"), int) and isinstance(message.get("message_id"), int):
            self._chat_info.setdefault(chat["id"], dict(chat))
            self._user_messages[(chat["id"], message["message_id"])] = copy.deepcopy(message)

    def add_file(
        self, data: bytes, file_size: int | None = None, file_path: str | None = None
    ) -> str:
        """Register a user's file (e.g. a photo they sent) and return its file_id."""
        return self._store_file(data, "user", file_size=file_size, file_path=file_path).file_id

    @property
    def pending_update_count(self) -> int:
        return len(self._pending)

    # -- reading state -------------------------------------------------------------------

    def messages(self, chat_id: int, include_deleted: bool = False) -> list[SentMessage]:
        """Messages the bot sent to `chat_id`, oldest first."""
        return [m for m in self.chats.get(chat_id, []) if include_deleted or not m.deleted]

    def photos(self, chat_id: int) -> list[SentMessage]:
        """Visible photo messages (single or in an album)."""
        return [m for m in self.messages(chat_id) if m.kind in ("photo", "media_group_photo")]

    def documents(self, chat_id: int) -> list[SentMessage]:
        """Visible document messages (single or in an album)."""
        kinds = ("document", "media_group_document")
        return [m for m in self.messages(chat_id) if m.kind in kinds]

    def texts(self, chat_id: int) -> list[str]:
        """Current text of each visible text message."""
        return [m.text or "" for m in self.messages(chat_id) if m.kind == "text"]

    def chat_actions(self, chat_id: int) -> list[tuple[str, float]]:
        """(action, time.time()) of each sendChatAction to `chat_id`."""
        return list(self._chat_actions.get(chat_id, []))

    def all_sent(self, include_deleted: bool = False) -> list[SentMessage]:
        """Every message the bot sent, across chats, in sending order."""
        every = [m for msgs in self.chats.values() for m in msgs]
        every.sort(key=lambda m: (m.sent_at, m.message_id))
        return [m for m in every if include_deleted or not m.deleted]

    def file_bytes(self, file_id: str) -> bytes:
        """The stored bytes of a file_id."""
        return self.files[file_id].data

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle_method(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.json_response(error_body(401, "Unauthorized"), status=401)
        raw_name = request.match_info["method"]
        body = await request.read()
        entry = self._methods.get(raw_name.lower())
        try:
            params = self._parse_params(request, body)
        except TelegramApiError as exc:
            self.record(raw_name, request, body)
            return web.json_response(error_body(exc.code, exc.description), status=exc.code)
        if entry is None:
            self.record(raw_name, request, body, **params)
            return web.json_response(error_body(404, "Not Found: method not found"), status=404)
        name, handler = entry
        self.record(name, request, body, **params)
        await self.apply_delay(name)
        outage = self._outage
        if outage is not None and (outage[1] is None or name in outage[1]):
            status = outage[0]
            return web.json_response(error_body(status, f"Bad Gateway ({status})"), status=status)
        fault = self.take_fault(name)
        if fault is not None:
            return self.fault_response(fault)
        try:
            result = await self._run(name, handler, params)
        except TelegramApiError as exc:
            return web.json_response(
                error_body(exc.code, exc.description, exc.retry_after), status=exc.code
            )
        return web.json_response({"ok": True, "result": result})

    async def _run(self, name: str, handler: MethodHandler, params: dict[str, Any]) -> Any:
        chat_id = params.get("chat_id")
        chat_key = chat_id if isinstance(chat_id, int) else None
        held = self._held_chats.get(chat_key) if chat_key is not None else None
        if held is not None:
            await held.wait()
        if chat_key in self._forbidden_chats and name not in ("getMe", "getFile", "getUpdates"):
            raise TelegramApiError(403, self._forbidden_chats[chat_key])
        flood = self._flood
        if flood is None or name not in flood.methods:
            return await handler(params)
        now = time.monotonic()
        wait = flood.retry_after(chat_key, now)
        if wait is not None:
            self.flood_429s += 1
            raise TelegramApiError(429, f"Too Many Requests: retry after {wait}", wait)
        result = await handler(params)
        # Only calls that succeeded count towards the limits.
        flood.commit(chat_key, now)
        return result

    @staticmethod
    def _parse_params(request: web.Request, body: bytes) -> dict[str, Any]:
        raw: dict[str, Any] = dict(request.query)
        files: dict[str, UploadedFile] = {}
        ctype = request.headers.get("Content-Type", "")
        mime = ctype.split(";", 1)[0].strip().lower()
        if body:
            if mime == "multipart/form-data":
                fields, files = _parse_multipart(body, ctype)
                raw.update(fields)
            elif mime == "application/json":
                try:
                    decoded = json.loads(body)
                except ValueError:
                    raise _bad("can't parse JSON body") from None
                if not isinstance(decoded, dict):
                    raise _bad("JSON body must be an object")
                raw.update(decoded)
            else:
                raw.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        params = {key: _decode_value(key, value) for key, value in raw.items()}
        params["_files"] = files
        return params

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.json_response(error_body(401, "Unauthorized"), status=401)
        file_path = request.match_info["file_path"]
        self.record("fileDownload", request, b"", file_path=file_path)
        await self.apply_delay("fileDownload")
        fault = self.take_fault("fileDownload")
        if fault is not None:
            return self.fault_response(fault)
        stored = self._files_by_path.get(file_path)
        if stored is None:
            return web.json_response(error_body(404, "Not Found"), status=404)
        self.file_downloads.append(file_path)
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # -- control endpoints (for the standalone runner) -----------------------------------

    async def _control_updates(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        for update in payload if isinstance(payload, list) else [payload]:
            self.push_update(update)
        return web.json_response({"ok": True, "pending": len(self._pending)})

    async def _control_files(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True, "file_id": self.add_file(await request.read())})

    async def _control_state(self, request: web.Request) -> web.StreamResponse:
        by_op: dict[str, int] = {}
        for call in self.calls:
            by_op[call.op] = by_op.get(call.op, 0) + 1
        sent = {str(chat): len(msgs) for chat, msgs in self.chats.items()}
        return web.json_response(
            {
                "calls": by_op,
                "sent": sent,
                "pending_updates": len(self._pending),
                "confirmed_updates": len(self.confirmed_update_ids),
                "flood_429s": self.flood_429s,
            }
        )

    # -- shared helpers ------------------------------------------------------------------

    def _bot_user(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Imagebot Test",
            "username": self.username,
        }

    def _chat(self, chat_id: int) -> dict[str, Any]:
        known = self._chat_info.get(chat_id)
        if known is not None:
            return dict(known)
        return {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}

    @staticmethod
    def _chat_id(params: dict[str, Any], key: str = "chat_id") -> int:
        value = params.get(key)
        if value is None or value == "":
            raise _bad(f"{key} is empty")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad("chat not found")
        return value

    @staticmethod
    def _int_param(params: dict[str, Any], key: str) -> int:
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"{key} is empty" if value is None else f"invalid {key} specified")
        return value

    def _note_chat_and_message(self, update: dict[str, Any]) -> None:
        for key, value in update.items():
            if key == "update_id" or not isinstance(value, dict):
                continue
            if "message_id" in value and "chat" in value:
                self.note_user_message(value)
            elif isinstance(value.get("message"), dict):
                message = value["message"]
                chat = message.get("chat") or {}
                if isinstance(chat.get("id"), int):
                    self._chat_info.setdefault(chat["id"], dict(chat))

    def _message_exists(self, chat_id: int, message_id: int) -> bool:
        sent = self._by_id.get((chat_id, message_id))
        if sent is not None:
            return not sent.deleted
        if (chat_id, message_id) in self._deleted_user_messages:
            return False
        if message_id in self._bot_message_ids:
            return False  # a bot message, but in another chat
        # Message ids come from one sequence shared with tests/updates.py, so any id handed out
        # so far may be a user's message the fake never saw (tests call process_update directly).
        return 0 < message_id <= _updates.last_message_id()

    def _reply_target(
        self, chat_id: int, params: dict[str, Any]
    ) -> tuple[int | None, dict[str, Any] | None]:
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id = reply.get("message_id")
            allow = bool(reply.get("allow_sending_without_reply"))
        elif params.get("reply_to_message_id") is not None:
            message_id = params["reply_to_message_id"]
            allow = bool(params.get("allow_sending_without_reply"))
        else:
            return None, None
        if not isinstance(message_id, int) or not self._message_exists(chat_id, message_id):
            if allow:
                return None, None
            raise _bad("message to be replied not found")
        sent = self._by_id.get((chat_id, message_id))
        if sent is not None:
            return message_id, _strip_reply(sent.payload)
        user_message = self._user_messages.get((chat_id, message_id))
        if user_message is not None:
            return message_id, _strip_reply(user_message)
        stub = {"message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id)}
        return message_id, stub

    @staticmethod
    def _check_text(text: Any, parse_mode: Any) -> str:
        if not isinstance(text, str) or not text.strip():
            raise _bad("message text is empty")
        plain = _plain_text(text, parse_mode)
        if not plain.strip():
            raise _bad("message text is empty")
        if len(plain) > MAX_TEXT:
            raise _bad("message is too long")
        return plain

    @staticmethod
    def _check_caption(caption: Any, parse_mode: Any) -> str | None:
        if caption is None or caption == "":
            return None
        plain = _plain_text(str(caption), parse_mode)
        if len(plain) > MAX_CAPTION:
            raise _bad("message caption is too long")
        return plain

    def _store_file(
        self,
        data: bytes,
        kind: str,
        *,
        file_size: int | None = None,
        file_path: str | None = None,
        file_name: str | None = None,
        mime_type: str | None = None,
    ) -> StoredFile:
        self._file_seq += 1
        seq = self._file_seq
        sniffed = _sniff_image(data)
        width, height, fmt = sniffed if sniffed else (None, None, None)
        if file_path is None:
            ext = {"jpeg": "jpg"}.get(fmt or "", fmt) or (
                file_name.rsplit(".", 1)[-1] if file_name and "." in file_name else "bin"
            )
            folder = "photos" if kind == "photo" or (kind == "user" and fmt) else "documents"
            file_path = f"{folder}/file_{seq}.{ext}"
        stored = StoredFile(
            file_id=f"fake-{kind}-{seq:05d}-{self.bot_id}",
            file_unique_id=f"uniq-{seq:05d}",
            data=data,
            file_size=len(data) if file_size is None else file_size,
            file_path=file_path,
            width=width,
            height=height,
            file_name=file_name,
            mime_type=mime_type or (f"image/{fmt}" if fmt else None),
        )
        self.files[stored.file_id] = stored
        self._files_by_path[file_path] = stored
        return stored

    def _resolve_input(
        self, params: dict[str, Any], name: str, what: str
    ) -> tuple[StoredFile | None, UploadedFile | None]:
        """An InputFile parameter: an existing file (by file_id) or an uploaded part."""
        files: dict[str, UploadedFile] = params["_files"]
        value = params.get(name)
        if name in files:
            return None, files[name]
        if isinstance(value, str) and value.startswith("attach://"):
            part = files.get(value.removeprefix("attach://"))
            if part is None:
                raise _bad(f"can't find attached file {value!r}")
            return None, part
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            # Telegram would fetch the URL; this fake never connects anywhere.
            raise _bad("failed to get HTTP URL content")
        if isinstance(value, str) and value:
            stored = self.files.get(value)
            if stored is None:
                raise _bad("wrong file identifier/HTTP URL specified")
            return stored, None
        raise _bad(f"there is no {what} in the request")

    def _photo_file(self, params: dict[str, Any], name: str = "photo") -> StoredFile | bytes:
        """Validate a photo input; returns the existing file or the uploaded bytes."""
        stored, part = self._resolve_input(params, name, "photo")
        if stored is not None:
            return stored
        assert part is not None
        data = part[2]
        if len(data) > MAX_PHOTO_UPLOAD:
            raise _bad("PHOTO_INVALID_DIMENSIONS")
        sniffed = _sniff_image(data)
        if sniffed is None:
            raise _bad("IMAGE_PROCESS_FAILED")
        width, height, _ = sniffed
        if width + height > 10_000 or max(width, height) > 20 * max(1, min(width, height)):
            raise _bad("PHOTO_INVALID_DIMENSIONS")
        return data

    def _document_file(self, params: dict[str, Any], name: str = "document") -> StoredFile:
        stored, part = self._resolve_input(params, name, "document")
        if stored is not None:
            return stored
        assert part is not None
        filename, ctype, data = part
        if len(data) > MAX_FILE_UPLOAD:
            raise TelegramApiError(413, "Request Entity Too Large")
        sniffed = _sniff_image(data)
        if ctype == "application/octet-stream" and sniffed is not None:
            ctype = f"image/{sniffed[2]}"
        return self._store_file(data, "document", file_name=filename, mime_type=ctype)

    @staticmethod
    def _photo_sizes(stored: StoredFile) -> list[dict[str, Any]]:
        return [
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "width": stored.width or 0,
                "height": stored.height or 0,
                "file_size": stored.file_size,
            }
        ]

    @staticmethod
    def _document_dict(stored: StoredFile) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
        }
        if stored.file_name:
            doc["file_name"] = stored.file_name
        if stored.mime_type:
            doc["mime_type"] = stored.mime_type
        return doc

    def _add_message(
        self,
        *,
        method: str,
        chat_id: int,
        kind: str,
        params: dict[str, Any],
        reply: tuple[int | None, dict[str, Any] | None],
        text: str | None = None,
        caption: str | None = None,
        stored: StoredFile | None = None,
        media_group_id: str | None = None,
        reply_markup: Any = None,
        content: dict[str, Any] | None = None,
        has_spoiler: bool = False,
    ) -> SentMessage:
        message_id = _updates.next_message_id()
        now = time.time()
        payload: dict[str, Any] = {
            "message_id": message_id,
            "from": self._bot_user(),
            "chat": self._chat(chat_id),
            "date": int(now),
        }
        if reply[1] is not None:
            payload["reply_to_message"] = reply[1]
        if media_group_id is not None:
            payload["media_group_id"] = media_group_id
        if text is not None:
            payload["text"] = text
            if isinstance(params.get("entities"), list):
                payload["entities"] = params["entities"]
        if content:
            payload.update(content)
        if has_spoiler:
            payload["has_media_spoiler"] = True
        if caption is not None:
            payload["caption"] = caption
            if isinstance(params.get("caption_entities"), list):
                payload["caption_entities"] = params["caption_entities"]
        markup = reply_markup if isinstance(reply_markup, dict) else None
        # Only inline keyboards are part of a Message; reply keyboards live in the client.
        if markup is not None and "inline_keyboard" in markup:
            payload["reply_markup"] = markup
        sent = SentMessage(
            message_id=message_id,
            chat_id=chat_id,
            method=method,
            kind=kind,
            text=text,
            caption=caption,
            file_bytes=stored.data if stored else None,
            file_id=stored.file_id if stored else None,
            reply_to_message_id=reply[0],
            reply_markup=markup,
            media_group_id=media_group_id,
            sent_at=now,
            payload=payload,
            has_spoiler=has_spoiler,
        )
        self.chats.setdefault(chat_id, []).append(sent)
        self._by_id[(chat_id, message_id)] = sent
        self._bot_message_ids.add(message_id)
        return sent

    def _editable(self, params: dict[str, Any]) -> SentMessage | None:
        """The bot message an edit targets; None for inline messages."""
        if params.get("inline_message_id"):
            return None
        chat_id = self._chat_id(params)
        message_id = self._int_param(params, "message_id")
        sent = self._by_id.get((chat_id, message_id))
        if sent is None or sent.deleted:
            if sent is None and self._message_exists(chat_id, message_id):
                raise _bad("message can't be edited")
            raise _bad("message to edit not found")
        return sent

    @staticmethod
    def _apply_edit(sent: SentMessage, change: dict[str, Any], markup: Any) -> dict[str, Any]:
        markup = markup if isinstance(markup, dict) else None
        now = time.time()
        for key, value in change.items():
            setattr(sent, key, value)
            if value is None:
                sent.payload.pop(key, None)
            else:
                sent.payload[key] = value
        sent.reply_markup = markup
        # Editing without reply_markup removes the inline keyboard, as on Telegram.
        if markup is not None and "inline_keyboard" in markup:
            sent.payload["reply_markup"] = markup
        else:
            sent.payload.pop("reply_markup", None)
        sent.payload["edit_date"] = int(now)
        sent.edits.append({**change, "reply_markup": markup, "at": now})
        return copy.deepcopy(sent.payload)

    # -- methods -------------------------------------------------------------------------

    async def _get_me(self, params: dict[str, Any]) -> Any:
        return {
            **self._bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _get_updates_counted(self, params: dict[str, Any]) -> Any:
        """getUpdates, counting the calls in flight at once and the polls superseded."""
        self.get_updates_in_flight += 1
        self.get_updates_max_in_flight = max(
            self.get_updates_max_in_flight, self.get_updates_in_flight
        )
        try:
            return await self._get_updates(params)
        except TelegramApiError as exc:
            if exc.code == 409 and str(exc) == POLL_CONFLICT:
                self.poll_conflicts += 1
            raise
        finally:
            self.get_updates_in_flight -= 1

    async def _get_updates(self, params: dict[str, Any]) -> Any:
        if self.webhook is not None:
            raise TelegramApiError(409, WEBHOOK_CONFLICT)
        offset = params.get("offset")
        if isinstance(offset, int) and offset > 0:
            kept = []
            for update in self._pending:
                if update["update_id"] < offset:
                    self.confirmed_update_ids.add(update["update_id"])
                else:
                    kept.append(update)
            self._pending = kept
        limit = params.get("limit", 100)
        limit = min(100, max(1, limit)) if isinstance(limit, int) else 100
        timeout = params.get("timeout", 0)
        timeout = float(timeout) if isinstance(timeout, int | float) else 0.0
        if isinstance(params.get("allowed_updates"), list):
            self.allowed_updates = [str(u) for u in params["allowed_updates"]]
        self._poll_generation += 1
        generation = self._poll_generation
        self._signal()  # an older long poll still waiting is now superseded
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed
            start = offset if isinstance(offset, int) else 0
            batch = [u for u in self._pending if u["update_id"] >= start][:limit]
            if batch:
                return copy.deepcopy(batch)
            if generation != self._poll_generation:
                raise TelegramApiError(409, POLL_CONFLICT)
            remaining = deadline - time.monotonic()
            if self._closing or remaining <= 0 or self.webhook is not None:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _set_webhook(self, params: dict[str, Any]) -> Any:
        url = params.get("url") or ""
        if not isinstance(url, str):
            raise _bad("bad webhook: invalid URL")
        if not url:
            await self._delete_webhook(params)
            return True
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https"):
            raise _bad("bad webhook: unsupported URL protocol")
        if not _is_loopback(host):
            raise _bad(f"bad webhook: this fake only delivers to loopback, not {host!r}")
        secret = params.get("secret_token")
        if secret is not None and (not isinstance(secret, str) or not _SECRET_RE.match(secret)):
            raise _bad("secret token contains unallowed characters")
        max_connections = params.get("max_connections", 40)
        if not isinstance(max_connections, int) or not 1 <= max_connections <= 100:
            raise _bad("bad webhook: invalid max_connections")
        allowed = params.get("allowed_updates")
        if isinstance(allowed, list):
            self.allowed_updates = [str(u) for u in allowed]
        if params.get("drop_pending_updates") is True:
            self._drop_pending()
        await self._stop_webhook_delivery()
        self.webhook = WebhookConfig(url, secret, max_connections, self.allowed_updates)
        self._webhook_last_error = None
        self._webhook_task = asyncio.create_task(self._webhook_loop(self.webhook))
        self._signal()  # a getUpdates still waiting must give up
        return True

    async def _delete_webhook(self, params: dict[str, Any]) -> Any:
        await self._stop_webhook_delivery()
        self.webhook = None
        if params.get("drop_pending_updates") is True:
            self._drop_pending()
        return True

    async def _get_webhook_info(self, params: dict[str, Any]) -> Any:
        info: dict[str, Any] = {
            "url": self.webhook.url if self.webhook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
        }
        if self.webhook is not None:
            info["max_connections"] = self.webhook.max_connections
            if self.webhook.allowed_updates is not None:
                info["allowed_updates"] = self.webhook.allowed_updates
            if self._webhook_last_error is not None:
                info["last_error_date"], info["last_error_message"] = self._webhook_last_error
        return info

    async def _set_my_commands(self, params: dict[str, Any]) -> Any:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _bad("commands must be a list")
        for command in commands:
            if not isinstance(command, dict) or not _COMMAND_RE.match(
                str(command.get("command", ""))
            ):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")
        self.commands = commands
        return True

    async def _get_my_commands(self, params: dict[str, Any]) -> Any:
        return self.commands

    async def _delete_my_commands(self, params: dict[str, Any]) -> Any:
        self.commands = []
        return True

    async def _send_message(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        text = self._check_text(params.get("text"), params.get("parse_mode"))
        reply = self._reply_target(chat_id, params)
        sent = self._add_message(
            method="sendMessage",
            chat_id=chat_id,
            kind="text",
            params=params,
            reply=reply,
            text=text,
            reply_markup=params.get("reply_markup"),
        )
        return copy.deepcopy(sent.payload)

    async def _edit_message_text(self, params: dict[str, Any]) -> Any:
        sent = self._editable(params)
        text = self._check_text(params.get("text"), params.get("parse_mode"))
        if sent is None:
            return True
        if sent.kind != "text":
            raise _bad("there is no text in the message to edit")
        markup = params.get("reply_markup")
        if text == sent.text and markup == sent.reply_markup:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        return self._apply_edit(sent, {"text": text}, markup)

    async def _edit_message_caption(self, params: dict[str, Any]) -> Any:
        sent = self._editable(params)
        caption = self._check_caption(params.get("caption"), params.get("parse_mode"))
        if sent is None:
            return True
        if sent.kind in ("text", "copy"):
            raise _bad("there is no caption in the message to edit")
        markup = params.get("reply_markup")
        if caption == sent.caption and markup == sent.reply_markup:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        return self._apply_edit(sent, {"caption": caption}, markup)

    async def _edit_message_reply_markup(self, params: dict[str, Any]) -> Any:
        sent = self._editable(params)
        if sent is None:
            return True
        markup = params.get("reply_markup")
        if markup == sent.reply_markup:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        return self._apply_edit(sent, {}, markup)

    async def _delete_message(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        message_id = self._int_param(params, "message_id")
        if not self._message_exists(chat_id, message_id):
            raise _bad("message to delete not found")
        sent = self._by_id.get((chat_id, message_id))
        if sent is not None:
            sent.deleted = True
        else:
            self._deleted_user_messages.add((chat_id, message_id))
        return True

    async def _send_chat_action(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        action = params.get("action")
        if action not in CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        self._chat_actions.setdefault(chat_id, []).append((str(action), time.time()))
        return True

    async def _send_photo(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        caption = self._check_caption(params.get("caption"), params.get("parse_mode"))
        photo = self._photo_file(params)
        reply = self._reply_target(chat_id, params)
        stored = photo if isinstance(photo, StoredFile) else self._store_file(photo, "photo")
        sent = self._add_message(
            method="sendPhoto",
            chat_id=chat_id,
            kind="photo",
            params=params,
            reply=reply,
            caption=caption,
            stored=stored,
            reply_markup=params.get("reply_markup"),
            content={"photo": self._photo_sizes(stored)},
            has_spoiler=params.get("has_spoiler") is True,
        )
        return copy.deepcopy(sent.payload)

    async def _send_document(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        caption = self._check_caption(params.get("caption"), params.get("parse_mode"))
        stored = self._document_file(params)
        reply = self._reply_target(chat_id, params)
        sent = self._add_message(
            method="sendDocument",
            chat_id=chat_id,
            kind="document",
            params=params,
            reply=reply,
            caption=caption,
            stored=stored,
            reply_markup=params.get("reply_markup"),
            content={"document": self._document_dict(stored)},
        )
        return copy.deepcopy(sent.payload)

    async def _send_media_group(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        media = params.get("media")
        if not isinstance(media, list) or not all(isinstance(item, dict) for item in media):
            raise _bad("media must be a JSON array of InputMedia")
        if not 2 <= len(media) <= 10:
            raise _bad("wrong number of media: a media group must have 2-10 items")
        kinds = {item.get("type") for item in media}
        if not kinds <= {"photo", "document"} or kinds == {"photo", "document"}:
            raise _bad("this fake supports albums of only photos or only documents")
        # Validate every item before creating anything: a failed album sends nothing.
        items: list[tuple[str, StoredFile | bytes, str | None, bool]] = []
        for item in media:
            item_params = {**params, "media": item.get("media")}
            caption = self._check_caption(item.get("caption"), item.get("parse_mode"))
            spoiler = item.get("has_spoiler") is True
            if item["type"] == "photo":
                items.append(("photo", self._photo_file(item_params, "media"), caption, spoiler))
            else:
                file = self._document_file(item_params, "media")
                items.append(("document", file, caption, spoiler))
        reply = self._reply_target(chat_id, params)
        self._media_group_seq += 1
        group_id = f"{13_000_000_000_000_000 + self._media_group_seq}"
        results = []
        for kind, file, caption, spoiler in items:
            stored = file if isinstance(file, StoredFile) else self._store_file(file, kind)
            content = (
                {"photo": self._photo_sizes(stored)}
                if kind == "photo"
                else {"document": self._document_dict(stored)}
            )
            sent = self._add_message(
                method="sendMediaGroup",
                chat_id=chat_id,
                kind=f"media_group_{kind}",
                params={},
                reply=reply,
                caption=caption,
                stored=stored,
                media_group_id=group_id,
                content=content,
                has_spoiler=spoiler,
            )
            results.append(copy.deepcopy(sent.payload))
        return results

    async def _copy_message(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        from_chat_id = self._chat_id(params, "from_chat_id")
        message_id = self._int_param(params, "message_id")
        if not self._message_exists(from_chat_id, message_id):
            raise _bad("message to copy not found")
        source = self._by_id.get((from_chat_id, message_id))
        reply = self._reply_target(chat_id, params)
        stored: StoredFile | None = None
        content: dict[str, Any] = {}
        kind, text, caption = "copy", None, None
        if source is not None:
            kind = source.kind.removeprefix("media_group_")
            text, caption = source.text, source.caption
            stored = self.files.get(source.file_id or "")
            for key in ("photo", "document"):
                if key in source.payload:
                    content[key] = copy.deepcopy(source.payload[key])
        if "caption" in params:
            caption = self._check_caption(params.get("caption"), params.get("parse_mode"))
        sent = self._add_message(
            method="copyMessage",
            chat_id=chat_id,
            kind=kind,
            params=params,
            reply=reply,
            text=text,
            caption=caption,
            stored=stored,
            reply_markup=params.get("reply_markup"),
            content=content,
        )
        return {"message_id": sent.message_id}

    async def _get_file(self, params: dict[str, Any]) -> Any:
        file_id = params.get("file_id")
        stored = self.files.get(file_id) if isinstance(file_id, str) else None
        if stored is None:
            raise _bad("invalid file_id")
        if stored.file_size > MAX_DOWNLOAD:
            raise _bad("file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }

    async def _answer_callback_query(self, params: dict[str, Any]) -> Any:
        if not params.get("callback_query_id"):
            raise _bad("QUERY_ID_INVALID")
        record = {k: v for k, v in params.items() if k != "_files"}
        self.answered_callbacks.append({**record, "at": time.time()})
        return True

    # -- webhook delivery ----------------------------------------------------------------

    def _drop_pending(self) -> None:
        self._pending = []
        self._signal()

    async def _stop_webhook_delivery(self) -> None:
        task, self._webhook_task = self._webhook_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _webhook_loop(self, config: WebhookConfig) -> None:
        """Deliver pending updates: in order within a chat, concurrently across chats."""
        connector = aiohttp.TCPConnector(
            limit=config.max_connections, resolver=_LoopbackResolver()
        )
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        in_flight: dict[Hashable, asyncio.Task[None]] = {}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                while True:
                    changed = self._changed
                    busy: set[Hashable] = set(in_flight)
                    for update in self._pending:
                        chat = _update_chat_id(update)
                        key: Hashable = ("update", update["update_id"]) if chat is None else chat
                        if key in busy:
                            continue
                        busy.add(key)  # later updates of this chat wait for this one
                        if len(in_flight) >= config.max_connections:
                            continue
                        task = asyncio.create_task(self._deliver(session, config, update))
                        in_flight[key] = task
                        task.add_done_callback(self._delivery_done(in_flight, key))
                    await changed.wait()
            finally:
                for task in in_flight.values():
                    task.cancel()
                await asyncio.gather(*in_flight.values(), return_exceptions=True)

    def _delivery_done(
        self, in_flight: dict[Hashable, asyncio.Task[None]], key: Hashable
    ) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            in_flight.pop(key, None)
            self._signal()

        return done

    async def _deliver(
        self, session: aiohttp.ClientSession, config: WebhookConfig, update: dict[str, Any]
    ) -> None:
        update_id = update["update_id"]
        headers = {"Content-Type": "application/json"}
        if config.secret_token:
            headers["X-Telegram-Bot-Api-Secret-Token"] = config.secret_token
        data = json.dumps(update).encode()
        delay = self.webhook_retry_delay
        max_delay = max(2.0, delay)
        while any(u["update_id"] == update_id for u in self._pending):
            started = time.monotonic()
            try:
                async with session.post(
                    config.url, data=data, headers=headers, allow_redirects=False
                ) as response:
                    status, reason = response.status, response.reason or ""
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, reason = 0, str(exc) or type(exc).__name__
            self.webhook_deliveries.append((update_id, status, time.monotonic() - started))
            if 200 <= status < 300:
                self._acknowledge(update_id)
                return
            message = f"Wrong response from the webhook: {status} {reason}" if status else reason
            self._webhook_last_error = (int(time.time()), message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    def _acknowledge(self, update_id: int) -> None:
        self.webhook_acked_update_ids.add(update_id)
        self._pending = [u for u in self._pending if u["update_id"] != update_id]

    # -- payments (Telegram Stars) -------------------------------------------------------
    # sendInvoice with the XTR rules, answerPreCheckoutQuery, refundStarPayment and
    # getStarTransactions, plus test controls: `pre_checkout` (a user taps Pay: the query is
    # pushed and its answer awaited up to 10 s), `complete_payment` (Telegram charges and sends
    # successful_payment, or loses it), `pay` (both), `refund_elsewhere`.

    def _init_payments(self) -> None:
        self.invoices: list[Invoice] = []
        self.checkouts: dict[str, Checkout] = {}
        self.charges: dict[str, Charge] = {}
        self.star_transactions: list[dict[str, Any]] = []
        self.pre_checkout_timeout_s = 10.0
        self.push_refunded_payment = True  # refundStarPayment also sends refunded_payment
        self._checkout_seq = 0
        self._charge_seq = 0
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def _payment_methods(self) -> dict[str, MethodHandler]:
        return {
            "sendInvoice": self._send_invoice,
            "answerPreCheckoutQuery": self._answer_pre_checkout_query,
            "refundStarPayment": self._refund_star_payment,
            "getStarTransactions": self._get_star_transactions,
        }

    def invoices_in(self, chat_id: int) -> list[Invoice]:
        """Invoices the bot sent to `chat_id`, oldest first."""
        return [i for i in self.invoices if i.chat_id == chat_id]

    async def pre_checkout(
        self,
        invoice: Invoice,
        *,
        user_id: int | None = None,
        amount: int | None = None,
        currency: str | None = None,
        payload: str | None = None,
    ) -> Checkout:
        """A user taps Pay: push pre_checkout_query and wait for the bot's answer (up to
        `pre_checkout_timeout_s`). Overrides play a tampered client."""
        self._checkout_seq += 1
        checkout = Checkout(
            query_id=f"pcq-{self._checkout_seq}",
            user_id=invoice.chat_id if user_id is None else user_id,
            chat_id=invoice.chat_id,
            amount=invoice.amount if amount is None else amount,
            currency=invoice.currency if currency is None else currency,
            payload=invoice.payload if payload is None else payload,
        )
        self.checkouts[checkout.query_id] = checkout
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[checkout.query_id] = answer
        update = _updates.pre_checkout_query(
            query_id=checkout.query_id,
            user_id=checkout.user_id,
            currency=checkout.currency,
            total_amount=checkout.amount,
            invoice_payload=checkout.payload,
        )
        checkout.update_id = update["update_id"]
        self.push_update(update)
        if checkout.update_id in self.filtered_update_ids:
            checkout.outcome = "filtered"
            return checkout
        try:
            params = await asyncio.wait_for(asyncio.shield(answer), self.pre_checkout_timeout_s)
        except TimeoutError:
            checkout.outcome = "timeout"  # Telegram cancels the payment; a late answer is a 400
            return checkout
        finally:
            self._answers.pop(checkout.query_id, None)
        checkout.outcome = "approved" if params.get("ok") is True else "refused"
        checkout.error_message = params.get("error_message")
        return checkout

    def complete_payment(
        self, checkout: Checkout, *, deliver: bool = True, update_id: int | None = None
    ) -> Charge:
        """Telegram charges an approved checkout: a new charge id, a StarTransaction, and
        (with `deliver`) a successful_payment message; without it the update is lost."""
        assert checkout.outcome == "approved", f"the checkout was {checkout.outcome}"
        self._charge_seq += 1
        charge = Charge(
            charge_id=f"stxCHARGE{self._charge_seq:05d}",
            user_id=checkout.user_id,
            chat_id=checkout.chat_id,
            amount=checkout.amount,
            payload=checkout.payload,
        )
        self.charges[charge.charge_id] = charge
        self.star_transactions.append(
            {
                "id": charge.charge_id,
                "amount": charge.amount,
                "date": int(time.time()),
                "source": self._star_partner(charge),
            }
        )
        charge.update = _updates.successful_payment(
            charge_id=charge.charge_id,
            total_amount=charge.amount,
            invoice_payload=charge.payload,
            user_id=charge.user_id,
            chat_id=charge.chat_id,
            update_id=update_id,
        )
        if deliver:
            self.push_update(charge.update)
        return charge

    async def pay(self, invoice: Invoice, **overrides: Any) -> tuple[Checkout, Charge | None]:
        """pre_checkout, then (if approved) complete_payment with delivery."""
        checkout = await self.pre_checkout(invoice, **overrides)
        if checkout.outcome != "approved":
            return checkout, None
        return checkout, self.complete_payment(checkout)

    def refund_elsewhere(self, charge_id: str) -> None:
        """A refund the bot did not ask for (support, a dispute): only the list shows it."""
        self._refund(self.charges[charge_id], push=False)

    def _star_partner(self, charge: Charge) -> dict[str, Any]:
        return {
            "type": "user",
            "transaction_type": "invoice_payment",
            "user": _updates.user(charge.user_id),
            "invoice_payload": charge.payload,
        }

    def _refund(self, charge: Charge, *, push: bool) -> None:
        charge.refunded = True
        self.star_transactions.append(
            {
                "id": charge.charge_id,
                "amount": charge.amount,
                "date": int(time.time()),
                "receiver": self._star_partner(charge),
            }
        )
        if push:
            self.push_update(
                _updates.refunded_payment(
                    charge_id=charge.charge_id,
                    total_amount=charge.amount,
                    invoice_payload=charge.payload,
                    user_id=charge.user_id,
                    chat_id=charge.chat_id,
                )
            )

    async def _send_invoice(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        title, description = params.get("title"), params.get("description")
        payload, currency = params.get("payload"), params.get("currency")
        if not isinstance(title, str) or not 1 <= len(title) <= 32:
            raise _bad("INVOICE_TITLE_INVALID")
        if not isinstance(description, str) or not 1 <= len(description) <= 255:
            raise _bad("INVOICE_DESCRIPTION_INVALID")
        if not isinstance(payload, str) or not 1 <= len(payload.encode()) <= 128:
            raise _bad("INVOICE_PAYLOAD_INVALID")
        if currency != "XTR":
            raise _bad("PAYMENT_PROVIDER_INVALID")  # this fake sells only for Stars
        if params.get("provider_token") not in (None, ""):
            raise _bad("PAYMENT_PROVIDER_INVALID")
        if "max_tip_amount" in params or "suggested_tip_amounts" in params:
            raise _bad("STARS_INVOICE_INVALID")
        prices = params.get("prices")
        if not isinstance(prices, list) or len(prices) != 1 or not isinstance(prices[0], dict):
            raise _bad("STARS_INVOICE_INVALID")
        amount = prices[0].get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise _bad("STARS_INVOICE_INVALID")
        reply = self._reply_target(chat_id, params)
        invoice_json = {
            "title": title,
            "description": description,
            "start_parameter": params.get("start_parameter") or "",
            "currency": currency,
            "total_amount": amount,
        }
        sent = self._add_message(
            method="sendInvoice",
            chat_id=chat_id,
            kind="invoice",
            params=params,
            reply=reply,
            reply_markup=params.get("reply_markup"),
            content={"invoice": invoice_json},
        )
        self.invoices.append(
            Invoice(
                message_id=sent.message_id,
                chat_id=chat_id,
                title=title,
                description=description,
                payload=payload,
                currency=currency,
                amount=amount,
                params={k: v for k, v in params.items() if k != "_files"},
            )
        )
        return copy.deepcopy(sent.payload)

    async def _answer_pre_checkout_query(self, params: dict[str, Any]) -> Any:
        query_id = str(params.get("pre_checkout_query_id") or "")
        checkout = self.checkouts.get(query_id)
        if checkout is None:
            raise _bad("QUERY_ID_INVALID")
        ok = params.get("ok")
        if not isinstance(ok, bool):
            raise _bad("ok must be a Boolean")
        if not ok and not params.get("error_message"):
            raise _bad("ERROR_MESSAGE_EMPTY")
        answer = self._answers.get(query_id)
        if checkout.answers or answer is None or answer.done():
            checkout.answers += 1
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        checkout.answers += 1
        answer.set_result({k: v for k, v in params.items() if k != "_files"})
        return True

    async def _refund_star_payment(self, params: dict[str, Any]) -> Any:
        charge_id = str(params.get("telegram_payment_charge_id") or "")
        if not charge_id:
            raise _bad("CHARGE_ID_EMPTY")
        charge = self.charges.get(charge_id)
        if charge is None:
            raise _bad("CHARGE_NOT_FOUND")
        if params.get("user_id") != charge.user_id:
            raise _bad("USER_ID_INVALID")
        if charge.refunded:
            raise _bad("CHARGE_ALREADY_REFUNDED")
        self._refund(charge, push=self.push_refunded_payment)
        return True

    async def _get_star_transactions(self, params: dict[str, Any]) -> Any:
        offset = params.get("offset", 0)
        limit = params.get("limit", 100)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise _bad("offset must be a non-negative Integer")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise _bad("limit must be between 1 and 100")
        return {"transactions": copy.deepcopy(self.star_transactions[offset : offset + limit])}

    # -- command menus with scopes (setMyCommands / getMyCommands / deleteMyCommands) -------
    # Menus are kept per (scope, language_code) in `command_menus`; `commands` stays the
    # default scope's list for every language (what earlier tests read). `menu(scope, lang)`
    # reads one; `menu_for(chat_id, lang)` resolves what a private chat's "/" shows, in
    # Telegram's order (the chat, all private chats, the default; with the language first).

    _SCOPE_TYPES = frozenset(
        {
            "default",
            "all_private_chats",
            "all_group_chats",
            "all_chat_administrators",
            "chat",
            "chat_administrators",
            "chat_member",
        }
    )

    def _init_command_menus(self) -> None:
        self.command_menus: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def _command_menu_methods(self) -> dict[str, MethodHandler]:
        return {
            "setMyCommands": self._set_scoped_commands,
            "getMyCommands": self._get_scoped_commands,
            "deleteMyCommands": self._delete_scoped_commands,
        }

    def menu(self, scope: str = "default", language: str = "") -> list[str]:
        """The command names of one scope's menu ("default", "chat:<id>", ...)."""
        return [c["command"] for c in self.command_menus.get((scope, language), [])]

    def menu_for(self, chat_id: int, language: str = "") -> list[str]:
        """What the "/" menu shows in a private chat, resolved the way Telegram does."""
        for scope in (f"chat:{chat_id}", "all_private_chats", "default"):
            for lang in (language, "") if language else ("",):
                if (scope, lang) in self.command_menus:
                    return self.menu(scope, lang)
        return []

    def _menu_key(self, params: dict[str, Any]) -> tuple[str, str]:
        language = str(params.get("language_code") or "")
        if language and not re.fullmatch(r"[a-z]{2}", language):
            raise _bad("LANG_CODE_INVALID")
        scope = params.get("scope")
        if scope is None:
            return "default", language
        if not isinstance(scope, dict) or scope.get("type") not in self._SCOPE_TYPES:
            raise _bad("BOT_COMMAND_SCOPE_INVALID")
        kind = str(scope["type"])
        if kind in ("chat", "chat_administrators", "chat_member"):
            if not isinstance(scope.get("chat_id"), int):
                raise _bad("chat not found")
            member = f":{scope.get('user_id')}" if kind == "chat_member" else ""
            return f"{kind}:{scope['chat_id']}{member}", language
        return kind, language

    async def _set_scoped_commands(self, params: dict[str, Any]) -> Any:
        key = self._menu_key(params)
        before = self.commands
        await self._set_my_commands(params)  # the list's own checks; it sets `commands`
        if key != ("default", ""):
            self.commands = before
        if params["commands"]:
            self.command_menus[key] = params["commands"]
        else:
            self.command_menus.pop(key, None)
        return True

    async def _get_scoped_commands(self, params: dict[str, Any]) -> Any:
        return self.command_menus.get(self._menu_key(params), [])

    async def _delete_scoped_commands(self, params: dict[str, Any]) -> Any:
        key = self._menu_key(params)
        self.command_menus.pop(key, None)
        if key == ("default", ""):
            self.commands = []
        return True


async def _serve(host: str, port: int, token: str) -> None:
    fake = FakeTelegram(token=token)
    fake.host = host

    async def start() -> str:
        await fake.start(port)
        return fake.url

    await serve_until_signalled(start, fake.stop)


def main(argv: list[str] | None = None) -> None:
    """Serve a FakeTelegram until killed; print its URL once listening."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    args = parser.parse_args(argv)
    if not _is_loopback(args.host) or args.host == "localhost":
        parser.error("--host must be a loopback IP address")
    asyncio.run(_serve(args.host, args.port, args.token))


if __name__ == "__main__":
    main()

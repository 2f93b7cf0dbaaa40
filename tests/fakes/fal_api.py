"""Fake fal.ai queue API: submit, status, result, cancel, inverted-colour outputs, uploads."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

import aiohttp
from aiohttp import web
from PIL import Image
from yarl import URL

from imagebot.config import is_loopback_host
from tests.fakes.base import Call, serve_until_signalled
from tests.fakes.files import FileHost
from tests.fakes.images import image_size, inverted, make_image

POLICY_ERROR = "The model refused this request (content policy)"
CANCELLED = "Request was cancelled"
# Pillow format -> (file extension, content type)
FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
BEHAVIOUR_KEYS = frozenset(
    {
        "latency_s",
        "queue_s",
        "outcome",
        "error_text",
        "error_type",
        "image_size",
        "image_format",
        "output_url_base",
        "withheld",  # images the safety checker drops from the result (fewer than asked)
        # the submit is refused at once: HTTP 422, detail[].type content_policy_violation
        "refuse_submit",
    }
)
MAX_FETCH_BYTES = 32 * 1024 * 1024


def iso(ts: float) -> str:
    """ISO 8601 UTC timestamp."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def validation_error(loc: list[str | int], msg: str, type_: str) -> web.Response:
    """fal's 422 body: a list of pydantic-style error entries under `detail`."""
    return web.json_response({"detail": [{"loc": loc, "msg": msg, "type": type_}]}, status=422)


def decode_data_uri(uri: str) -> bytes | None:
    """The bytes of a `data:` URI, or None when it is malformed."""
    header, sep, payload = uri.removeprefix("data:").partition(",")
    if not sep:
        return None
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
    return unquote_to_bytes(payload)


def is_image(data: bytes) -> bool:
    """Whether Pillow recognises the bytes as a complete image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception:  # Pillow raises many types (and warnings-as-errors) for junk
        return False
    else:
        return True


@dataclass
class FakeFalRequest:
    """One queued request the fake holds; its status is computed from the wall clock."""

    id: str
    app_id: str
    path: str
    input: dict[str, Any]
    received_images: list[bytes]
    created: float
    queue_s: float
    latency_s: float
    outcome: str
    error_text: str
    error_type: str
    images: list[dict[str, Any]]
    files: list[str]
    urls: dict[str, str]
    webhook_url: str | None = None
    # when COMPLETED is (or was) reached; a cancel moves it to the cancel time
    completed_at_ts: float = 0.0
    canceled: bool = False
    canceled_at: float | None = None
    polls: int = 0

    def __post_init__(self) -> None:
        if not self.completed_at_ts:
            self.completed_at_ts = self.created + self.latency_s

    def status_at(self, now: float) -> str:
        """IN_QUEUE, IN_PROGRESS or COMPLETED at wall-clock time `now`."""
        if self.canceled or now >= self.completed_at_ts:
            return "COMPLETED"
        if now < self.created + self.queue_s:
            return "IN_QUEUE"
        return "IN_PROGRESS"

    @property
    def status(self) -> str:
        return self.status_at(time.time())

    @property
    def result(self) -> str | None:
        """succeeded, failed or canceled once completed; None before."""
        if self.canceled:
            return "canceled"
        return self.outcome if self.status == "COMPLETED" else None


class FakeFal(FileHost):
    """fal's queue API on 127.0.0.1, scripted by attributes and `next_behaviours`."""

    def __init__(self, key: str = "fal_key_id:fal_key_secret", host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.key = key
        self.latency_s = 0.2
        self.queue_s = 0.05
        self.outcome = "succeeded"
        self.error_text = POLICY_ERROR
        self.error_type = "content_policy_violation"
        self.image_size: tuple[int, int] = (64, 64)
        self.image_format = "PNG"
        self.output_url_base: str | None = None
        self.withheld = 0
        self.refuse_submit = False
        self.next_behaviours: list[dict[str, Any]] = []
        self.requests: dict[str, FakeFalRequest] = {}
        self.refused_fetches: list[str] = []
        self._cdn_tokens: set[str] = set()
        # answers given AFTER a submit queued its request: (status, name the request id)
        self._lost_answers: list[tuple[int, bool]] = []
        r = self.app.router
        r.add_post("/storage/auth/token", self._storage_token)
        r.add_post("/files/upload", self._upload)
        r.add_get("/{owner}/{app}/requests/{id}/status", self._status)
        r.add_get("/{owner}/{app}/requests/{id}", self._result)
        r.add_put("/{owner}/{app}/requests/{id}/cancel", self._cancel)
        r.add_post("/{owner}/{app}", self._submit)
        r.add_post("/{owner}/{app}/{subpath:.+}", self._submit)
        r.add_route("*", "/{tail:.*}", self._unknown)

    # -- read back -------------------------------------------------------------------------

    @property
    def submits(self) -> list[Call]:
        """Every submit request, including refused and faulted ones."""
        return self.calls_of("submit")

    @property
    def cancels(self) -> list[Call]:
        return self.calls_of("cancel")

    @property
    def last_request(self) -> FakeFalRequest:
        return list(self.requests.values())[-1]

    def output_bytes(self, request_id: str) -> list[bytes]:
        """The image bytes behind a request's outputs (read directly, not counted)."""
        return [self.files[name].data for name in self.requests[request_id].files]

    def everything_received(self) -> bytes:
        """Every request line, header and body the fake received, concatenated."""
        parts: list[bytes] = []
        for call in self.calls:
            head = f"{call.method} {call.path}\n" + "".join(
                f"{name}: {value}\n" for name, value in call.headers.items()
            )
            parts += [head.encode("utf-8", "surrogateescape"), call.body, b"\n"]
        return b"".join(parts)

    def fail_after_submit(self, status: int, *, name_request: bool = True, times: int = 1) -> None:
        """The next `times` submits queue their request and then answer `status`; with
        `name_request` the answer carries the request's `x-fal-request-id` header, as fal's
        answers do once a request reached its queue."""
        self._lost_answers.extend([(status, name_request)] * times)

    # -- handlers --------------------------------------------------------------------------

    async def _read(self, op: str, request: web.Request) -> Any:
        body = await request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        call = self.record(op, request, body)
        # the JSON body becomes the call's params; set directly so keys can't clash with record()
        call.params = dict(data) if isinstance(data, dict) else {}
        return data

    async def _guard(self, op: str, request: web.Request) -> web.Response | None:
        """Delay, `Key` auth and scripted faults shared by the queue operations."""
        await self.apply_delay(op)
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, f"Key {self.key}".encode()):
            return web.json_response({"detail": "Unauthorized"}, status=401)
        fault = self.take_fault(op)
        return self.fault_response(fault) if fault else None

    def _lookup(self, request: web.Request) -> FakeFalRequest | None:
        found = self.requests.get(request.match_info["id"])
        app_id = f"{request.match_info['owner']}/{request.match_info['app']}"
        return found if found is not None and found.app_id == app_id else None

    async def _submit(self, request: web.Request) -> web.Response:
        data = await self._read("submit", request)
        if (refused := await self._guard("submit", request)) is not None:
            return refused
        if not isinstance(data, dict):
            return validation_error(["body"], "Input should be a valid dictionary", "dict_type")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return validation_error(["body", "prompt"], "Field required", "missing")
        urls = data.get("image_urls")
        if urls is None and request.path.endswith("/edit"):
            return validation_error(["body", "image_urls"], "Field required", "missing")
        if urls is not None and (
            not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls)
        ):
            return validation_error(
                ["body", "image_urls"], "Input should be a list of URLs", "list_type"
            )
        count = data.get("num_images", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 4:
            return validation_error(
                ["body", "num_images"], "Input should be between 1 and 4", "value_error"
            )
        received: list[bytes] = []
        for i, url in enumerate(urls or []):
            image = await self._load_image(url)
            if image is None:
                return validation_error(
                    ["body", "image_urls", i], "Could not load image", "image_load_error"
                )
            received.append(image)
        try:
            behaviour = self._take_behaviour()
        except ValueError as exc:
            return web.json_response({"detail": f"fake misconfigured: {exc}"}, status=500)
        if behaviour["refuse_submit"]:
            return validation_error(["body", "prompt"], POLICY_ERROR, "content_policy_violation")
        count = max(1, count - max(0, int(behaviour["withheld"])))
        owner, app = request.match_info["owner"], request.match_info["app"]
        job = self._new_request(f"{owner}/{app}", request, data, received, count, behaviour)
        if job.webhook_url:
            self.call_back_when(
                job.webhook_url, lambda: job.completed_at_ts, lambda: _webhook_body(job)
            )
        if self._lost_answers:
            status, name_request = self._lost_answers.pop(0)
            headers = {"x-fal-request-id": job.id} if name_request else {}
            return web.json_response(
                {"detail": "upstream trouble"}, status=status, headers=headers
            )
        return web.json_response(
            {
                "request_id": job.id,
                "response_url": job.urls["response"],
                "status_url": job.urls["status"],
                "cancel_url": job.urls["cancel"],
                "queue_position": 0,
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        await self._read("status", request)
        if (refused := await self._guard("status", request)) is not None:
            return refused
        job = self._lookup(request)
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        job.polls += 1
        now = time.time()
        status = job.status_at(now)
        body: dict[str, Any] = {
            "status": status,
            "request_id": job.id,
            "response_url": job.urls["response"],
        }
        if status == "IN_QUEUE":
            body["queue_position"] = sum(
                1
                for other in self.requests.values()
                if other.created < job.created and other.status_at(now) == "IN_QUEUE"
            )
            return web.json_response(body)
        body["logs"] = []
        if request.query.get("logs", "").lower() in {"1", "true"}:
            log = {"message": "Editing image", "level": "INFO", "source": "user"}
            body["logs"] = [{**log, "timestamp": iso(now)}]
        if status == "COMPLETED":
            started = job.created + job.queue_s
            body["metrics"] = {"inference_time": round(max(0.0, job.completed_at_ts - started), 3)}
            if job.result == "canceled":
                body["error"], body["error_type"] = CANCELLED, "request_cancelled"
            elif job.result == "failed":
                body["error"], body["error_type"] = job.error_text, job.error_type
        return web.json_response(body)

    async def _result(self, request: web.Request) -> web.Response:
        await self._read("result", request)
        if (refused := await self._guard("result", request)) is not None:
            return refused
        job = self._lookup(request)
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if job.result is None:
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        if job.result == "canceled":
            return web.json_response({"detail": CANCELLED}, status=400)
        if job.result == "failed":
            return validation_error(["body", "prompt"], job.error_text, job.error_type)
        return web.json_response({"images": job.images, "description": ""})

    async def _cancel(self, request: web.Request) -> web.Response:
        await self._read("cancel", request)
        if (refused := await self._guard("cancel", request)) is not None:
            return refused
        job = self._lookup(request)
        if job is None:
            return web.json_response({"status": "NOT_FOUND"}, status=404)
        if job.status == "COMPLETED":
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job.canceled = True
        job.canceled_at = job.completed_at_ts = time.time()
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    async def _storage_token(self, request: web.Request) -> web.Response:
        await self._read("storage_token", request)
        if (refused := await self._guard("storage_token", request)) is not None:
            return refused
        token = secrets.token_urlsafe(16)
        self._cdn_tokens.add(token)
        return web.json_response(
            {
                "token": token,
                "token_type": "Bearer",
                "base_url": self.url,
                "expires_at": iso(time.time() + 3600),
            }
        )

    async def _upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.record("upload", request, body)
        await self.apply_delay("upload")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self._cdn_tokens:
            return web.json_response({"detail": "Unauthorized"}, status=401)
        if fault := self.take_fault("upload"):
            return self.fault_response(fault)
        suffix = request.headers.get("X-Fal-File-Name", "upload.bin").rpartition(".")[2]
        name = f"{uuid.uuid4().hex}.{suffix or 'bin'}"
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        return web.json_response({"access_url": self.store_file(name, body, content_type, None)})

    async def _unknown(self, request: web.Request) -> web.Response:
        self.record("unknown", request, await request.read())
        return web.json_response({"detail": "Not Found"}, status=404)

    # -- internals -------------------------------------------------------------------------

    async def _load_image(self, url: str) -> bytes | None:
        """Bytes of one `image_urls` entry if it is a real image; None otherwise."""
        if url.startswith("data:"):
            data = decode_data_uri(url)
        elif url.startswith(("http://", "https://")):
            data = await self._fetch_loopback(url)
        else:
            data = None
        return data if data is not None and is_image(data) else None

    async def _fetch_loopback(self, url: str) -> bytes | None:
        """GET a loopback URL; any other host is refused without connecting."""
        try:
            target = URL(url)
        except ValueError:
            return None
        if not is_loopback_host(target.host or ""):
            self.refused_fetches.append(url)
            return None
        if target.host == "localhost":
            # pin the address so name resolution can't send us anywhere else
            target = target.with_host("127.0.0.1")
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            # trust_env=False ignores proxy variables; no redirects, which could leave loopback
            async with (
                aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
                session.get(target, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    return None
                data = await resp.content.read(MAX_FETCH_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError):
            return None
        return data if len(data) <= MAX_FETCH_BYTES else None

    def _take_behaviour(self) -> dict[str, Any]:
        """The behaviour for one submit: the attributes, overridden by `next_behaviours[0]`."""
        behaviour = {key: getattr(self, key) for key in BEHAVIOUR_KEYS}
        if self.next_behaviours:
            override = self.next_behaviours.pop(0)
            unknown = set(override) - BEHAVIOUR_KEYS
            if unknown:
                raise ValueError(f"unknown behaviour keys: {sorted(unknown)}")
            behaviour.update(override)
        if behaviour["outcome"] not in {"succeeded", "failed"}:
            raise ValueError("outcome must be 'succeeded' or 'failed'")
        if str(behaviour["image_format"]).upper() not in FORMATS:
            raise ValueError(f"image_format must be one of {sorted(FORMATS)}")
        return behaviour

    def _new_request(
        self,
        app_id: str,
        request: web.Request,
        data: dict[str, Any],
        received: list[bytes],
        count: int,
        behaviour: dict[str, Any],
    ) -> FakeFalRequest:
        rid = str(uuid.uuid4())
        fmt = str(behaviour["image_format"]).upper()
        ext, content_type = FORMATS[fmt]
        if received:
            output = inverted(received[0], fmt=fmt)
        else:
            width, height = behaviour["image_size"]
            output = make_image(width, height, (40, 120, 200), fmt=fmt)
        width, height = image_size(output)
        base = behaviour["output_url_base"]
        names, images = [], []
        for i in range(count):
            name = f"{rid}_{i}.{ext}"
            names.append(name)
            url = self.store_file(name, output, content_type, base)
            images.append(
                {
                    "url": url,
                    "content_type": content_type,
                    "file_name": name,
                    "file_size": len(output),
                    "width": width,
                    "height": height,
                }
            )
        api = f"{self.url}/{app_id}/requests/{rid}"
        job = FakeFalRequest(
            id=rid,
            app_id=app_id,
            path=request.path,
            input=data,
            received_images=received,
            created=time.time(),
            queue_s=float(behaviour["queue_s"]),
            latency_s=float(behaviour["latency_s"]),
            outcome=behaviour["outcome"],
            error_text=behaviour["error_text"],
            error_type=behaviour["error_type"],
            images=images,
            files=names,
            urls={"response": api, "status": f"{api}/status", "cancel": f"{api}/cancel"},
            webhook_url=request.query.get("fal_webhook"),
        )
        self.requests[rid] = job
        return job


def _webhook_body(job: FakeFalRequest) -> dict[str, Any]:
    """What fal POSTs to a request's fal_webhook once it completes."""
    ok = job.result == "succeeded"
    return {
        "request_id": job.id,
        "gateway_request_id": job.id,
        "status": "OK" if ok else "ERROR",
        "payload": {"images": job.images, "description": ""} if ok else None,
        "error": None if ok else job.error_text,
    }


async def _serve(port: int, latency_s: float | None, key: str) -> None:
    fake = FakeFal(key=key)
    if latency_s is not None:
        fake.latency_s = latency_s

    async def start() -> str:
        await fake.start(port)
        return fake.url

    await serve_until_signalled(start, fake.stop)


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone until killed: `python -m tests.fakes.fal_api --port 0`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick")
    parser.add_argument("--latency", type=float, default=None, help="seconds per request")
    parser.add_argument("--key", default="fal_key_id:fal_key_secret")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.latency, args.key))


if __name__ == "__main__":
    main()

"""Photo + instruction → edited image through fal.ai's queue protocol, with a small httpx client.

Why not `fal-client` (1.0.3): it has no base-URL setting (hosts are fixed at import time and
always https), it retries a submit up to ten times on its own (each a paid request), and it
sends `Authorization: Key …` to whatever status/result URLs a response names. The queue
protocol is four documented calls, so this module speaks it directly: every URL is built from
`fal.base_url` and the request id (never taken from a response), a submit is never resent by
the client (the worker resends one only when fal's answer shows nothing was queued, see
`_find_created`), and the key only ever goes to the configured host. The input photo travels
as a data URI of bytes we downloaded ourselves: a Telegram file URL (it carries the bot token)
is never sent.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from imagebot.config import FalSettings
from imagebot.errors import ProviderError, ProviderRejected
from imagebot.logs import get_logger
from imagebot.models import ImageFile, PollResult, PollState, ProviderRequest
from imagebot.providers.base import (
    RequestRate,
    error_for_status,
    is_safety_refusal,
    lost_create,
    map_transport_errors,
    retry_after_seconds,
)

log = get_logger(__name__)
NAME = "fal"
# fal's request ids are UUIDs; anything else would be pasted into our request paths.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    detail: Any = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": "...", "type": "..."}]
        parts = [f"{d.get('type', '')}: {d.get('msg', '')}" for d in detail if isinstance(d, dict)]
        return "; ".join(parts) or str(detail)
    return str(detail)


def _is_policy_violation(resp: httpx.Response) -> bool:
    """fal's 422 naming `content_policy_violation` in `detail[].type`: its safety checker
    refused the prompt or the photo (a refusal of this request, never a fault)."""
    if resp.status_code != 422:
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    detail = body.get("detail") if isinstance(body, dict) else None
    return isinstance(detail, list) and any(
        isinstance(d, dict) and d.get("type") == "content_policy_violation" for d in detail
    )


def _body_request_id(resp: httpx.Response) -> str | None:
    """A `request_id` in an error answer's body, if it carries one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else None


class FalProvider:
    """nano-banana/edit (or any image-in, images-out app) on fal's queue."""

    name = NAME

    def __init__(
        self,
        settings: FalSettings,
        key: str,
        fetch_image: Callable[[str], Awaitable[ImageFile]],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.poll_interval_s = settings.poll_interval_s
        self._fetch_image = fetch_image
        self._rate = RequestRate(NAME, settings.max_requests_per_s)
        owner, name, *_ = settings.edit_app.split("/")
        self._submit_path = f"/{settings.edit_app}"
        # Status, result and cancel live under owner/app, without the subpath ("/edit").
        self._requests_path = f"/{owner}/{name}/requests"
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"),
            headers={"Authorization": f"Key {key}", "User-Agent": "imagebot"},
            timeout=httpx.Timeout(settings.request_timeout_s, connect=10.0),
            follow_redirects=False,
            transport=transport,
            trust_env=False,
        )

    async def _send(
        self, method: str, path: str, *, submit: bool, **kwargs: Any
    ) -> httpx.Response:
        async with self._rate.limiter:
            with map_transport_errors(NAME, submit=submit):
                return await self._http.request(method, path, **kwargs)

    @staticmethod
    def _json(resp: httpx.Response, *, submit: bool) -> Any:
        if _is_policy_violation(resp):
            raise ProviderRejected(NAME, _detail(resp), code="safety", status=422)
        if resp.status_code >= 400:
            raise error_for_status(
                NAME,
                resp.status_code,
                _detail(resp),
                submit=submit,
                retry_after_s=retry_after_seconds(resp.headers),
            )
        if resp.status_code >= 300:
            raise ProviderError(
                NAME, f"unexpected redirect {resp.status_code}", code="bad_response"
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise ProviderError(NAME, "answer is not JSON", code="bad_response") from exc

    async def _call(self, method: str, path: str, *, submit: bool, **kwargs: Any) -> Any:
        return self._json(await self._send(method, path, submit=submit, **kwargs), submit=submit)

    async def submit(self, request: ProviderRequest) -> str:
        if request.image is None or not request.image_mime:
            raise ProviderError(NAME, "an edit needs an input image", code="invalid_input")
        payload = {
            **request.params,
            "prompt": request.prompt,
            # an album edit sends every photo, in the order the user sent them
            "image_urls": [
                data_uri(request.image, request.image_mime),
                *(data_uri(data, mime) for data, mime in request.more_images),
            ],
        }
        params = {"fal_webhook": request.notify_url} if request.notify_url else None
        resp = await self._send(
            "POST", self._submit_path, submit=True, json=payload, params=params
        )
        if resp.status_code >= 500 and (adopted := await self._find_created(resp)) is not None:
            return adopted
        body = self._json(resp, submit=True)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise ProviderError(
                NAME, "submit answer has no usable request_id", code="bad_response"
            )
        return request_id

    async def _find_created(self, resp: httpx.Response) -> str | None:
        """A 5xx to a submit: None if nothing was queued (the answer then maps to a retryable
        error), the request id if it was queued after all (adopt it), SubmitOutcomeUnknown if
        that cannot be told.

        fal's rule, refining providers.base: every request that reaches fal's queue gets an id,
        sent back in the `x-fal-request-id` header (or a `request_id` in the body), and that
        id can be looked up. So a 5xx naming an id is looked up (status 200: adopt it; 404: it
        was not queued). A 502/503/504 naming none came from the ingress in front of the queue
        (fal's own client resends exactly those); other 5xx naming none may have been queued
        with no way to find them, so they are never resent.
        """
        named = resp.headers.get("x-fal-request-id") or _body_request_id(resp)
        status = resp.status_code
        if not named:
            if status in (502, 503, 504):
                return None
            raise lost_create(NAME, status, "fal named no request to look up")
        if not _REQUEST_ID.fullmatch(named):
            raise lost_create(NAME, status, "fal named an unusable request id")
        path = f"{self._requests_path}/{named}/status"
        try:
            found = await self._send("GET", path, submit=False, params={"logs": "0"})
        except ProviderError as exc:
            raise lost_create(NAME, status, f"the lookup failed ({exc.code})") from exc
        adopted = named if found.status_code == 200 else None
        log.warning("provider_create_looked_up", status=status, adopted=adopted)
        if found.status_code not in (200, 404):
            raise lost_create(NAME, status, f"the lookup failed (HTTP {found.status_code})")
        return adopted

    async def poll(self, request_id: str) -> PollResult:
        base = f"{self._requests_path}/{request_id}"
        status = await self._call("GET", f"{base}/status", submit=False, params={"logs": "0"})
        state = str(status.get("status", "")) if isinstance(status, dict) else ""
        if state == "IN_QUEUE":
            position = status.get("queue_position")
            return PollResult(
                PollState.PENDING, queue_position=int(position) if position is not None else None
            )
        if state == "IN_PROGRESS":
            return PollResult(PollState.PENDING)
        if state in ("CANCELED", "CANCELLED"):  # not in fal's docs; some schemas have it
            return PollResult(PollState.CANCELED, error=str(status.get("error") or state))
        if state in ("FAILED", "ERROR"):
            error = str(status.get("error") or state)
            code = "safety" if is_safety_refusal(error) else "model_error"
            return PollResult(PollState.FAILED, error=error, error_code=code)
        if state != "COMPLETED":
            return PollResult(
                PollState.FAILED, error=f"status {state!r}", error_code="bad_response"
            )
        if status.get("error"):
            error = str(status["error"])
            if "cancel" in error.lower():
                return PollResult(PollState.CANCELED, error=error)
            kind = str(status.get("error_type") or "")
            code = "safety" if is_safety_refusal(f"{kind} {error}") else "model_error"
            return PollResult(PollState.FAILED, error=error, error_code=code)
        return await self._result(base)

    async def _result(self, base: str) -> PollResult:
        """The output of a COMPLETED request, decided here once from fal's answer.

        Worth asking again (429, 5xx, no connection) or the account's fault (401/402/403): the
        ProviderError every call maps to. Any other refusal (fal answers 422 for a model that
        failed on the input, 404 for a result it lost) or an unreadable answer: the job failed
        at the model, `safety` when the answer names a safety filter.
        """
        resp = await self._send("GET", base, submit=False)
        status = resp.status_code
        if status == 429 or status >= 500 or status in (401, 402, 403):
            raise error_for_status(
                NAME,
                status,
                _detail(resp),
                submit=False,
                retry_after_s=retry_after_seconds(resp.headers),
            )
        if status >= 300:
            error = _detail(resp) if status >= 400 else f"unexpected redirect {status}"
            code = "safety" if status >= 400 and is_safety_refusal(error) else "model_error"
            return PollResult(PollState.FAILED, error=error, error_code=code)
        try:
            result = resp.json()
        except ValueError:
            return PollResult(
                PollState.FAILED, error="answer is not JSON", error_code="model_error"
            )
        images = result.get("images") if isinstance(result, dict) else None
        urls = tuple(str(i["url"]) for i in images or [] if isinstance(i, dict) and i.get("url"))
        if not urls:
            return PollResult(
                PollState.FAILED, error="no images in result", error_code="no_output"
            )
        return PollResult(PollState.SUCCEEDED, output_urls=urls)

    async def cancel(self, request_id: str) -> None:
        await self._call("PUT", f"{self._requests_path}/{request_id}/cancel", submit=False)

    async def fetch_output(self, url: str) -> ImageFile:
        return await self._fetch_image(url)

    async def aclose(self) -> None:
        await self._http.aclose()

    def share_rate(self, processes: int) -> None:
        self._rate.share(processes)

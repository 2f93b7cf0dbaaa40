"""Text → image through Replicate with the official client: create, then poll by prediction id.

The client is pointed at `replicate.base_url`. Its built-in transport retries GETs up to ten
times and sleeps any Retry-After it is given, which would hide retries from the job's attempt
count and from our deadline; `_Client` swaps in a plain httpx client so every retry decision is
the worker's. Outputs are downloaded by the SSRF-guarded fetcher, never through the client
(which would send the API token to the output host).
"""

from __future__ import annotations

import base64
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from replicate.client import Client
from replicate.exceptions import ReplicateError

from imagebot.config import ReplicateSettings
from imagebot.errors import ProviderError
from imagebot.logs import get_logger
from imagebot.models import ImageFile, JobKind, PollResult, PollState, ProviderRequest
from imagebot.providers.base import (
    RequestRate,
    create_may_exist,
    error_for_status,
    is_safety_refusal,
    lost_create,
    map_transport_errors,
    retry_after_seconds,
)

log = get_logger(__name__)
NAME = "replicate"
_PENDING = {"starting", "processing"}
_PREDICTION_ID = re.compile(r"[a-z0-9]{8,64}")
# Looking a create up: predictions created from this long before our send on (clock skew
# between us and Replicate), at most this many pages of the list (100 each, newest first).
_LOOKUP_SKEW_S = 30.0
_LOOKUP_PAGES = 3
_CLAIMED_MAX = 4096  # prediction ids this process created or adopted (never adopted twice)


class _HTTPError(ReplicateError):
    """ReplicateError that keeps the Retry-After and any prediction id the answer carried."""

    retry_after_s: float | None = None
    prediction_id: str | None = None


class _Client(Client):
    def __init__(
        self,
        api_token: str,
        base_url: str,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api_token=api_token, base_url=base_url)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={
                "Authorization": f"Bearer {api_token}",
                "User-Agent": "imagebot (replicate-python)",
            },
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            transport=transport,
            trust_env=False,
        )

    @property
    def _async_client(self) -> httpx.AsyncClient:
        return self._http

    async def _async_request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Client 1.0.7 passes `timeout=None` with every create that does not wait (sync mode
        # off), which httpx reads as "no timeout at all": a create to a hung API would then
        # hang the job for good. Our request timeout applies instead.
        if kwargs.get("timeout", httpx.USE_CLIENT_DEFAULT) is None:
            del kwargs["timeout"]
        resp = await self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            error = _HTTPError.from_response(resp)
            wrapped = _HTTPError(
                type=error.type,
                title=error.title,
                status=error.status or resp.status_code,
                detail=error.detail,
                instance=error.instance,
            )
            wrapped.retry_after_s = retry_after_seconds(resp.headers)
            wrapped.prediction_id = _named_prediction(resp)
            raise wrapped
        return resp


class ReplicateProvider:
    """FLUX (or any image model) on Replicate."""

    name = NAME

    def __init__(
        self,
        settings: ReplicateSettings,
        api_token: str,
        fetch_image: Callable[[str], Awaitable[ImageFile]],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.poll_interval_s = settings.poll_interval_s
        self._client = _Client(api_token, settings.base_url, settings.request_timeout_s, transport)
        self._fetch_image = fetch_image
        self._rate = RequestRate(NAME, settings.max_requests_per_s)
        model, _, version = settings.model.partition(":")
        self._model = model
        self._version = version or None
        self._claimed: OrderedDict[str, None] = OrderedDict()

    def _model_of(self, request: ProviderRequest) -> tuple[str, str | None]:
        """(owner/name, version or None) a request runs: its own (a style's), else config's."""
        if not request.model:
            return self._model, self._version
        model, _, version = request.model.partition(":")
        return model, version or None

    async def submit(self, request: ProviderRequest) -> str:
        model, version = self._model_of(request)
        payload: dict[str, Any]
        if request.kind is JobKind.UPSCALE:
            # An upscaler takes the image and the operator's params, no prompt. The image
            # travels as a data URI of bytes we hold (never a Telegram file URL: it carries
            # the bot token).
            if request.image is None or not request.image_mime:
                raise ProviderError(NAME, "an upscale needs an input image", code="invalid_input")
            payload = {**request.params, "image": _data_uri(request.image, request.image_mime)}
        else:
            payload = {**request.params, "prompt": request.prompt}
        hook: dict[str, Any] = {}
        if request.notify_url:
            hook = {"webhook": request.notify_url, "webhook_events_filter": ["completed"]}
        sent_at = time.time()
        try:
            async with self._rate.limiter:
                with map_transport_errors(NAME, submit=True):
                    if version:
                        prediction = await self._client.predictions.async_create(
                            version=version, input=payload, **hook
                        )
                    else:
                        prediction = await self._client.models.predictions.async_create(
                            model=model, input=payload, **hook
                        )
        except ReplicateError as exc:
            status = exc.status or 500
            if create_may_exist(status):
                found = await self._find_created(exc, status, payload, request, sent_at)
                log.warning("provider_create_looked_up", status=status, adopted=found)
                if found is not None:
                    return found
            raise _mapped(exc, submit=True) from exc
        return self._claim(str(prediction.id))

    # -- a create whose answer may hide a created prediction ------------------------------

    async def _find_created(
        self,
        exc: ReplicateError,
        status: int,
        payload: dict[str, Any],
        request: ProviderRequest,
        sent_at: float,
    ) -> str | None:
        """Look a "maybe created" create up at Replicate: the prediction's id (adopt it), or
        None when it certainly does not exist (send again). SubmitOutcomeUnknown when the
        lookup cannot tell (never resent blindly).

        A body naming a prediction id is asked for directly. Otherwise the list of
        predictions created since the send is searched for ours: Replicate's documented
        prediction object has no webhook field, so ours is the one with our model and exactly
        our input (the per-job completion-hint URL is compared as well if an answer carries
        `webhook`), that this process has not already created or adopted for another job.
        """
        named = exc.prediction_id if isinstance(exc, _HTTPError) else None
        try:
            if named:
                try:
                    async with self._rate.limiter:
                        await self._client._async_request("GET", f"/v1/predictions/{named}")
                except ReplicateError as missing:
                    if missing.status == 404:
                        return None
                    raise
                return self._claim(named)
            model = self._model_of(request)
            return await self._search(payload, request.notify_url, sent_at - _LOOKUP_SKEW_S, model)
        except ReplicateError as lookup:
            raise lost_create(NAME, status, f"the lookup failed (HTTP {lookup.status})") from exc
        except (httpx.TransportError, ValueError) as lookup:
            why = f"the lookup failed ({type(lookup).__name__})"
            raise lost_create(NAME, status, why) from exc

    async def _search(
        self,
        payload: dict[str, Any],
        notify_url: str | None,
        since: float,
        model: tuple[str, str | None],
    ) -> str | None:
        path: str | None = "/v1/predictions"
        params: dict[str, str] | None = {"created_after": _iso(since)}
        for _ in range(_LOOKUP_PAGES):
            assert path is not None
            async with self._rate.limiter:
                resp = await self._client._async_request("GET", path, params=params)
            page = resp.json()
            results = page.get("results") if isinstance(page, dict) else None
            older = False
            for item in results if isinstance(results, list) else []:
                if not isinstance(item, dict):
                    continue
                created = _parse_time(item.get("created_at"))
                if created is not None and created < since:
                    older = True  # newest first: the rest are older still
                    break
                if self._is_ours(item, payload, notify_url, model):
                    return self._claim(str(item["id"]))
            path, params = self._next_page(page.get("next")), None
            if older or path is None:
                return None
        raise ValueError("too many predictions to search")

    def _is_ours(
        self,
        item: dict[str, Any],
        payload: dict[str, Any],
        notify_url: str | None,
        model: tuple[str, str | None],
    ) -> bool:
        pid = item.get("id")
        if not isinstance(pid, str) or not _PREDICTION_ID.fullmatch(pid) or pid in self._claimed:
            return False
        name, version = model
        if version and item.get("version") != version:
            return False
        if not version and item.get("model") not in (None, name):
            return False
        hook = item.get("webhook")
        if hook is not None and notify_url is not None and hook != notify_url:
            return False
        given = item.get("input")
        return isinstance(given, dict) and all(given.get(k) == v for k, v in payload.items())

    def _next_page(self, url: Any) -> str | None:
        """The `next` link as a path on our API host (never followed elsewhere)."""
        base = self.settings.base_url.rstrip("/")
        if not isinstance(url, str) or not url.startswith(base + "/"):
            return None
        return url[len(base) :]

    def _claim(self, prediction_id: str) -> str:
        self._claimed[prediction_id] = None
        while len(self._claimed) > _CLAIMED_MAX:
            self._claimed.popitem(last=False)
        return prediction_id

    async def poll(self, request_id: str) -> PollResult:
        async with self._rate.limiter:
            with _errors(submit=False):
                resp = await self._client._async_request("GET", f"/v1/predictions/{request_id}")
        # Parsed by hand: client 1.0.7's model rejects newer statuses such as "aborted".
        data = resp.json()
        status = str(data.get("status", ""))
        if status in _PENDING:
            return PollResult(PollState.PENDING)
        if status == "succeeded":
            output = data.get("output")
            urls = [output] if isinstance(output, str) else list(output or [])
            urls = [str(getattr(u, "url", u)) for u in urls if u]
            if not urls:
                return PollResult(PollState.FAILED, error="no output", error_code="no_output")
            return PollResult(PollState.SUCCEEDED, output_urls=tuple(urls))
        if status == "canceled":
            return PollResult(PollState.CANCELED, error="canceled at Replicate")
        error = str(data.get("error") or status or "failed")
        code = "safety" if is_safety_refusal(error) else "model_error"
        return PollResult(PollState.FAILED, error=error, error_code=code)

    async def cancel(self, request_id: str) -> None:
        async with self._rate.limiter:
            with _errors(submit=False):
                await self._client.predictions.async_cancel(request_id)

    async def fetch_output(self, url: str) -> ImageFile:
        return await self._fetch_image(url)

    async def aclose(self) -> None:
        await self._client._http.aclose()

    def share_rate(self, processes: int) -> None:
        self._rate.share(processes)


@contextmanager
def _errors(*, submit: bool) -> Iterator[None]:
    """ReplicateError and transport errors → ProviderError."""
    with map_transport_errors(NAME, submit=submit):
        try:
            yield
        except ReplicateError as exc:
            raise _mapped(exc, submit=submit) from exc


def _mapped(exc: ReplicateError, *, submit: bool) -> ProviderError:
    return error_for_status(
        NAME,
        exc.status or 500,
        exc.detail or exc.title or "error",
        submit=submit,
        retry_after_s=exc.retry_after_s if isinstance(exc, _HTTPError) else None,
    )


def _named_prediction(resp: httpx.Response) -> str | None:
    """A prediction id in an error answer's body (`id`), if it carries one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    pid = body.get("id") if isinstance(body, dict) else None
    return pid if isinstance(pid, str) and _PREDICTION_ID.fullmatch(pid) else None


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()

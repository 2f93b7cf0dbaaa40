"""Text → image through Replicate with the official client: create, then poll by prediction id.

The client is pointed at `replicate.base_url`. Its built-in transport retries GETs up to ten
times and sleeps any Retry-After it is given, which would hide retries from the job's attempt
count and from our deadline; `_Client` swaps in a plain httpx client so every retry decision is
the worker's. Outputs are downloaded by the SSRF-guarded fetcher, never through the client
(which would send the API token to the output host).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from aiolimiter import AsyncLimiter
from replicate.client import Client
from replicate.exceptions import ReplicateError

from imagebot.config import ReplicateSettings
from imagebot.models import ImageFile, PollResult, PollState, ProviderRequest
from imagebot.providers.base import (
    error_for_status,
    is_safety_refusal,
    map_transport_errors,
    retry_after_seconds,
)

NAME = "replicate"
_PENDING = {"starting", "processing"}


class _HTTPError(ReplicateError):
    """ReplicateError that keeps the Retry-After the response carried."""

    retry_after_s: float | None = None


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
        self._client = _Client(api_token, settings.base_url, settings.request_timeout_s, transport)
        self._fetch_image = fetch_image
        self._limiter = AsyncLimiter(settings.max_requests_per_s, 1)
        model, _, version = settings.model.partition(":")
        self._model = model
        self._version = version or None

    async def submit(self, request: ProviderRequest) -> str:
        payload = {**request.params, "prompt": request.prompt}
        hook: dict[str, Any] = {}
        if request.notify_url:
            hook = {"webhook": request.notify_url, "webhook_events_filter": ["completed"]}
        async with self._limiter:
            with _errors(submit=True):
                if self._version:
                    prediction = await self._client.predictions.async_create(
                        version=self._version, input=payload, **hook
                    )
                else:
                    prediction = await self._client.models.predictions.async_create(
                        model=self._model, input=payload, **hook
                    )
        return str(prediction.id)

    async def poll(self, request_id: str) -> PollResult:
        async with self._limiter:
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
        async with self._limiter:
            with _errors(submit=False):
                await self._client.predictions.async_cancel(request_id)

    async def fetch_output(self, url: str) -> ImageFile:
        return await self._fetch_image(url)

    async def aclose(self) -> None:
        await self._client._http.aclose()


@contextmanager
def _errors(*, submit: bool) -> Iterator[None]:
    """ReplicateError and transport errors → ProviderError."""
    with map_transport_errors(NAME, submit=submit):
        try:
            yield
        except ReplicateError as exc:
            raise error_for_status(
                NAME,
                exc.status or 500,
                exc.detail or exc.title or "error",
                submit=submit,
                retry_after_s=getattr(exc, "retry_after_s", None),
            ) from exc

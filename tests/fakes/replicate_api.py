"""Fake Replicate HTTP API: predictions that progress by time, real output images, faults."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.base import Call, Fault, serve_until_signalled
from tests.fakes.files import FileHost
from tests.fakes.images import make_image

NSFW_ERROR = (
    "All generated images contained NSFW content. Try running it again with a different prompt."
)
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Pillow format -> (file extension, content type)
FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
BEHAVIOUR_KEYS = frozenset(
    {
        "latency_s",
        "startup_s",
        "outcome",
        "error_text",
        "image_size",
        "image_format",
        "output_url_base",
        # outputs FLUX's safety checker drops silently (the prediction succeeds with fewer);
        # all of them dropped fails it with NSFW_ERROR, as cog-flux does
        "withheld",
    }
)


def iso(ts: float) -> str:
    """Replicate's timestamp format: ISO 8601 UTC with a trailing Z."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def problem(status: int, title: str, detail: str) -> web.Response:
    """An RFC 7807-style error body as Replicate sends it."""
    return web.json_response({"title": title, "detail": detail, "status": status}, status=status)


def prompt_color(prompt: str, index: int) -> tuple[int, int, int]:
    """A flat colour derived from the prompt, so different prompts give different bytes."""
    digest = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


def parse_prefer_wait(header: str | None) -> float | None:
    """Seconds asked for by `Prefer: wait` / `Prefer: wait=N`, or None for no sync mode."""
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return float(value) if value.strip() else 60.0
            except ValueError:
                return 60.0
    return None


@dataclass
class FakePrediction:
    """One prediction the fake holds; its status is computed from the wall clock."""

    id: str
    model: str
    version: str
    input: dict[str, Any]
    created: float
    startup_s: float
    latency_s: float
    outcome: str
    error_text: str
    output_urls: list[str]
    files: list[str]
    urls: dict[str, str]
    # when the final state is (or was) reached; a cancel moves it to the cancel time
    completed_at_ts: float = 0.0
    canceled: bool = False
    canceled_at: float | None = None
    polls: int = 0
    webhook: str | None = None
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.completed_at_ts:
            self.completed_at_ts = self.created + self.latency_s

    def status_at(self, now: float) -> str:
        """The status a GET at wall-clock time `now` reports."""
        if self.canceled:
            return "canceled"
        if now < self.created + self.startup_s:
            return "starting"
        if now < self.completed_at_ts:
            return "processing"
        return self.outcome

    @property
    def status(self) -> str:
        return self.status_at(time.time())

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The prediction JSON as Replicate returns it (accepted by replicate 1.0.7)."""
        now = time.time() if now is None else now
        status = self.status_at(now)
        final = status in FINAL_STATUSES
        started = self.created + self.startup_s
        has_started = started <= min(now, self.completed_at_ts)
        metrics: dict[str, Any] = {}
        if final:
            metrics["total_time"] = round(self.completed_at_ts - self.created, 3)
            if has_started:
                metrics["predict_time"] = round(self.completed_at_ts - started, 3)
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "status": status,
            "input": self.input,
            "output": list(self.output_urls) if status == "succeeded" else None,
            "error": self.error_text if status == "failed" else None,
            "logs": "" if status == "starting" else "Generating images...\n",
            "metrics": metrics,
            "data_removed": False,
            "created_at": iso(self.created),
            "started_at": iso(started) if has_started else None,
            "completed_at": iso(self.completed_at_ts) if final else None,
            "urls": dict(self.urls),
        }


class FakeReplicate(FileHost):
    """Replicate's predictions API on 127.0.0.1, scripted by attributes and `next_behaviours`."""

    def __init__(
        self,
        token: str = "r8_test_token",  # noqa: S107 (a fake's test token)
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.token = token
        self.latency_s = 0.2
        self.startup_s = 0.05
        self.outcome = "succeeded"
        self.error_text = NSFW_ERROR
        self.image_size: tuple[int, int] = (64, 64)
        self.image_format = "PNG"
        self.output_url_base: str | None = None
        self.withheld = 0
        self.next_behaviours: list[dict[str, Any]] = []
        # version id -> "owner/name" reported for version-based creates
        self.version_models: dict[str, str] = {}
        self.predictions: dict[str, FakePrediction] = {}
        # answers given AFTER a create made its prediction (a gateway losing the answer)
        self._lost_answers: list[tuple[int, Any, dict[str, str]]] = []
        self.list_page_size = 100  # GET /v1/predictions page size (Replicate's is 100)
        r = self.app.router
        r.add_post("/v1/models/{owner}/{name}/predictions", self._create_for_model)
        r.add_post("/v1/predictions", self._create_for_version)
        r.add_get("/v1/predictions", self._list)
        r.add_get("/v1/predictions/{id}", self._get)
        r.add_post("/v1/predictions/{id}/cancel", self._cancel)
        r.add_route("*", "/{tail:.*}", self._unknown)

    # -- read back -------------------------------------------------------------------------

    @property
    def creates(self) -> list[Call]:
        """Every create request, including refused and faulted ones."""
        return self.calls_of("create")

    @property
    def cancels(self) -> list[Call]:
        return self.calls_of("cancel")

    @property
    def last_prediction(self) -> FakePrediction:
        return list(self.predictions.values())[-1]

    def output_bytes(self, prediction_id: str) -> list[bytes]:
        """The image bytes behind a prediction's outputs (read directly, not counted)."""
        return [self.files[name].data for name in self.predictions[prediction_id].files]

    def fail_after_create(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` creates make their prediction and then answer `status` (as a
        gateway whose backend took the create but timed out): `body` may be a function of the
        prediction JSON, to answer with a body that names it."""
        self._lost_answers.extend([(status, body, dict(headers or {}))] * times)

    @property
    def lists(self) -> list[Call]:
        return self.calls_of("list")

    def open_predictions_peak(self) -> int:
        """The most predictions open at one moment (created and not yet final, by the fake's
        clock): what a cap on concurrent requests must keep at or below the cap."""
        events: list[tuple[float, int]] = []
        for prediction in self.predictions.values():
            events.append((prediction.created, 1))
            events.append((prediction.completed_at_ts, -1))
        events.sort()  # at the same instant a close (-1) counts before an open (+1)
        peak = current = 0
        for _, step in events:
            current += step
            peak = max(peak, current)
        return peak

    # -- handlers --------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        got = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(got, f"Bearer {self.token}".encode())

    async def _guard(self, op: str, request: web.Request) -> web.Response | None:
        """Delay, auth and scripted faults shared by the API operations."""
        await self.apply_delay(op)
        if not self._authorized(request):
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        fault = self.take_fault(op)
        return self.fault_response(fault) if fault else None

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

    async def _create_for_model(self, request: web.Request) -> web.Response:
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._create(request, model)

    async def _create_for_version(self, request: web.Request) -> web.Response:
        return await self._create(request, None)

    async def _create(self, request: web.Request, model: str | None) -> web.Response:
        data = await self._read("create", request)
        if (refused := await self._guard("create", request)) is not None:
            return refused
        if not isinstance(data, dict):
            return problem(400, "Bad request", "The request body must be a JSON object")
        inp = data.get("input")
        if not isinstance(inp, dict):
            return problem(422, "Input validation failed", "input is required")
        if model is None:
            version = data.get("version")
            if not isinstance(version, str) or not version:
                return problem(422, "Input validation failed", "version is required")
            model = self.version_models.get(version, "fake/model")
        else:
            version = hashlib.sha256(model.encode()).hexdigest()
        try:
            behaviour = self._take_behaviour()
        except ValueError as exc:
            return problem(500, "Fake misconfigured", str(exc))
        prediction = self._new_prediction(model, version, inp, behaviour)
        if isinstance(hook := data.get("webhook"), str):
            # Only "completed" events are sent (the filter the bot asks for).
            prediction.webhook = hook
            self.call_back_when(hook, lambda: prediction.completed_at_ts, prediction.to_json)
        if self._lost_answers:
            status, body, headers = self._lost_answers.pop(0)
            answer = body(prediction.to_json()) if callable(body) else body
            return self.fault_response(Fault(status, answer, headers))
        wait_s = parse_prefer_wait(request.headers.get("Prefer"))
        if wait_s is not None:
            await self._hold(prediction, wait_s)
        return web.json_response(
            prediction.to_json(), status=201, headers={"Location": prediction.urls["get"]}
        )

    async def _get(self, request: web.Request) -> web.Response:
        await self._read("get", request)
        if (refused := await self._guard("get", request)) is not None:
            return refused
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return problem(404, "Not found", "Not found.")
        prediction.polls += 1
        return web.json_response(prediction.to_json())

    async def _list(self, request: web.Request) -> web.Response:
        """`GET /v1/predictions`: newest first, `{next, previous, results}` pages, the
        `created_after` / `created_before` filters and a `cursor` for the next page."""
        await self._read("list", request)
        if (refused := await self._guard("list", request)) is not None:
            return refused
        found = sorted(self.predictions.values(), key=lambda p: p.created, reverse=True)
        for name, keep in (("created_after", True), ("created_before", False)):
            if value := request.query.get(name):
                try:
                    bound = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    return problem(400, "Bad request", f"{name} must be an ISO 8601 time")
                found = [p for p in found if (p.created >= bound) is keep]
        try:
            start = int(request.query.get("cursor") or 0)
        except ValueError:
            return problem(400, "Bad request", "bad cursor")
        size = self.list_page_size
        page = found[start : start + size]
        more = start + size < len(found)
        base = f"{self.url}/v1/predictions"
        filters = "".join(
            f"&{k}={request.query[k]}"
            for k in ("created_after", "created_before")
            if k in request.query
        )
        return web.json_response(
            {
                "next": f"{base}?cursor={start + size}{filters}" if more else None,
                "previous": f"{base}?cursor={max(0, start - size)}{filters}" if start else None,
                "results": [{**p.to_json(), "source": "api"} for p in page],
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        await self._read("cancel", request)
        if (refused := await self._guard("cancel", request)) is not None:
            return refused
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return problem(404, "Not found", "Not found.")
        if not prediction.is_final:
            prediction.canceled = True
            prediction.canceled_at = prediction.completed_at_ts = time.time()
            prediction.cancel_event.set()
        return web.json_response(prediction.to_json())

    async def _unknown(self, request: web.Request) -> web.Response:
        self.record("unknown", request, await request.read())
        return problem(404, "Not found", f"No fake route for {request.method} {request.path}")

    # -- internals -------------------------------------------------------------------------

    def _take_behaviour(self) -> dict[str, Any]:
        """The behaviour for one create: the attributes, overridden by `next_behaviours[0]`."""
        behaviour = {key: getattr(self, key) for key in BEHAVIOUR_KEYS}
        if self.next_behaviours:
            override = self.next_behaviours.pop(0)
            unknown = set(override) - BEHAVIOUR_KEYS
            if unknown:
                raise ValueError(f"unknown behaviour keys: {sorted(unknown)}")
            behaviour.update(override)
        if behaviour["outcome"] not in FINAL_STATUSES:
            raise ValueError(f"outcome must be one of {sorted(FINAL_STATUSES)}")
        if str(behaviour["image_format"]).upper() not in FORMATS:
            raise ValueError(f"image_format must be one of {sorted(FORMATS)}")
        return behaviour

    def _new_prediction(
        self, model: str, version: str, inp: dict[str, Any], behaviour: dict[str, Any]
    ) -> FakePrediction:
        pid = base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("=")[:26]
        fmt = str(behaviour["image_format"]).upper()
        ext, content_type = FORMATS[fmt]
        count = inp.get("num_outputs", inp.get("num_images", 1))
        count = count if isinstance(count, int) and count > 0 else 1
        outcome, error_text = behaviour["outcome"], behaviour["error_text"]
        withheld = max(0, int(behaviour["withheld"]))
        if withheld >= count and outcome == "succeeded":
            outcome, error_text = "failed", NSFW_ERROR
        count = max(0, count - withheld)
        width, height = behaviour["image_size"]
        prompt = str(inp.get("prompt", ""))
        names, urls = [], []
        base = behaviour["output_url_base"]
        for i in range(count):
            name = f"{pid}_{i}.{ext}"
            data = make_image(width, height, prompt_color(prompt, i), fmt=fmt)
            names.append(name)
            urls.append(self.store_file(name, data, content_type, base))
        api = f"{self.url}/v1/predictions/{pid}"
        prediction = FakePrediction(
            id=pid,
            model=model,
            version=version,
            input=inp,
            created=time.time(),
            startup_s=float(behaviour["startup_s"]),
            latency_s=float(behaviour["latency_s"]),
            outcome=outcome,
            error_text=error_text,
            output_urls=urls,
            files=names,
            urls={"get": api, "cancel": f"{api}/cancel", "web": f"{self.url}/p/{pid}"},
        )
        self.predictions[pid] = prediction
        return prediction

    @staticmethod
    async def _hold(prediction: FakePrediction, wait_s: float) -> None:
        """Sync mode: return when the prediction is final or `wait_s` has passed."""
        deadline = time.monotonic() + wait_s
        # loop because the status follows the wall clock while timeouts follow the monotonic one
        while not prediction.is_final and (left := deadline - time.monotonic()) > 0:
            until_done = prediction.completed_at_ts - time.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.001, min(left, until_done))):
                    await prediction.cancel_event.wait()


async def _serve(port: int, latency_s: float | None, token: str) -> None:
    fake = FakeReplicate(token=token)
    if latency_s is not None:
        fake.latency_s = latency_s

    async def start() -> str:
        await fake.start(port)
        return fake.url

    await serve_until_signalled(start, fake.stop)


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone until killed: `python -m tests.fakes.replicate_api --port 0`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick")
    parser.add_argument("--latency", type=float, default=None, help="seconds per prediction")
    parser.add_argument("--token", default="r8_test_token")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.latency, args.token))


if __name__ == "__main__":
    main()

"""The Replicate and fal fakes, driven by the real replicate client and plain httpx."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicate.client import Client
from replicate.exceptions import ReplicateError

from tests.fakes.fal_api import FakeFal
from tests.fakes.images import image_size, inverted, make_image
from tests.fakes.replicate_api import NSFW_ERROR, FakeReplicate

TOKEN = "r8_fixture_token"
KEY = "fixture_key_id:fixture_key_secret"
MODEL = "black-forest-labs/flux-schnell"
EDIT_APP = "fal-ai/nano-banana"
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
async def rep() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(token=TOKEN)
    fake.latency_s, fake.startup_s = 0.15, 0.03
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rclient(rep: FakeReplicate) -> AsyncIterator[Client]:
    # Client has no aclose(); closing the transport we hand it releases its sockets
    transport = httpx.AsyncHTTPTransport()
    yield Client(api_token=TOKEN, base_url=rep.url, transport=transport)
    await transport.aclose()


@pytest.fixture
async def fal() -> AsyncIterator[FakeFal]:
    fake = FakeFal(key=KEY)
    fake.latency_s, fake.queue_s = 0.15, 0.05
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fal_http(fal: FakeFal) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Key {KEY}"}
    async with httpx.AsyncClient(base_url=fal.url, headers=headers, timeout=5) as client:
        yield client


@pytest.fixture
async def plain_http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def poll_prediction(client: Client, pid: str) -> list[Any]:
    """Poll until the prediction leaves starting/processing; return every state seen."""
    seen = []
    async with asyncio.timeout(3):
        while True:
            prediction = await client.predictions.async_get(pid)
            seen.append(prediction)
            if prediction.status not in {"starting", "processing"}:
                return seen
            await asyncio.sleep(0.02)


async def poll_fal(http: httpx.AsyncClient, status_url: str) -> list[dict[str, Any]]:
    """Poll a fal status URL until COMPLETED; return every status body seen."""
    seen = []
    async with asyncio.timeout(3):
        while True:
            resp = await http.get(status_url, params={"logs": "1"})
            assert resp.status_code == 200
            seen.append(resp.json())
            if seen[-1]["status"] == "COMPLETED":
                return seen
            await asyncio.sleep(0.02)


async def create_and_wait(client: Client) -> tuple[str, str]:
    """Create with `Prefer: wait` and return (prediction id, first output URL)."""
    # client.models: predictions.async_create(model=...) drops `wait` (see the quirk test)
    done = await client.models.predictions.async_create(
        model=MODEL, input={"prompt": "x"}, wait=True
    )
    assert done.status == "succeeded"
    assert isinstance(done.output, list)
    return done.id, done.output[0]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def submit_edit(http: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    body = {"prompt": "make it pop", "image_urls": [data_uri(make_image())], **extra}
    return await http.post(f"/{EDIT_APP}/edit", json=body)


async def run_standalone(module: str, probe: str, auth: str) -> int:
    """Start a fake as `python -m module --port 0`, GET `probe` on it, stop it; return the code."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--port",
        "0",
        "--latency",
        "0.1",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(timeout=5) as http:
            resp = await http.get(url + probe, headers={"Authorization": auth})
        return resp.status_code
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            await proc.wait()


# -- Replicate ---------------------------------------------------------------------------------


async def test_model_create_polls_to_succeeded_with_downloadable_outputs(
    rep: FakeReplicate, rclient: Client, plain_http: httpx.AsyncClient
) -> None:
    """A model create starts, processes, then succeeds with one real image per num_outputs."""
    rep.startup_s, rep.latency_s = 0.1, 0.25
    created = await rclient.predictions.async_create(
        model=MODEL, input={"prompt": "a red fox", "num_outputs": 2}
    )
    assert created.status == "starting"
    assert created.model == MODEL
    assert len(created.version) == 64

    seen = await poll_prediction(rclient, created.id)
    final = seen[-1]
    assert final.status == "succeeded"
    assert final.error is None
    assert final.completed_at
    assert final.started_at
    assert "predict_time" in final.metrics
    assert len(final.output) == 2
    bodies = []
    for url in final.output:
        assert url.startswith(f"{rep.url}/files/")
        resp = await plain_http.get(url)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "image/png"
        assert image_size(resp.content) == (64, 64)
        bodies.append(resp.content)
    assert bodies[0] != bodies[1]
    assert bodies == rep.output_bytes(created.id)

    call = rep.creates[0]
    assert call.path == f"/v1/models/{MODEL}/predictions"
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"
    assert call.params == {"input": {"prompt": "a red fox", "num_outputs": 2}}
    kept = rep.predictions[created.id]
    assert kept.polls == len(seen)
    assert kept.completed_at_ts == pytest.approx(kept.created + 0.25)
    assert set(rep.downloads.values()) == {1}


async def test_different_prompts_give_different_images(
    rep: FakeReplicate, rclient: Client
) -> None:
    """The flat colour comes from the prompt."""
    a = await rclient.predictions.async_create(model=MODEL, input={"prompt": "sea"})
    b = await rclient.predictions.async_create(model=MODEL, input={"prompt": "sky"})
    assert rep.output_bytes(a.id) != rep.output_bytes(b.id)


async def test_version_create_posts_version_and_input(rep: FakeReplicate, rclient: Client) -> None:
    """A version create goes to /v1/predictions with {version, input}."""
    rep.version_models["abc123"] = "someone/lora"
    created = await rclient.predictions.async_create(version="abc123", input={"prompt": "x"})
    assert created.version == "abc123"
    assert created.model == "someone/lora"
    assert rep.creates[0].path == "/v1/predictions"
    assert rep.creates[0].params == {"input": {"prompt": "x"}, "version": "abc123"}
    assert (await poll_prediction(rclient, created.id))[-1].status == "succeeded"


async def test_prefer_wait_holds_until_final(rep: FakeReplicate, rclient: Client) -> None:
    """`Prefer: wait` returns the finished prediction in the create response."""
    started = time.monotonic()
    created = await rclient.models.predictions.async_create(
        model=MODEL, input={"prompt": "x"}, wait=True
    )
    assert created.status == "succeeded"
    assert created.output
    assert time.monotonic() - started >= 0.1
    assert rep.creates[0].headers["Prefer"] == "wait"


async def test_prefer_wait_n_returns_current_state_after_n_seconds(
    rep: FakeReplicate, rclient: Client
) -> None:
    """`Prefer: wait=1` on a slow prediction returns it still processing after about 1 s."""
    rep.latency_s = 5
    started = time.monotonic()
    created = await rclient.models.predictions.async_create(
        model=MODEL, input={"prompt": "x"}, wait=1
    )
    assert created.status == "processing"
    assert created.output is None
    assert time.monotonic() - started >= 0.9  # held about 1 s, not the 5 s the prediction takes
    assert rep.creates[0].headers["Prefer"] == "wait=1"


async def test_client_drops_wait_for_model_creates_via_predictions(
    rep: FakeReplicate, rclient: Client
) -> None:
    """replicate 1.0.7 quirk: predictions.async_create(model=..., wait=...) sends no Prefer."""
    created = await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"}, wait=True)
    assert created.status == "starting"
    assert "Prefer" not in rep.creates[0].headers


async def test_cancel_marks_prediction_canceled(rep: FakeReplicate, rclient: Client) -> None:
    """Cancel before completion gives `canceled`, which later GETs keep reporting."""
    rep.latency_s = 5
    created = await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"})
    canceled = await rclient.predictions.async_cancel(created.id)
    assert canceled.status == "canceled"
    assert canceled.output is None
    assert (await rclient.predictions.async_get(created.id)).status == "canceled"
    kept = rep.predictions[created.id]
    assert kept.canceled
    assert kept.completed_at_ts < kept.created + 1
    assert [c.path for c in rep.cancels] == [f"/v1/predictions/{created.id}/cancel"]


async def test_failed_outcome_for_next_create_only(rep: FakeReplicate, rclient: Client) -> None:
    """`next_behaviours` scripts one failed prediction; the next one succeeds again."""
    rep.next_behaviours.append({"outcome": "failed", "latency_s": 0.05})
    first = await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"})
    second = await rclient.predictions.async_create(model=MODEL, input={"prompt": "y"})
    failed = (await poll_prediction(rclient, first.id))[-1]
    assert failed.status == "failed"
    assert failed.error == NSFW_ERROR
    assert failed.output is None
    assert (await poll_prediction(rclient, second.id))[-1].status == "succeeded"


async def test_validation_fault_raises_replicate_error_and_makes_no_prediction(
    rep: FakeReplicate, rclient: Client
) -> None:
    """A scripted 422 surfaces as ReplicateError(status=422) with the body's detail."""
    body = {"title": "Input validation failed", "detail": "prompt is required", "status": 422}
    rep.fail_next("create", 422, body)
    with pytest.raises(ReplicateError) as caught:
        await rclient.predictions.async_create(model=MODEL, input={})
    assert caught.value.status == 422
    assert caught.value.detail == "prompt is required"
    assert len(rep.creates) == 1
    assert rep.predictions == {}


async def test_throttled_create_is_not_retried_by_the_client(
    rep: FakeReplicate, rclient: Client
) -> None:
    """The client never retries POST, so a 429 create raises at once."""
    detail = "Request was throttled. Your rate limit resets in ~1s."
    rep.fail_next("create", 429, {"detail": detail}, headers={"Retry-After": "1"})
    with pytest.raises(ReplicateError) as caught:
        await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"})
    assert caught.value.status == 429
    assert caught.value.detail == detail
    assert len(rep.creates) == 1


async def test_get_faults_then_recovers(rep: FakeReplicate, rclient: Client) -> None:
    """Two scripted 500s on get raise twice; the third get works."""
    created = await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"})
    rep.fail_next("get", 500, {"title": "Internal", "detail": "boom", "status": 500}, times=2)
    for _ in range(2):
        with pytest.raises(ReplicateError) as caught:
            await rclient.predictions.async_get(created.id)
        assert caught.value.status == 500
    assert (await rclient.predictions.async_get(created.id)).id == created.id
    assert len(rep.calls_of("get")) == 3


async def test_delay_next_holds_a_get(rep: FakeReplicate, rclient: Client) -> None:
    """delay_next slows exactly the next call of the operation."""
    created = await rclient.predictions.async_create(model=MODEL, input={"prompt": "x"})
    rep.delay_next("get", 0.3)
    started = time.monotonic()
    await rclient.predictions.async_get(created.id)
    assert time.monotonic() - started >= 0.3


async def test_wrong_token_gets_401(rep: FakeReplicate) -> None:
    """A wrong bearer token is refused with Replicate's 401 body."""
    transport = httpx.AsyncHTTPTransport()
    client = Client(api_token="r8_wrong", base_url=rep.url, transport=transport)
    try:
        with pytest.raises(ReplicateError) as caught:
            await client.predictions.async_create(model=MODEL, input={"prompt": "x"})
    finally:
        await transport.aclose()
    assert caught.value.status == 401
    assert caught.value.title == "Unauthenticated"
    assert rep.predictions == {}


async def test_outputs_expire_and_url_base_can_point_elsewhere(
    rep: FakeReplicate, rclient: Client, plain_http: httpx.AsyncClient
) -> None:
    """expire_outputs makes files 404; output_url_base only rewrites the returned URLs."""
    _, url = await create_and_wait(rclient)
    rep.expire_outputs()
    assert (await plain_http.get(url)).status_code == 404

    rep.next_behaviours.append({"output_url_base": "http://169.254.169.254/latest"})
    _, url = await create_and_wait(rclient)
    assert url.startswith("http://169.254.169.254/latest/")
    rep.fail_next("file", 503)
    _, url = await create_and_wait(rclient)
    assert (await plain_http.get(url)).status_code == 503
    assert (await plain_http.get(url)).status_code == 200


async def test_jpeg_outputs(rep: FakeReplicate, rclient: Client) -> None:
    """image_format and image_size shape the output files."""
    rep.image_format, rep.image_size = "JPEG", (40, 30)
    pid, url = await create_and_wait(rclient)
    assert url.endswith(".jpg")
    data = rep.output_bytes(pid)[0]
    assert data.startswith(b"\xff\xd8")
    assert image_size(data) == (40, 30)


async def test_replicate_standalone_runner() -> None:
    """`python -m tests.fakes.replicate_api --port 0` prints its URL and serves the API."""
    code = await run_standalone(
        "tests.fakes.replicate_api", "/v1/predictions/nope", "Bearer r8_test_token"
    )
    assert code == 404


# -- fal ---------------------------------------------------------------------------------------


async def test_fal_submit_poll_result_and_inverted_output(
    fal: FakeFal, fal_http: httpx.AsyncClient, plain_http: httpx.AsyncClient
) -> None:
    """A data-URI edit goes IN_QUEUE, IN_PROGRESS, COMPLETED; outputs are the inverted photo."""
    fal.queue_s, fal.latency_s = 0.15, 0.3
    source = make_image(32, 24, (200, 60, 30))
    resp = await fal_http.post(
        f"/{EDIT_APP}/edit",
        json={"prompt": "invert", "image_urls": [data_uri(source)], "num_images": 2},
    )
    assert resp.status_code == 200
    sub = resp.json()
    rid = sub["request_id"]
    base = f"{fal.url}/{EDIT_APP}/requests/{rid}"
    assert sub["response_url"] == base
    assert sub["queue_position"] == 0
    assert sub["status_url"] == f"{base}/status"
    assert sub["cancel_url"] == f"{base}/cancel"

    seen = await poll_fal(fal_http, sub["status_url"])
    assert seen[0]["status"] == "IN_QUEUE"
    assert seen[0]["queue_position"] == 0
    assert {s["status"] for s in seen} >= {"IN_PROGRESS", "COMPLETED"}
    assert "error" not in seen[-1]
    assert seen[-1]["metrics"]["inference_time"] > 0
    assert seen[-1]["logs"]
    assert seen[-1]["response_url"] == base

    result = (await fal_http.get(sub["response_url"])).json()
    assert result["description"] == ""
    assert len(result["images"]) == 2
    image = result["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (32, 24, "image/png")
    out = await plain_http.get(image["url"])
    assert out.status_code == 200
    assert out.content == inverted(source)
    assert image["file_size"] == len(out.content)
    kept = fal.requests[rid]
    assert kept.received_images == [source]
    assert kept.completed_at_ts == pytest.approx(kept.created + 0.3)
    assert kept.input["prompt"] == "invert"


async def test_fal_result_before_completion_is_400(
    fal: FakeFal, fal_http: httpx.AsyncClient
) -> None:
    """Asking for the result early gets fal's 'still in progress' 400."""
    fal.latency_s = 5
    sub = (await submit_edit(fal_http)).json()
    resp = await fal_http.get(sub["response_url"])
    assert resp.status_code == 400
    assert resp.json() == {"detail": "Request is still in progress"}


async def test_fal_cancel(fal: FakeFal, fal_http: httpx.AsyncClient) -> None:
    """Cancel is accepted once; the request then reports COMPLETED with a cancel error."""
    fal.latency_s = 5
    sub = (await submit_edit(fal_http)).json()
    resp = await fal_http.put(sub["cancel_url"])
    assert resp.status_code == 202
    assert resp.json() == {"status": "CANCELLATION_REQUESTED"}
    status = (await fal_http.get(sub["status_url"])).json()
    assert status["status"] == "COMPLETED"
    assert status["error"] == "Request was cancelled"
    result = await fal_http.get(sub["response_url"])
    assert result.status_code == 400
    assert result.json() == {"detail": "Request was cancelled"}
    again = await fal_http.put(sub["cancel_url"])
    assert again.status_code == 400
    assert again.json() == {"status": "ALREADY_COMPLETED"}
    assert len(fal.cancels) == 2
    assert fal.requests[sub["request_id"]].canceled


async def test_fal_failed_outcome(fal: FakeFal, fal_http: httpx.AsyncClient) -> None:
    """A scripted failure shows in the status error and as a 422 result."""
    fal.next_behaviours.append({"outcome": "failed", "latency_s": 0.05})
    sub = (await submit_edit(fal_http)).json()
    final = (await poll_fal(fal_http, sub["status_url"]))[-1]
    assert final["error"] == fal.error_text
    assert final["error_type"] == "content_policy_violation"
    result = await fal_http.get(sub["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["type"] == "content_policy_violation"
    assert result.json()["detail"][0]["msg"] == fal.error_text


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("data:text/plain;base64,aGVsbG8gd29ybGQ=", False),
        ("data:image/png;base64,!!!not-base64", False),
        ("http://169.254.169.254/latest/meta-data/x.png", True),
        ("https://example.com/cat.png", True),
    ],
)
async def test_fal_unloadable_image_is_422(
    fal: FakeFal, fal_http: httpx.AsyncClient, url: str, refused: bool
) -> None:
    """Non-images and non-loopback URLs fail submit with image_load_error; no request is made."""
    body = {"prompt": "x", "image_urls": [data_uri(make_image()), url]}
    resp = await fal_http.post(f"/{EDIT_APP}/edit", json=body)
    assert resp.status_code == 422
    assert resp.json()["detail"] == [
        {
            "loc": ["body", "image_urls", 1],
            "msg": "Could not load image",
            "type": "image_load_error",
        }
    ]
    assert fal.requests == {}
    assert fal.refused_fetches == ([url] if refused else [])


async def test_fal_upload_then_loopback_fetch(fal: FakeFal, fal_http: httpx.AsyncClient) -> None:
    """A CDN upload's access_url on loopback is fetched by the fake as the input image."""
    token = (await fal_http.post("/storage/auth/token?storage_type=fal-cdn-v3", json={})).json()
    assert token["token_type"] == "Bearer"
    photo = make_image(20, 20, (10, 20, 30), fmt="JPEG")
    up = await fal_http.post(
        "/files/upload",
        content=photo,
        headers={
            "Authorization": f"Bearer {token['token']}",
            "Content-Type": "image/jpeg",
            "X-Fal-File-Name": "photo.jpg",
        },
    )
    access_url = up.json()["access_url"]
    assert access_url.startswith(f"{fal.url}/files/")
    assert access_url.endswith(".jpg")
    resp = await fal_http.post(
        f"/{EDIT_APP}/edit", json={"prompt": "x", "image_urls": [access_url]}
    )
    assert resp.status_code == 200
    assert fal.last_request.received_images == [photo]


async def test_fal_auth_required(fal: FakeFal, plain_http: httpx.AsyncClient) -> None:
    """Missing or wrong keys get 401 {"detail": "Unauthorized"}."""
    url = f"{fal.url}/{EDIT_APP}/edit"
    body = {"prompt": "x", "image_urls": [data_uri(make_image())]}
    for headers in ({}, {"Authorization": "Key nope:nope"}, {"Authorization": f"Bearer {KEY}"}):
        resp = await plain_http.post(url, json=body, headers=headers)
        assert resp.status_code == 401
        assert resp.json() == {"detail": "Unauthorized"}
    assert fal.requests == {}
    assert len(fal.submits) == 3


async def test_fal_faults_and_no_request_on_faulted_submit(
    fal: FakeFal, fal_http: httpx.AsyncClient
) -> None:
    """Scripted faults answer submit and status; a faulted submit creates nothing."""
    fal.fail_next(
        "submit", 503, {"detail": "Runner unavailable"}, headers={"X-Fal-Retryable": "1"}
    )
    first = await submit_edit(fal_http)
    assert first.status_code == 503
    assert first.headers["X-Fal-Retryable"] == "1"
    assert fal.requests == {}
    sub = (await submit_edit(fal_http)).json()
    fal.fail_next("status", 500, {"detail": "boom"})
    assert (await fal_http.get(sub["status_url"])).status_code == 500
    assert (await fal_http.get(sub["status_url"])).status_code == 200


async def test_fal_outputs_expire_and_url_base_and_format(
    fal: FakeFal, fal_http: httpx.AsyncClient, plain_http: httpx.AsyncClient
) -> None:
    """expire_outputs makes files 404; output_url_base and image_format shape the results."""
    fal.latency_s = 0.01
    sub = (await submit_edit(fal_http)).json()
    await poll_fal(fal_http, sub["status_url"])
    url = (await fal_http.get(sub["response_url"])).json()["images"][0]["url"]
    fal.expire_outputs()
    assert (await plain_http.get(url)).status_code == 404

    fal.next_behaviours.append({"output_url_base": "http://10.0.0.1/out", "image_format": "JPEG"})
    sub = (await submit_edit(fal_http)).json()
    await poll_fal(fal_http, sub["status_url"])
    image = (await fal_http.get(sub["response_url"])).json()["images"][0]
    assert image["url"].startswith("http://10.0.0.1/out/")
    assert image["url"].endswith(".jpg")
    assert image["content_type"] == "image/jpeg"


async def test_fal_everything_received(fal: FakeFal, fal_http: httpx.AsyncClient) -> None:
    """everything_received holds the paths, headers and bodies the fake got."""
    uri = data_uri(make_image())
    sub = (
        await fal_http.post(
            f"/{EDIT_APP}/edit",
            json={"prompt": "marker-prompt-42", "image_urls": [uri]},
            headers={"X-Trace": "trace-77"},
        )
    ).json()
    await fal_http.get(sub["status_url"], params={"logs": "1"})
    seen = fal.everything_received()
    for part in (f"/{EDIT_APP}/edit", "trace-77", "marker-prompt-42", uri, "logs=1", KEY):
        assert part.encode() in seen
    assert b"123456:ABC-telegram-token" not in seen


async def test_fal_client_library_parses_the_fake(
    fal: FakeFal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal-client 1.0.3, pointed at the fake, submits, polls and reads the result."""
    import fal_client
    import fal_client.client

    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{fal.url}/")
    client = fal_client.AsyncClient(key=KEY)
    try:
        handle = await client.submit(
            EDIT_APP, {"prompt": "x", "image_urls": [data_uri(make_image())]}, path="edit"
        )
        async with asyncio.timeout(3):
            result = await handle.get()
        assert result["images"][0]["url"].startswith(f"{fal.url}/files/")
        assert isinstance(await handle.status(), fal_client.Completed)
    finally:
        await (await client._client).aclose()
    assert fal.submits[0].path == f"/{EDIT_APP}/edit"


async def test_fal_standalone_runner() -> None:
    """`python -m tests.fakes.fal_api --port 0` prints its URL and serves the queue."""
    code = await run_standalone("tests.fakes.fal_api", f"/{EDIT_APP}/requests/nope/status", "")
    assert code == 401

"""network.proxy and network.ca_file: the real bot's traffic through a real proxy on 127.0.0.1.

The API fakes are reached by names only the proxy can resolve (`api.telegram.test` etc.: the
test process refuses to resolve any non-loopback name), so a call that skipped the proxy could
not have succeeded at all. Output downloads come from a CDN fake on a port of its own.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import trustme
from telegram.error import NetworkError

from imagebot.botapi import AiohttpBotRequest
from imagebot.config import Settings
from imagebot.network import Network
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, SettingsFactory, running
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.proxy import FakeCdn, FakeProxy
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import rows

CHAT = updates.DEFAULT_CHAT_ID
TG_HOST, REPLICATE_HOST, FAL_HOST = "api.telegram.test", "api.replicate.test", "queue.fal.test"
NAMES = {TG_HOST: "127.0.0.1", REPLICATE_HOST: "127.0.0.1", FAL_HOST: "127.0.0.1"}
# what the bot's own (stub) resolver says about output hosts: only cdn.test is loopback
RESOLVED = {
    "cdn.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["10.0.0.1"],
}


async def stub_resolver(host: str, port: int) -> list[str]:
    """The SSRF guard's resolver in these tests: a fixed table, never the network."""
    try:
        return RESOLVED[host]
    except KeyError:
        raise OSError(f"no such host {host}") from None


NOT_ALLOWED = "returned a file I'm not allowed to fetch"


def job_statuses(app: Any) -> list[str]:
    db = str(app.services.settings.storage.database)
    return [str(r["status"]) for r in rows(db)]


def named(fake: Any, host: str) -> str:
    """The fake's URL with its host replaced by a name only the proxy resolves."""
    scheme = "https" if fake.ssl_context is not None else "http"
    return f"{scheme}://{host}:{fake.port}"


def settings_through(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    proxy_url: str,
    **sections: Any,
) -> Settings:
    media = {
        "allowed_hosts": ["127.0.0.1", "cdn.test", "metadata.test", "intranet.test"],
        "allowed_private_networks": ["127.0.0.1/32"],
        **sections.pop("media", {}),
    }
    return make_settings(
        telegram={"api_base_url": named(telegram, TG_HOST)},
        replicate={"base_url": named(replicate, REPLICATE_HOST)},
        fal={"base_url": named(fal, FAL_HOST)},
        network={"proxy": proxy_url, **sections.pop("network", {})},
        media=media,
        **sections,
    )


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    async with FakeProxy(names=NAMES) as fake:
        yield fake


@pytest.fixture
async def cdn(replicate: FakeReplicate, fal: FakeFal) -> AsyncIterator[FakeCdn]:
    fake = FakeCdn(replicate, fal)
    async with fake:
        yield fake


def at(host: str, fake: Any) -> str:
    return f"{host}:{fake.port}"


async def generate_and_edit(telegram: FakeTelegram) -> None:
    """A /generate and a captioned /edit, each answered with a photo."""
    file_id = telegram.add_file(make_image(64, 48))
    telegram.push_update(updates.command("/generate a red fox"))
    await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=20)
    telegram.push_update(
        updates.photo_message(file_id, width=64, height=48, caption="/edit make it blue")
    )
    await wait_until(lambda: len(telegram.photos(CHAT)) == 2, within=20)


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_api_calls_go_through_the_proxy_downloads_do_not(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    proxy: FakeProxy,
    cdn: FakeCdn,
    scheme: str,
) -> None:
    """With network.proxy set, /generate and /edit work end to end, the proxy was asked for the
    Bot API, Replicate and fal hosts (which only it can resolve), and the outputs were
    downloaded straight from the CDN, not through it (media.via_proxy is off)."""
    replicate.output_url_base = fal.output_url_base = f"{cdn.url}/files"
    settings = settings_through(make_settings, telegram, replicate, fal, proxy.url(scheme))
    async with running(settings, stub_resolver):
        await generate_and_edit(telegram)

    assert proxy.saw(at(TG_HOST, telegram))
    assert proxy.saw(at(REPLICATE_HOST, replicate))
    assert proxy.saw(at(FAL_HOST, fal))
    assert set(proxy.protocols) == {"socks5" if scheme == "socks5" else "connect"}
    assert len(cdn.downloads) == 2  # both outputs, fetched directly
    assert not any(t.endswith(f":{cdn.port}") for t in proxy.targets)
    assert proxy.refused == []
    # the edit's input photo came through the proxy too (getFile content is Bot API traffic)
    assert len(telegram.file_downloads) == 1


async def test_downloads_go_through_the_proxy_with_via_proxy(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    proxy: FakeProxy,
    cdn: FakeCdn,
) -> None:
    """With media.via_proxy = true the output downloads use the proxy as well, and the tunnel
    goes to the address the bot vetted itself (cdn.test → 127.0.0.1), not to a name the proxy
    would resolve."""
    replicate.output_url_base = fal.output_url_base = f"http://cdn.test:{cdn.port}/files"
    settings = settings_through(
        make_settings, telegram, replicate, fal, proxy.url("socks5"), media={"via_proxy": True}
    )
    async with running(settings, stub_resolver):
        await generate_and_edit(telegram)

    assert proxy.saw(at("127.0.0.1", cdn))
    assert not any(t.startswith("cdn.test") for t in proxy.targets)
    assert len(cdn.downloads) == 2
    assert cdn.calls[0].headers["Host"] == f"cdn.test:{cdn.port}"
    assert proxy.saw(at(TG_HOST, telegram)) and proxy.saw(at(REPLICATE_HOST, replicate))


@pytest.mark.parametrize("host", ["metadata.test", "intranet.test", "169.254.169.254"])
async def test_private_output_refused_before_the_proxy_is_asked(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    proxy: FakeProxy,
    host: str,
) -> None:
    """With via_proxy on, an output URL that resolves (locally) to a private or metadata
    address fails the job with a message, and the proxy is never asked to connect there."""
    replicate.output_url_base = f"https://{host}/files"
    settings = settings_through(
        make_settings,
        telegram,
        replicate,
        fal,
        proxy.url("socks5"),
        media={"via_proxy": True, "allowed_hosts": [host]},
    )
    async with running(settings, stub_resolver) as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: job_statuses(app) == ["failed"], within=20)
        await wait_until(lambda: any(NOT_ALLOWED in t for t in telegram.texts(CHAT)))

    assert telegram.photos(CHAT) == []
    assert proxy.saw(at(REPLICATE_HOST, replicate))  # the prediction itself was made
    for target in proxy.targets:
        assert not target.startswith((host, "169.254.", "10.")), target
    assert proxy.refused == []
    assert replicate.calls_of("file") == []


async def test_proxy_credentials_come_from_imagebot_proxy_url(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy that wants a login gets the user and password from IMAGEBOT_PROXY_URL (the
    secret), on both stacks, while config.toml names the proxy without them."""
    async with FakeProxy(username="bot", password="p@ss:word", names=NAMES) as proxy:
        monkeypatch.setenv(
            "IMAGEBOT_PROXY_URL", f"socks5://bot:p%40ss%3Aword@127.0.0.1:{proxy.port}"
        )
        settings = settings_through(make_settings, telegram, replicate, fal, proxy.url("socks5"))
        assert "p@ss:word" in settings.secret_values()  # the log redactor masks it
        async with running(settings, stub_resolver):
            telegram.push_update(updates.command("/generate a red fox"))
            await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=20)

    assert proxy.credentials and set(proxy.credentials) == {("bot", "p@ss:word")}
    assert proxy.saw(at(TG_HOST, telegram)) and proxy.saw(at(REPLICATE_HOST, replicate))


# -- network.ca_file ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "inspecting-proxy-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", TG_HOST, REPLICATE_HOST, FAL_HOST, "cdn.test").configure_cert(
        context
    )
    return context


async def test_tls_through_the_proxy_trusts_network_ca_file(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    proxy: FakeProxy,
    ca: trustme.CA,
    ca_file: Path,
) -> None:
    """Bot API, Replicate, fal and the CDN all on https with certificates from the operator's
    own CA: with network.ca_file naming it, /generate and /edit work through the proxy, and
    the CDN download (via the proxy, to the vetted address) checks cdn.test's certificate."""
    context = server_context(ca)
    for fake in (telegram, replicate, fal):
        await fake.stop()
        fake.ssl_context = context
        await fake.start()
    cdn = FakeCdn(replicate, fal)
    cdn.ssl_context = context
    async with cdn:
        replicate.output_url_base = fal.output_url_base = f"https://cdn.test:{cdn.port}/files"
        settings = settings_through(
            make_settings,
            telegram,
            replicate,
            fal,
            proxy.url("http"),
            network={"ca_file": str(ca_file)},
            media={"via_proxy": True},
        )
        async with running(settings, stub_resolver):
            await generate_and_edit(telegram)

    assert len(cdn.downloads) == 2
    assert proxy.saw(at("127.0.0.1", cdn)) and proxy.saw(at(TG_HOST, telegram))


async def fetch_both(network: Network, url: str) -> list[str]:
    """GET `url` with an httpx client and an aiohttp session built from `network`: what each
    got (a status, or the kind of failure)."""
    results = []
    async with httpx.AsyncClient(transport=network.httpx_transport(), trust_env=False) as client:
        try:
            results.append(str((await client.get(url)).status_code))
        except httpx.ConnectError as exc:
            results.append("CERTIFICATE_VERIFY_FAILED" if "CERTIFICATE" in str(exc) else repr(exc))
    async with aiohttp.ClientSession(
        connector=network.aiohttp_connector(4), trust_env=False
    ) as session:
        try:
            async with session.get(url) as resp:
                results.append(str(resp.status))
        except aiohttp.ClientConnectorCertificateError:
            results.append("CERTIFICATE_VERIFY_FAILED")
    return results


async def test_own_ca_is_trusted_only_when_configured(
    make_settings: SettingsFactory,
    replicate: FakeReplicate,
    ca: trustme.CA,
    ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server with a certificate from a private CA is refused by both client stacks by
    default, and accepted with network.ca_file or with SSL_CERT_FILE naming that CA."""
    await replicate.stop()
    replicate.ssl_context = server_context(ca)
    await replicate.start()
    url = f"{replicate.url}/v1/predictions/nope"

    default = Network.from_settings(make_settings())
    with_ca_file = Network.from_settings(make_settings(network={"ca_file": str(ca_file)}))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    with_env = Network.from_settings(make_settings())

    assert await fetch_both(default, url) == ["CERTIFICATE_VERIFY_FAILED"] * 2
    assert await fetch_both(with_ca_file, url) == ["401", "401"]  # TLS fine, no token sent
    assert await fetch_both(with_env, url) == ["401", "401"]


# -- start-up refusals (the real command line) ---------------------------------------------


def start(tmp_path: Path, config: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m imagebot run --config <file>` with this config; the vendors are unreachable
    loopback ports, so nothing can leave the machine even if start-up went on."""
    path = tmp_path / "config.toml"
    path.write_text(
        "[telegram]\napi_base_url = 'http://127.0.0.1:9'\n"
        "[replicate]\nbase_url = 'http://127.0.0.1:9'\n"
        "[fal]\nbase_url = 'http://127.0.0.1:9'\n"
        f"[storage]\ndatabase = '{tmp_path / 'db.sqlite'}'\n" + config
    )
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IMAGEBOT_") and k != "SSL_CERT_FILE"
    }
    environ.update(
        TELEGRAM_BOT_TOKEN=BOT_TOKEN, REPLICATE_API_TOKEN=REPLICATE_TOKEN, FAL_KEY=FAL_KEY, **env
    )
    return subprocess.run(
        [sys.executable, "-m", "imagebot", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("proxy", "problem"),
    [
        ("ftp://127.0.0.1:1080", "must start with one of"),
        ("socks5://:1080", "has no host"),
        ("socks5://127.0.0.1", "needs a port"),
        ("https://proxy.example:3128", "must start with one of"),
        ("socks5://bot:hunter2secret@127.0.0.1:1080", "IMAGEBOT_PROXY_URL"),
    ],
)
def test_bad_proxy_url_stops_start_up(tmp_path: Path, proxy: str, problem: str) -> None:
    """A proxy URL with an unknown scheme, no host, no port or a password in config.toml stops
    start-up with exit 2 and one line naming network.proxy (never echoing the password)."""
    result = start(tmp_path, f"[network]\nproxy = '{proxy}'\n")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("imagebot: configuration error: network.proxy")
    assert problem in line
    assert "hunter2secret" not in result.stderr + result.stdout


def test_bad_imagebot_proxy_url_names_the_variable(tmp_path: Path) -> None:
    """IMAGEBOT_PROXY_URL that is not a proxy URL, or names another proxy than network.proxy,
    stops start-up naming IMAGEBOT_PROXY_URL and never printing its password."""
    bad = start(tmp_path, "", IMAGEBOT_PROXY_URL="socks5://bot:hunter2secret@:1080")
    other = start(
        tmp_path,
        "[network]\nproxy = 'socks5://127.0.0.1:1080'\n",
        IMAGEBOT_PROXY_URL="socks5://bot:hunter2secret@127.0.0.1:1081",
    )
    for result in (bad, other):
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("imagebot: configuration error: IMAGEBOT_PROXY_URL")
        assert "hunter2secret" not in result.stderr + result.stdout


@pytest.mark.parametrize("kind", ["missing", "junk", "directory"])
def test_bad_ca_file_stops_start_up(tmp_path: Path, kind: str) -> None:
    """network.ca_file that is missing, not PEM, or a directory stops start-up with exit 2
    naming network.ca_file."""
    path = tmp_path / "ca.pem"
    if kind == "junk":
        path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif kind == "directory":
        path.mkdir()
    result = start(tmp_path, f"[network]\nca_file = '{path}'\n")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("imagebot: configuration error: network.ca_file")


def test_broken_ssl_cert_file_stops_start_up(tmp_path: Path) -> None:
    """SSL_CERT_FILE naming a file that holds no certificate stops start-up with exit 2 and
    one line naming SSL_CERT_FILE."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    result = start(tmp_path, "", SSL_CERT_FILE=str(junk))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("imagebot: configuration error: SSL_CERT_FILE")


async def test_unreachable_or_refusing_proxy_is_a_network_error(
    make_settings: SettingsFactory, telegram: FakeTelegram
) -> None:
    """A proxy nobody listens on, or one that refuses the login, fails a Bot API call as a
    network error naming the proxy (so start-up retries getMe) and a vendor call as a
    connection error (retried like any unreachable vendor)."""
    async with FakeProxy(username="bot", password="right", names=NAMES) as picky:
        closed = FakeProxy()
        await closed.start()
        await closed.stop()  # its port is free again: connections are refused
        url = f"{named(telegram, TG_HOST)}/bot{BOT_TOKEN}/getMe"
        for proxy_url in (closed.url("socks5"), picky.url("socks5"), picky.url("http")):
            network = Network.from_settings(make_settings(network={"proxy": proxy_url}))
            request = AiohttpBotRequest(connector=network.aiohttp_connector)
            await request.initialize()
            try:
                with pytest.raises(NetworkError, match="proxy"):
                    await request.do_request(url, "POST")
            finally:
                await request.shutdown()
            async with httpx.AsyncClient(transport=network.httpx_transport()) as client:
                with pytest.raises(httpx.ConnectError, match="proxy"):
                    await client.get(f"{named(telegram, TG_HOST)}/")
    assert telegram.calls == []


def test_check_config_masks_the_proxy_url(tmp_path: Path) -> None:
    """`imagebot check-config` shows IMAGEBOT_PROXY_URL masked and network.proxy as written."""
    path = tmp_path / "config.toml"
    path.write_text("[network]\nproxy = 'socks5://127.0.0.1:1080'\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    environ.update(
        TELEGRAM_BOT_TOKEN=BOT_TOKEN,
        REPLICATE_API_TOKEN=REPLICATE_TOKEN,
        FAL_KEY=FAL_KEY,
        IMAGEBOT_PROXY_URL="socks5://bot:hunter2secret@127.0.0.1:1080",
    )
    result = subprocess.run(
        [sys.executable, "-m", "imagebot", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["proxy_url"] == "**********"
    assert shown["network"]["proxy"] == "socks5://127.0.0.1:1080"
    assert "hunter2secret" not in result.stdout + result.stderr

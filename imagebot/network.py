"""Outgoing connections in one place: the operator's proxy and CA bundle for every client.

One rule, no exemptions: with a proxy configured (`network.proxy`, or `IMAGEBOT_PROXY_URL`
when the URL carries credentials), every Bot API call (PTB on aiohttp, including getFile
downloads and the Stars answer bot) and every vendor API call (Replicate, fal) opens its TCP
connection through that proxy, whatever the host. Output downloads from the vendors' CDNs use
it only when `media.via_proxy = true`; the SSRF guard still resolves and vets the address
locally first and the tunnel is opened to that vetted address, so the proxy never chooses
where a download goes.

Both stacks use python-socks underneath (aiohttp-socks for aiohttp; a small httpcore network
backend for httpx), so an HTTP proxy gets a CONNECT tunnel for every target (plain http
included) and a SOCKS5 proxy resolves names itself, the same way for both. httpcore still does
the TLS on top of the tunnel, so the `sni_hostname` the SSRF-pinned fetcher sets is honoured
(httpx-socks and httpcore's own HTTP-proxy tunnel both ignore it).

Every client gets one `ssl.SSLContext`: the system's roots, certifi's, `SSL_CERT_FILE` when
set, and `network.ca_file`, so a TLS-inspecting proxy's CA is trusted everywhere at once.
Clients keep `trust_env=False`: the proxy is explicit configuration, never HTTP(S)_PROXY.
"""

from __future__ import annotations

import os
import ssl
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import anyio
import certifi
import httpcore
import httpx
from aiohttp_socks import ProxyConnector
from httpcore._backends.anyio import AnyIOStream
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.anyio.v2 import Proxy

from imagebot.config import Settings, check_ca_bundle
from imagebot.errors import ConfigError

# httpx's own defaults for a client without explicit limits
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
_TYPES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}


@dataclass(frozen=True)
class ProxyConfig:
    """Where the proxy is and how to log in to it (a URL `config.check_proxy_url` accepted)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> ProxyConfig:
        parts = urlsplit(url)
        assert parts.hostname, "validated by config.check_proxy_url"
        assert parts.port, "validated by config.check_proxy_url"
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def display(self) -> str:
        """scheme://host:port, never the credentials (for logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def proxy_type(self) -> ProxyType:
        return _TYPES[self.scheme]

    @property
    def rdns(self) -> bool | None:
        # SOCKS5 hands names to the proxy to resolve (the host may have no DNS of its own);
        # an HTTP CONNECT always names its target.
        return True if self.proxy_type is ProxyType.SOCKS5 else None


def build_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """System roots + certifi + SSL_CERT_FILE (if set) + `ca_file`; ConfigError names a bad one."""
    context = ssl.create_default_context()  # system roots (OpenSSL reads SSL_CERT_FILE too)
    context.load_verify_locations(cafile=certifi.where())
    extra: list[tuple[str, Path]] = []
    cert_file = os.environ.get("SSL_CERT_FILE", "")
    if cert_file:
        extra.append(("SSL_CERT_FILE", Path(cert_file)))
    if ca_file is not None:
        extra.append(("network.ca_file", ca_file))
    for key, path in extra:
        try:
            check_ca_bundle(path)
            context.load_verify_locations(cafile=str(path))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        except (OSError, ssl.SSLError) as exc:  # changed since the settings were checked
            raise ConfigError(key, f"cannot load {path}: {exc}") from None
    return context


class _ProxyBackend(httpcore.AsyncNetworkBackend):
    """httpcore opens every TCP connection through the proxy; TLS stays httpcore's."""

    def __init__(self, proxy: ProxyConfig) -> None:
        self._proxy = proxy

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        p = self._proxy
        proxy = Proxy.create(
            proxy_type=p.proxy_type,
            host=p.host,
            port=p.port,
            username=p.username,
            password=p.password,
            rdns=p.rdns,
        )
        try:
            stream = await proxy.connect(host, port, timeout=timeout)
        except ProxyTimeoutError as exc:
            raise httpcore.ConnectTimeout(f"proxy {p.display}: {exc}") from exc
        except (ProxyConnectionError, ProxyError, OSError) as exc:
            raise httpcore.ConnectError(f"proxy {p.display}: {exc}") from exc
        return AnyIOStream(stream.anyio_stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets do not go through a proxy")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's own transport with our SSL context, and the proxy backend when there is one."""

    def __init__(
        self, context: ssl.SSLContext, proxy: ProxyConfig | None, limits: httpx.Limits
    ) -> None:
        super().__init__(verify=context, trust_env=False, limits=limits)
        if proxy is not None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=context,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=_ProxyBackend(proxy),
            )


class Network:
    """The proxy and SSL context every outgoing client of one bot is built with."""

    def __init__(self, proxy: ProxyConfig | None, ssl_context: ssl.SSLContext) -> None:
        self.proxy = proxy
        self.ssl_context = ssl_context

    @classmethod
    def from_settings(cls, settings: Settings) -> Network:
        url = settings.effective_proxy
        proxy = ProxyConfig.from_url(url) if url else None
        return cls(proxy, build_ssl_context(settings.network.ca_file))

    def httpx_transport(
        self, *, proxied: bool = True, limits: httpx.Limits | None = None
    ) -> httpx.AsyncBaseTransport:
        """A transport for an httpx client: through the proxy unless `proxied=False`."""
        proxy = self.proxy if proxied else None
        return _Transport(self.ssl_context, proxy, limits or _DEFAULT_LIMITS)

    def aiohttp_connector(self, limit: int) -> aiohttp.TCPConnector:
        """A connector for an aiohttp session (the Bot API): always through the proxy."""
        p = self.proxy
        if p is None:
            return aiohttp.TCPConnector(limit=limit, ssl=self.ssl_context)
        return ProxyConnector(
            host=p.host,
            port=p.port,
            proxy_type=p.proxy_type,
            username=p.username,
            password=p.password,
            rdns=p.rdns,
            limit=limit,
            ssl=self.ssl_context,
        )

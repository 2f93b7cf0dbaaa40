"""SSRF guard: which URLs and addresses the output fetcher may connect to.

Two checks, as synapse does: the host must be on the allowlist, and every address the name
resolves to must be public (not loopback, private, link-local, CGNAT, multicast, reserved,
IPv4-mapped or 6to4-wrapped versions of those), unless the operator listed the network in
`media.allowed_private_networks`. Plain http is accepted only towards such listed networks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

from imagebot.errors import BlockedAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64 (RFC 6052 well-known prefix, RFC 8215 local-use prefix): the last 32 bits are an IPv4
# address a DNS64 resolver wrapped, so they decide, not the IPv6 prefix.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the OS resolver (getaddrinfo), every address family."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    # IPv4-compatible ::a.b.c.d (deprecated, but some stacks still route it)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return is_public(inner)
        if ip.is_site_local:  # fec0::/10, deprecated but still private where it is used
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


@dataclass(frozen=True)
class Target:
    """A vetted hop: where to connect, and what to call the host in Host/SNI."""

    url: httpx.URL  # the URL with its host replaced by the vetted IP
    host: str
    address: str


class AddressGuard:
    """Decides whether a URL may be fetched."""

    def __init__(
        self,
        allowed_hosts: Iterable[str],
        allowed_private_networks: Iterable[str] = (),
        resolver: Resolver = system_resolver,
    ) -> None:
        self._exact: set[str] = set()
        self._suffixes: list[str] = []
        for entry in allowed_hosts:
            entry = entry.strip().lower().rstrip(".")
            if entry.startswith("*."):
                self._suffixes.append(entry[1:])
            elif entry:
                self._exact.add(_normalise_host(entry))
        self._private = [ipaddress.ip_network(n, strict=False) for n in allowed_private_networks]
        self._resolve = resolver

    def host_allowed(self, host: str) -> bool:
        host = _normalise_host(host)
        return host in self._exact or any(host.endswith(s) for s in self._suffixes)

    def address_allowed(self, ip: IPAddress) -> bool:
        return self._in_private_allowlist(ip) or is_public(ip)

    def _in_private_allowlist(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._private)

    async def vet(self, url: str | httpx.URL) -> Target:
        """Check scheme, host and every resolved address; return where to connect."""
        parsed = httpx.URL(url)
        scheme = parsed.scheme
        if scheme not in ("http", "https"):
            raise BlockedAddress(f"scheme {scheme or '(none)'} is not allowed")
        host = parsed.host
        if not host:
            raise BlockedAddress("URL has no host")
        if parsed.userinfo:
            raise BlockedAddress("URL carries credentials")
        if not self.host_allowed(host):
            raise BlockedAddress(f"host {host} is not on media.allowed_hosts")
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(_normalise_host(host))]
        except ValueError:
            try:
                resolved = await self._resolve(host, port)
            except OSError as exc:
                raise BlockedAddress(f"cannot resolve {host}: {exc}") from exc
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
        if not addresses:
            raise BlockedAddress(f"{host} resolves to nothing")
        for ip in addresses:
            if not self.address_allowed(ip):
                raise BlockedAddress(f"{host} resolves to non-public address {ip}")
        if scheme == "http" and not all(self._in_private_allowlist(ip) for ip in addresses):
            raise BlockedAddress("plain http is only allowed to media.allowed_private_networks")
        chosen = str(addresses[0])
        return Target(parsed.copy_with(host=chosen), host, chosen)


def _normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host

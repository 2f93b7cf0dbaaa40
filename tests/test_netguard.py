"""AddressGuard verdicts, decided from the URL and a stub resolver: nothing here opens a socket."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from imagebot.errors import BlockedAddress
from imagebot.netguard import AddressGuard, is_public

PRIVATE = [
    "169.254.169.254",  # cloud metadata
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "127.0.0.1",
    "0.0.0.0",  # noqa: S104 (an address under test, not a bind)
    "255.255.255.255",
    "198.18.0.1",  # benchmarking
    "240.0.0.1",  # reserved
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "fd00::1",  # unique local
    "fe80::1",  # link-local
    "fec0::1",  # site-local (deprecated)
    "::1",
    "::",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "ff02::1",  # multicast
    "2001:db8::1",  # documentation
]
PUBLIC = ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8", "64:ff9b::5db8:d822"]


def stub(answers: dict[str, list[str]]) -> Any:
    """A resolver answering from a table (and failing like getaddrinfo for unknown names)."""
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host not in answers:
            raise OSError(f"unknown host {host}")
        return answers[host]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


def guard_for(
    hosts: list[str], networks: tuple[str, ...] | list[str] = (), answers: Any = None
) -> AddressGuard:
    return AddressGuard(hosts, networks, stub(answers or {}))


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_special_addresses_are_not_public(address: str) -> None:
    """Loopback, private, link-local, CGNAT, multicast, reserved and wrapped forms are refused."""
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_public(address: str) -> None:
    """Globally routable unicast addresses (and NAT64 of a public one) pass the filter."""
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PRIVATE)
async def test_allowlisted_literal_with_private_address_is_refused(address: str) -> None:
    """Even with the literal on the host allowlist, a non-public address is refused over https."""
    host = f"[{address}]" if ":" in address else address
    guard = guard_for([address])
    with pytest.raises(BlockedAddress) as caught:
        await guard.vet(f"https://{host}/latest/meta-data/")
    assert caught.value.code == "blocked_address"


@pytest.mark.parametrize("address", PUBLIC)
async def test_public_literal_on_allowlist_is_allowed(address: str) -> None:
    """A public address that is on the allowlist is vetted and dialled as itself."""
    host = f"[{address}]" if ":" in address else address
    target = await guard_for([address]).vet(f"https://{host}/out.png")
    assert ipaddress.ip_address(target.address) == ipaddress.ip_address(address)


async def test_public_hostname_connects_to_the_vetted_address() -> None:
    """A name on the allowlist resolving to a public address: the URL is pinned to that IP and
    the name is kept for Host/SNI, so a second DNS answer cannot redirect the connection."""
    guard = guard_for(["*.replicate.delivery"], answers={"pbxt.replicate.delivery": ["8.8.8.8"]})
    target = await guard.vet("https://pbxt.replicate.delivery/abc/out-0.webp")
    assert target.host == "pbxt.replicate.delivery"
    assert target.address == "8.8.8.8"
    assert target.url.host == "8.8.8.8"
    assert target.url.path == "/abc/out-0.webp"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("pbxt.replicate.delivery", True),
        ("a.b.replicate.delivery", True),
        ("PBXT.Replicate.Delivery", True),
        ("pbxt.replicate.delivery.", True),
        ("replicate.delivery", False),  # the bare name is only allowed if listed on its own
        ("evilreplicate.delivery", False),
        ("replicate.delivery.evil.com", False),
        ("v3.fal.media", False),
    ],
)
def test_wildcard_host_allowlist(host: str, allowed: bool) -> None:
    """`*.replicate.delivery` admits its subdomains and nothing that merely ends alike."""
    assert guard_for(["*.replicate.delivery"]).host_allowed(host) is allowed


async def test_host_not_on_allowlist_is_refused_before_resolving() -> None:
    """A host outside the allowlist is refused without even asking DNS."""
    resolver = stub({"evil.example": ["8.8.8.8"]})
    guard = AddressGuard(["*.fal.media"], (), resolver)
    with pytest.raises(BlockedAddress, match="allowed_hosts"):
        await guard.vet("https://evil.example/x.png")
    assert resolver.asked == []  # type: ignore[attr-defined]


async def test_dns_rebinding_one_private_answer_refuses() -> None:
    """A name resolving to one public and one private address is refused (DNS rebinding)."""
    answers = {"v3.fal.media": ["8.8.8.8", "10.0.0.1"]}
    with pytest.raises(BlockedAddress, match=r"10\.0\.0\.1"):
        await guard_for(["*.fal.media"], answers=answers).vet("https://v3.fal.media/x.png")
    answers = {"v3.fal.media": ["2606:2800:220:1::1", "::ffff:127.0.0.1"]}
    with pytest.raises(BlockedAddress):
        await guard_for(["*.fal.media"], answers=answers).vet("https://v3.fal.media/x.png")


async def test_name_that_does_not_resolve_is_refused() -> None:
    """A resolver error or an empty answer is a refusal, not a crash."""
    with pytest.raises(BlockedAddress, match="cannot resolve"):
        await guard_for(["*.fal.media"]).vet("https://v3.fal.media/x.png")
    with pytest.raises(BlockedAddress, match="resolves to nothing"):
        await guard_for(["*.fal.media"], answers={"v3.fal.media": []}).vet(
            "https://v3.fal.media/x.png"
        )


async def test_plain_http_needs_an_allowed_private_network() -> None:
    """http:// to a public address is refused; it is accepted only towards a listed network."""
    public = guard_for(["v3.fal.media"], answers={"v3.fal.media": ["8.8.8.8"]})
    with pytest.raises(BlockedAddress, match="plain http"):
        await public.vet("http://v3.fal.media/x.png")
    listed = guard_for(
        ["outputs.lan"], ["192.168.7.0/24"], answers={"outputs.lan": ["192.168.7.20"]}
    )
    target = await listed.vet("http://outputs.lan:8080/x.png")
    assert (target.address, target.url.port) == ("192.168.7.20", 8080)
    # one answer inside the listed network, one outside: refused
    mixed = guard_for(
        ["outputs.lan"], ["192.168.7.0/24"], answers={"outputs.lan": ["192.168.7.20", "8.8.8.8"]}
    )
    with pytest.raises(BlockedAddress):
        await mixed.vet("http://outputs.lan/x.png")


async def test_allowed_private_network_does_not_open_its_neighbours() -> None:
    """Listing 127.0.0.2/32 allows that address only, not 127.0.0.1 or its IPv4-mapped form."""
    guard = guard_for(["127.0.0.2", "127.0.0.1", "::ffff:127.0.0.2"], ["127.0.0.2/32"])
    assert (await guard.vet("http://127.0.0.2:81/x")).address == "127.0.0.2"
    for url in ("http://127.0.0.1:81/x", "http://[::ffff:127.0.0.2]:81/x"):
        with pytest.raises(BlockedAddress):
            await guard.vet(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pass@v3.fal.media/x.png",
        "https://user@v3.fal.media/x.png",
        "https://v3.fal.media:443@127.0.0.1/x.png",
    ],
)
async def test_urls_with_userinfo_are_refused(url: str) -> None:
    """Credentials in a URL (or the user@host trick) are refused."""
    guard = guard_for(["v3.fal.media", "127.0.0.1"], answers={"v3.fal.media": ["8.8.8.8"]})
    with pytest.raises(BlockedAddress):
        await guard.vet(url)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://v3.fal.media/x.png",
        "gopher://v3.fal.media:70/_x",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//v3.fal.media/x.png",
        "v3.fal.media/x.png",
    ],
)
async def test_non_http_schemes_are_refused(url: str) -> None:
    """Only http and https are fetched: file:, ftp:, gopher:, data: and relative URLs are not."""
    guard = guard_for(["v3.fal.media"], answers={"v3.fal.media": ["8.8.8.8"]})
    with pytest.raises(BlockedAddress):
        await guard.vet(url)


async def test_resolver_scoped_addresses_are_checked_without_zone() -> None:
    """A link-local answer with a zone id (fe80::1%eth0) is recognised and refused."""
    guard = guard_for(["v3.fal.media"], answers={"v3.fal.media": ["fe80::1%eth0"]})
    with pytest.raises(BlockedAddress, match="fe80::1"):
        await guard.vet("https://v3.fal.media/x.png")

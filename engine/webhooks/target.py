"""Where a webhook may be sent: SSRF rules. A URL's host is resolved and every address
checked before connecting (and the connection goes to the address checked, so a second
DNS answer cannot swap it): loopback, private, link-local (cloud metadata), CGNAT,
multicast, reserved and unspecified addresses are refused unless ``webhooks.allow``
lists them (a test's receiver on 127.0.0.1, a receiver on the private network).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import trio

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")
MAX_URL_CHARS: Final = 2048


class Refused(Exception):
    """This URL or address may not be called (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str  # http or https
    host: str
    port: int
    path: str  # with the query


def parse_url(url: str) -> Target:
    if len(url) > MAX_URL_CHARS:
        raise Refused(f"at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused("the URL must be http:// or https://")
    if not parts.hostname or parts.username or parts.password:
        raise Refused("the URL needs a host and no user:password")
    if parts.fragment:
        raise Refused("the URL may not have a #fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("the URL's port is not a number from 1 to 65535") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path)


def forbidden(ip: IPAddress) -> str | None:
    """Why an address may not be called by default; None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return forbidden(ip.ipv4_mapped)
    for test, why in (
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local (cloud metadata lives there)"),
        (ip.is_private, "private"),
        (ip.is_multicast, "multicast"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_reserved, "reserved"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "shared address space"),
    ):
        if test:
            return why
    return None


def parse_allow(entries: list[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries]


def check_address(ip: IPAddress, allow: list[IPNetwork]) -> None:
    why = forbidden(ip)
    if why and not any(ip in net for net in allow):
        raise Refused(f"{ip} is a {why} address (webhooks.allow lists exceptions)")


async def resolve(target: Target, allow: list[IPNetwork]) -> IPAddress:
    """The first address of the host that may be called; Refused if none."""
    try:
        infos = await trio.socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(f"cannot resolve {target.host}: {exc}") from None
    reasons = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        try:
            check_address(ip, allow)
        except Refused as exc:
            reasons.append(str(exc))
            continue
        return ip
    raise Refused("; ".join(reasons) or f"{target.host} has no address")

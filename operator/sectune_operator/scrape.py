"""Reading what the operator's pods report: a bounded, redirect-free GET of a pod's metrics.

Training pods and server pods run images a tenant may choose, so the operator reads only a
pod's own unicast IP, follows no redirects (to a cloud metadata address, say) and stops after
`READ_LIMIT` bytes.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from typing import Any

READ_LIMIT = 256 << 10
"""A server's or trainer's /metrics is a few KB; a pod answering more is cut off."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


OPENER = urllib.request.build_opener(_NoRedirects)


def pod_ip(pod: dict[str, Any]) -> str | None:
    """The pod's IP when it is a plain unicast address (never loopback, link-local such as
    the cloud metadata address, multicast, unspecified or reserved, nor one of those written
    as an IPv4-mapped, 6to4 or NAT64 IPv6 address, nor a cloud's IPv6 metadata address),
    bracketed for IPv6 URLs."""
    try:
        address = ipaddress.ip_address((pod.get("status") or {}).get("podIP") or "")
    except ValueError:
        return None
    if any(_unsafe(a) for a in _forms(address)):
        return None
    return str(address) if address.version == 4 else f"[{address}]"


UNSAFE_V6 = (
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS instance metadata over IPv6
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64: reaches any IPv4 address
)


def _forms(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Any]:
    """The address and every IPv4 address it also stands for."""
    forms: list[Any] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        forms += [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    return forms


def _unsafe(address: Any) -> bool:
    return bool(
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or any(address in network for network in UNSAFE_V6 if network.version == address.version)
    )


def fetch_text(url: str, timeout: float = 1.0) -> str | None:
    """The body at `url`, or None when unreachable, redirected or larger than READ_LIMIT."""
    try:
        with OPENER.open(url, timeout=timeout) as response:
            body = response.read(READ_LIMIT + 1)
    except (OSError, ValueError):
        return None
    if len(body) > READ_LIMIT:
        return None
    return str(body.decode(errors="replace"))

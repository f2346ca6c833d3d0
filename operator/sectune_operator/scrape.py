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
    the cloud metadata address, multicast or unspecified), bracketed for IPv6 URLs."""
    try:
        address = ipaddress.ip_address((pod.get("status") or {}).get("podIP") or "")
    except ValueError:
        return None
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
    ):
        return None
    return str(address) if address.version == 4 else f"[{address}]"


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

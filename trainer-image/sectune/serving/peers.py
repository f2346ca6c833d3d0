"""The other replicas of a deployment, for verdicts that reach a replica which did not answer.

Each replica holds the answers it gave (sectune.serving.feedback). With more than one replica
behind a Service, an analyst's `POST /v1/feedback` can land on any of them, so an answer's id
names the replica that holds it: after the id's prefix come 8 hex digits of the sha256 of the
replica's address (`host:port`), not the address itself, then the random part. A replica that
does not hold an id looks the tag up among its peers and forwards the request there, once, with
the caller's own Authorization: the peer authenticates, scopes and rate-limits it as its own.

Peers are the addresses of the deployment's headless Service (every replica, ready or not;
resolved again every few seconds) or a fixed list (`sectune serve --peers`). A client cannot
point a replica anywhere else: the id only selects among those addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from dataclasses import dataclass, field

TAG_CHARS = 8
FORWARDED_HEADER = "X-Sectune-Forwarded-By"
"""Set on a forwarded verdict: the peer answers it itself, never forwards it again."""
RESOLVE_EVERY = 5.0


def tag(address: str) -> str:
    """The replica tag ids carry: 8 hex digits of the address' sha256."""
    return hashlib.sha256(address.encode()).hexdigest()[:TAG_CHARS]


def id_tag(answer_id: str) -> str:
    """The tag in an answer id (`<prefix>-<tag><random>`); empty when it has none."""
    _, _, rest = answer_id.rpartition("-")
    return rest[:TAG_CHARS] if len(rest) > TAG_CHARS else ""


@dataclass
class Peers:
    """This replica's address and how to find the others."""

    own: str
    """host:port the others reach this replica at (in a pod: $SECTUNE_POD_IP and the port)."""
    service: str | None = None
    """A headless Service's DNS name whose addresses are every replica (A/AAAA records)."""
    port: int = 8000
    """The replicas' API port (with `service`)."""
    fixed: tuple[str, ...] = ()
    """host:port of every replica, when there is no Service."""
    _found: tuple[float, dict[str, str]] = field(default=(0.0, {}), repr=False)

    @property
    def own_tag(self) -> str:
        return tag(self.own)

    async def addresses(self) -> list[str]:
        if not self.service:
            return list(self.fixed)
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.service, self.port, type=socket.SOCK_STREAM
        )
        hosts = sorted({str(info[4][0]) for info in infos})
        return [f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}" for h in hosts]

    async def holder(self, answer_id: str) -> str | None:
        """The peer (host:port) whose tag the id carries; None for this replica, an id without
        a tag, or a tag no current peer has (that replica is gone, and its answers with it)."""
        wanted = id_tag(answer_id)
        if not wanted or wanted == self.own_tag:
            return None
        at, found = self._found
        if wanted not in found and time.monotonic() - at > RESOLVE_EVERY:
            try:
                found = {tag(a): a for a in await self.addresses() if a != self.own}
            except OSError:
                found = {}
            self._found = (time.monotonic(), found)
        return found.get(wanted)

"""Who may start a request now: the server's limit on requests in flight, each API key's own
limit, and each key's request rate. Decided before a request's text is templated or
tokenized, so a caller over its share costs the server next to nothing.

Limits per key come from the keys file (`concurrency=N`, `rate=R` per second); a key without
them gets the server's `max_in_flight_per_key` and no rate limit. A server without keys has
one caller and only the server-wide limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sectune.serving.auth import ApiKey


class Refused(Exception):
    """Not admitted now; the message says which limit and when to retry."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Admission:
    max_in_flight: int
    max_in_flight_per_key: int
    in_flight: int = 0
    by_key: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def enter(self, caller: ApiKey | None, now: float | None = None) -> str:
        """Take a slot for `caller`'s request and return its tenant name; Refused when a
        limit is reached (nothing taken). Only called on the event loop: no lock."""
        tenant = caller.id if caller is not None else ""
        if self.in_flight >= self.max_in_flight:
            raise Refused("the server is at its request limit; retry shortly")
        if caller is not None:
            limit = caller.concurrency or self.max_in_flight_per_key
            if self.by_key.get(tenant, 0) >= limit:
                raise Refused(
                    f"API key {tenant!r} has {limit} requests in flight, its limit; "
                    "wait for one to finish"
                )
            if caller.rate is not None:
                self._spend(tenant, caller.rate, time.monotonic() if now is None else now)
        self.in_flight += 1
        self.by_key[tenant] = self.by_key.get(tenant, 0) + 1
        return tenant

    def leave(self, tenant: str) -> None:
        self.in_flight -= 1
        left = self.by_key.get(tenant, 1) - 1
        if left:
            self.by_key[tenant] = left
        else:
            self.by_key.pop(tenant, None)

    def _spend(self, tenant: str, rate: float, now: float) -> None:
        """A token bucket of `rate` requests a second, holding up to one second's worth."""
        burst = max(rate, 1.0)
        bucket = self._buckets.setdefault(tenant, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise Refused(
                f"API key {tenant!r} is over its rate of {rate:g} requests a second",
                retry_after=max(1, round((1 - bucket.tokens) / rate)),
            )
        bucket.tokens -= 1

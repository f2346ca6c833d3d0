"""API keys of `sectune serve`: who may call the API, which adapters each caller may use, and
the audit trail of what each caller did.

The keys file (`--api-keys-file`, or the file an AdapterDeployment mounts from its Secret) has
one key per line:

    # comment lines and blank lines are ignored
    <key-id> <key> [<adapter>,<adapter>…] [concurrency=N] [rate=R]

`key-id` names the caller in the access log and metrics (the key itself is never logged);
the optional third column limits the key to those adapters (others answer 403; `*`: all of
them); `concurrency=N` caps its requests in flight (default: the server's
`--max-in-flight-per-key`) and `rate=R` its requests a second (default: no cap); a line with a
single word is a key for every adapter, named `key-<line number>`. Keys are kept only as
SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune.config import ManifestError

access_log = logging.getLogger("sectune.access")

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
OPTION = re.compile(r"[a-z_]+=")
MIN_KEY_LENGTH = 16
MAX_KEYS_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes
    adapters: frozenset[str] | None = None
    """Adapters this key may use; None: all of them."""
    concurrency: int | None = None
    """Requests in flight at once; None: the server's per-key default."""
    rate: float | None = None
    """Requests a second; None: no cap."""

    def allows(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


def parse_api_keys(text: str, source: str) -> list[ApiKey]:
    """Keys from the file's text; ManifestError naming the line for anything malformed."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        # options follow the key id and key (a key may itself contain "=")
        options = [w for w in words[2:] if OPTION.match(w)]
        parts = words[:2] + [w for w in words[2:] if not OPTION.match(w)]
        if len(parts) == 1:
            key_id, secret, scope = f"key-{number}", parts[0], None
        elif len(parts) in (2, 3):
            key_id, secret = parts[0], parts[1]
            scope = (
                frozenset(a for a in parts[2].split(",") if a)
                if len(parts) == 3 and parts[2] != "*"
                else None
            )
        else:
            raise ManifestError(
                f"{source}:{number}: expected '<key-id> <key> [<adapter>,…] [concurrency=N] "
                f"[rate=R]', found {len(parts)} words before the options"
            )
        concurrency, rate = _limits(options, f"{source}:{number}")
        if not KEY_ID.fullmatch(key_id):
            raise ManifestError(f"{source}:{number}: key id must be letters, digits, . _ -")
        if len(secret) < MIN_KEY_LENGTH:
            raise ManifestError(
                f"{source}:{number}: the key is shorter than {MIN_KEY_LENGTH} characters; "
                "generate one with `openssl rand -hex 32`"
            )
        if key_id in seen:
            raise ManifestError(f"{source}:{number}: key id {key_id!r} appears twice")
        seen.add(key_id)
        keys.append(
            ApiKey(key_id, hashlib.sha256(secret.encode()).digest(), scope, concurrency, rate)
        )
    if not keys:
        raise ManifestError(
            f"{source}: no API keys in the file (one '<key-id> <key>' per line); "
            "to serve without keys, do not pass a keys file"
        )
    return keys


def _limits(options: list[str], where: str) -> tuple[int | None, float | None]:
    concurrency: int | None = None
    rate: float | None = None
    for option in options:
        name, _, value = option.partition("=")
        try:
            if name == "concurrency":
                concurrency = int(value)
                if not 1 <= concurrency <= 10_000:
                    raise ValueError
            elif name == "rate":
                rate = float(value)
                if not 0 < rate <= 100_000:
                    raise ValueError
            else:
                raise ManifestError(
                    f"{where}: unknown option {name!r}; options are concurrency=N and rate=R"
                )
        except ValueError:
            raise ManifestError(
                f"{where}: {name} must be a positive number (concurrency 1-10000, rate per "
                f"second up to 100000), not {value[:20]!r}"
            ) from None
    return concurrency, rate


def load_api_keys(path: Path) -> list[ApiKey]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the API keys file ({exc.strerror})") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_KEYS_FILE_BYTES} bytes")
    return parse_api_keys(data.decode("utf-8", errors="replace"), str(path))


def _bearer_digest(header: str | None) -> bytes | None:
    """The SHA-256 of the credential an `Authorization: Bearer <credential>` header carries."""
    if not header or not header.startswith("Bearer "):
        return None
    return hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).digest()


def find_key(keys: list[ApiKey], header: str | None) -> ApiKey | None:
    """The key an `Authorization: Bearer <key>` header carries, or None. Every key is compared,
    each in constant time, so timing says nothing about which keys exist."""
    given = _bearer_digest(header)
    if given is None:
        return None
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.digest):
            found = key
    return found


def token_matches(digest: bytes, header: str | None) -> bool:
    """Whether `Authorization: Bearer <token>` carries the token whose SHA-256 is `digest`."""
    given = _bearer_digest(header)
    return given is not None and hmac.compare_digest(given, digest)


def load_token(path: Path) -> bytes:
    """The SHA-256 of the token in `path` (one line, at least MIN_KEY_LENGTH characters)."""
    try:
        with path.open("rb") as handle:
            token = handle.read(4096).decode("utf-8", errors="replace").strip()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if len(token) < MIN_KEY_LENGTH or len(token.split()) != 1:
        raise ManifestError(
            f"{path}: the token must be one word of at least {MIN_KEY_LENGTH} characters"
        )
    return hashlib.sha256(token.encode()).digest()


def audit(request: Any, status: int, seconds: float) -> None:
    """One JSON access-log line for an API request: who (key id, never the key), which model,
    what came of it. Never the body. `request.state` carries caller, served and tokens, and
    `audit` what an endpoint adds (a verdict's prediction id and outcome)."""
    caller: ApiKey | None = request.state.caller
    adapter, version = request.state.served or (None, None)
    prompt, completion = request.state.tokens
    access_log.info(
        json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "key": caller.id if caller else None,
                "client": request.client.host if request.client else None,
                "method": request.method,
                "endpoint": request.url.path,
                "adapter": adapter,
                "version": version or None,
                "status": status,
                "latencyMs": round(seconds * 1000, 1),
                "promptTokens": prompt,
                "completionTokens": completion,
                **getattr(request.state, "audit", {}),
            },
            separators=(",", ":"),
        )
    )

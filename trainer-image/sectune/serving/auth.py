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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from sectune.config import ManifestError
from sectune.serving.http import error_response

access_log = logging.getLogger("sectune.access")
log = logging.getLogger(__name__)

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


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file (or the Secret volume's symlink behind it) is replaced."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@dataclass
class KeysFile:
    """The keys file a server checks callers against (`sectune serve`, the vLLM router)."""

    path: Path
    keys: list[ApiKey] = field(default_factory=list)
    error: str | None = None
    """Why the file, changed since start, cannot be used: every /v1/ request is then refused
    (503) rather than served with revoked keys or none."""
    _stamp: tuple[int, int, int] | None = None

    def load(self) -> None:
        """At start-up: a bad file raises ManifestError (the server does not start)."""
        self._stamp = file_stamp(self.path)
        self.keys = load_api_keys(self.path)

    def reload_if_changed(self) -> None:
        """Read the file again when it changed (a Secret update, a key revoked): the new keys
        take effect on the next request. A file that became unreadable or invalid closes the
        API until it is fixed."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.keys = load_api_keys(self.path)
        except ManifestError as exc:
            self.error = str(exc)
            log.error("API keys not reloaded, refusing every request until fixed: %s", exc)
            return
        self.error = None
        log.info("API keys reloaded from %s: %d keys", self.path, len(self.keys))


def check_caller(keys: KeysFile | None, request: Any) -> JSONResponse | None:
    """Find the caller's key (`request.state.caller`); the answer to give instead when the
    request may not go on (503: the keys file is unusable; 401: no key or an unknown one).
    Without a keys file everyone may."""
    if keys is None:
        return None
    keys.reload_if_changed()
    if keys.error:
        return error_response(503, "the API keys file cannot be read; nothing is served")
    request.state.caller = find_key(keys.keys, request.headers.get("authorization"))
    if request.state.caller is None:
        denied = error_response(401, "missing or unknown API key: send Authorization: Bearer <key>")
        denied.headers["WWW-Authenticate"] = "Bearer"
        return denied
    return None


def may_use(request: Any, adapter: str) -> bool:
    """Whether the caller's key covers `adapter` (a server without keys: everyone may)."""
    caller: ApiKey | None = request.state.caller
    return caller is None or caller.allows(adapter)


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

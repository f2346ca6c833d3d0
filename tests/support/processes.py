"""Start, wait for and stop the real servers the tests run against."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("SECTUNE_CACHE", Path.home() / ".cache" / "sectune"))
TOOL_BIN = CACHE / "bin" / "current"


class ProcessExited(RuntimeError):
    """A server exited while we waited for it; waiting longer cannot help."""


class MissingToolError(RuntimeError):
    """A binary the test tiers need has not been built: a failure, never a skip."""


def tool(name: str) -> str:
    """Path of a pinned tool built by hack/test-env.sh, or of a system one (prometheus)."""
    candidate = TOOL_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise MissingToolError(
        f"{name} is not installed: run `bash hack/test-env.sh` (it builds the pinned "
        f"version into {TOOL_BIN})"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `check` until it returns True; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExited:
            raise
        except Exception as exc:  # the server is still coming up
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last_error})")


@dataclass
class Server:
    """One child process with its log file under the test's tmp dir."""

    name: str
    args: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            list(self.args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_alive(self) -> None:
        if not self.alive():
            raise ProcessExited(f"{self.name} exited early:\n{self.tail()}")

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def wait_http(self, url: str, timeout: float = 60, context: Any = None) -> None:
        """Wait until `url` answers 2xx, failing at once if the process exits."""

        def answers() -> bool:
            self.ensure_alive()
            with urllib.request.urlopen(url, timeout=5, context=context):
                return True

        wait_until(answers, timeout, self.name, interval=0.3)

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

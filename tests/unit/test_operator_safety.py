"""The operator reads a training pod's /metrics (any image can run there): only the pod's own
unicast IP, no redirects, at most a bounded body."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sectune_operator.finetunejob_status import _scrape_progress
from sectune_operator.scrape import READ_LIMIT as PROGRESS_READ_LIMIT
from sectune_operator.scrape import pod_ip as _pod_ip
from sectune_operator.settings import Settings

METRICS = b"sectune_train_step 3\nsectune_train_total_steps 10\n"


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("fd00::5", "[fd00::5]"),
        ("169.254.169.254", None),  # cloud metadata
        ("127.0.0.1", None),
        ("0.0.0.0", None),
        ("pod.example.com", None),
        ("", None),
        # the metadata address again, spelled so that a v6-only check misses it
        ("::ffff:169.254.169.254", None),  # IPv4-mapped
        ("2002:a9fe:a9fe::1", None),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", None),  # NAT64
        ("fd00:ec2::254", None),  # AWS instance metadata over IPv6
        ("::ffff:127.0.0.1", None),
        ("fd12:3456::7", "[fd12:3456::7]"),  # an ordinary IPv6 pod network
    ],
)
def test_only_a_unicast_pod_ip_is_scraped(ip: str, expected: str | None) -> None:
    assert _pod_ip({"status": {"podIP": ip}}) == expected


@pytest.fixture
def pod_server() -> Any:
    """A 'training pod' whose answer each test chooses."""
    answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = answers[self.path]
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], answers
    server.shutdown()


def _scrape(port: int, path: str) -> dict[str, Any] | None:
    settings = Settings(progress_url_template=f"http://127.0.0.1:{port}{path}")
    pod = {"status": {"phase": "Running", "podIP": "10.0.0.9"}}
    return _scrape_progress([pod], settings)


def test_progress_is_read_but_redirects_and_huge_bodies_are_not(pod_server: Any) -> None:
    port, answers = pod_server
    answers["/ok"] = (200, {}, METRICS)
    answers["/bounce"] = (302, {"Location": f"http://127.0.0.1:{port}/ok"}, b"")
    answers["/huge"] = (200, {}, METRICS + b"#" * (PROGRESS_READ_LIMIT + 10))
    progress = _scrape(port, "/ok")
    assert progress is not None and progress["step"] == 3
    assert _scrape(port, "/bounce") is None
    assert _scrape(port, "/huge") is None

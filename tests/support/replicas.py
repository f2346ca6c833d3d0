"""Stand-in network between the operator and server replicas that kwok plays.

kwok's pods have addresses nothing listens on. The operator reads each replica's /metrics at
the URL its `SECTUNE_SERVING_METRICS_URL` template gives; tests point that template here
(`http://127.0.0.1:<port>/{pod}/{port}/metrics`) and decide what each pod answers on which
port: a fixed text (cluster tier) or a real `sectune serve` process standing in for that pod
(e2e tier).
"""

from __future__ import annotations

import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ReplicaNetwork:
    def __init__(self) -> None:
        self._texts: dict[tuple[str, int | None], str] = {}
        self._upstreams: dict[str, str] = {}
        self._lock = threading.Lock()
        network = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pod, port, _ = self.path.strip("/").split("/", 2)
                body = network.answer(pod, int(port))
                if body is None:
                    self.send_error(502)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url_template = f"http://127.0.0.1:{self._server.server_port}/{{pod}}/{{port}}/metrics"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def set_text(self, pod: str, text: str, port: int | None = None) -> None:
        """Answer for `pod` with `text` on `port` (None: on every port)."""
        with self._lock:
            self._texts[(pod, port)] = text

    def route(self, pod: str, metrics_url: str) -> None:
        """Answer for `pod` with what a real server at `metrics_url` says."""
        with self._lock:
            self._upstreams[pod] = metrics_url

    def answer(self, pod: str, port: int) -> str | None:
        with self._lock:
            text = self._texts.get((pod, port), self._texts.get((pod, None)))
            upstream = self._upstreams.get(pod)
        if upstream is not None:
            try:
                with urllib.request.urlopen(upstream, timeout=2) as response:
                    return str(response.read().decode())
            except OSError:
                return None
        return text

    def stop(self) -> None:
        self._server.shutdown()

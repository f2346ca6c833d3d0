"""Prometheus from Debian's package, scraping what a test points it at."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune.yamlio import dump_yaml

from .processes import Server, free_port, tool


@dataclass
class PrometheusServer:
    workdir: Path
    url: str = ""
    _server: Server | None = None

    def start(
        self, scrape_configs: list[dict[str, Any]], rule_files: list[Path] = ()
    ) -> PrometheusServer:  # type: ignore[assignment]
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            dump_yaml(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(p) for p in rule_files],
                    "scrape_configs": scrape_configs,
                }
            )
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = Server(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            self.workdir / "prometheus.log",
        ).start()
        self._server.wait_http(f"{self.url}/-/ready")
        return self

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the result vector."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return list(body["data"]["result"])

    def stop(self) -> None:
        if self._server:
            self._server.stop()

"""`sectune serve` as a child process, and a small client for what a user would call."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sectune.yamlio import dump_yaml

from .processes import Server, free_port
from .trained import Version

TEXTS = [
    "mimikatz lsass dump beacon by user=<USER_1> from <IP_1> #1",
    "backup completed scheduled update by user=<USER_2> from <IP_2> #2",
    "exfil ransom beacon dump by user=<USER_1> from <IP_3> #3",
    "healthy routine backup update by user=<USER_3> from <IP_1> #4",
]


@dataclass
class SectuneServer:
    url: str
    process: Server

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers=_auth(key), timeout=60)

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=_auth(key), timeout=120)

    def classify(self, model: str, text: str, key: str | None = None) -> httpx.Response:
        return self.post("/v1/classify", {"model": model, "input": text}, key)

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample's value from /metrics, or None when the series is absent."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    def stop(self) -> None:
        self.process.stop()


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def start_server(
    workdir: Path,
    args: list[str],
    env: dict[str, str],
    precision: str = "fp32",
    port: int | None = None,
) -> SectuneServer:
    """Start `sectune serve` (fp32 by default, fast config polling) and wait until /readyz
    says ready."""
    port = port or free_port()
    process = Server(
        "sectune-serve",
        [
            sys.executable,
            "-m",
            "sectune.cli",
            "serve",
            "--port",
            str(port),
            "--precision",
            precision,
            "--reload-interval",
            "0.5",
            *args,
        ],
        workdir / f"serve-{port}.log",
        env=env,
    ).start()
    server = SectuneServer(f"http://127.0.0.1:{port}", process)
    try:
        process.wait_http(server.url + "/readyz", timeout=120)
    except BaseException:
        process.stop()
        raise
    return server


def serving_config(
    path: Path,
    adapters: dict[str, list[tuple[str, Version | str, int]]],
    shadows: dict[str, float] | None = None,
    **extra: Any,
) -> Path:
    """Write a ServingConfig atomically: per adapter, (version, source, traffic) entries;
    `shadows` gives versions (`name@version`) a shadow fraction."""
    document: dict[str, Any] = {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "ServingConfig",
        "adapters": [
            {
                "name": name,
                "versions": [
                    (
                        {"version": v, "uri": source, "traffic": t}
                        if isinstance(source, str)
                        else {
                            "version": v,
                            "uri": source.uri,
                            "sha256": source.sha256,
                            "traffic": t,
                        }
                    )
                    | (
                        {"shadow": shadows[f"{name}@{v}"]}
                        if f"{name}@{v}" in (shadows or {})
                        else {}
                    )
                    for v, source, t in versions
                ],
            }
            for name, versions in adapters.items()
        ],
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_yaml(document))
    tmp.replace(path)  # atomically, as the kubelet swaps a ConfigMap volume
    return path

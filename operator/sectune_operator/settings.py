"""Operator settings, read once from the environment at startup (see handlers/startup.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SECTUNE_{name}", default)


@dataclass(frozen=True)
class Settings:
    trainer_image: str = field(
        default_factory=lambda: _env("TRAINER_IMAGE", "ghcr.io/sectune/trainer:0.1.0")
    )
    """Image of the training pods when a FineTuneJob names none."""
    default_cpu: str = field(default_factory=lambda: _env("DEFAULT_CPU", "8"))
    default_memory: str = field(default_factory=lambda: _env("DEFAULT_MEMORY", "32Gi"))
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "8081")))
    """Port of the operator's own /metrics."""
    status_interval: float = field(default_factory=lambda: float(_env("STATUS_INTERVAL", "5")))
    """Seconds between progress reads of a training FineTuneJob (its status otherwise follows
    Job and Pod events) and between AdapterDeployment and FineTuneSchedule refreshes."""
    progress_backoff: float = field(default_factory=lambda: float(_env("PROGRESS_BACKOFF", "15")))
    """Seconds before a trainer that did not answer its metrics port (still loading) is asked
    again: what a job shorter than this may train without its progress being shown."""
    max_concurrent_jobs: int = field(default_factory=lambda: int(_env("MAX_CONCURRENT_JOBS", "0")))
    """Training Jobs running at once per namespace when Kueue is not used; 0: no limit."""
    allow_file_uris: bool = field(
        default_factory=lambda: _env("ALLOW_FILE_URIS", "false") == "true"
    )
    """file:// URIs point into the pod's own filesystem; refused unless explicitly allowed."""
    storage_endpoints: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            e.strip().rstrip("/") for e in _env("STORAGE_ENDPOINTS", "").split(",") if e.strip()
        )
    )
    """S3 endpoints (AWS_ENDPOINT_URL values) the operator itself may call when it deletes a
    job's artifacts with that job's credentials; a Secret naming any other endpoint is refused,
    so a tenant cannot point the operator at an arbitrary URL. Empty: only AWS's own
    endpoints (a Secret without AWS_ENDPOINT_URL)."""
    progress_url_template: str = field(
        default_factory=lambda: _env("PROGRESS_URL", "http://{ip}:{port}/metrics")
    )
    """Where a running trainer's metrics are read from ({ip}: the pod IP, {port}: 9400)."""
    server_image: str = field(
        default_factory=lambda: _env(
            "SERVER_IMAGE", _env("TRAINER_IMAGE", "ghcr.io/sectune/trainer:0.1.0")
        )
    )
    """Image of sectune server pods (and vLLM's adapter-fetching init container) when an
    AdapterDeployment names none; `sectune serve` ships in the trainer image."""
    vllm_image: str = field(
        default_factory=lambda: _env("VLLM_IMAGE", "docker.io/vllm/vllm-openai:v0.11.0")
    )
    """Image of vLLM server pods (runtime: vllm)."""
    serving_cpu: str = field(default_factory=lambda: _env("SERVING_CPU", "2"))
    serving_memory: str = field(default_factory=lambda: _env("SERVING_MEMORY", "8Gi"))
    """CPU and memory of a server replica whose AdapterDeployment names none."""
    serving_metrics_url_template: str = field(
        default_factory=lambda: _env("SERVING_METRICS_URL", "http://{ip}:{port}/metrics")
    )
    """Where a server replica's metrics are read from (which adapter versions it serves)."""
    prometheus_url: str = field(default_factory=lambda: _env("PROMETHEUS_URL", "").rstrip("/"))
    """Prometheus' HTTP API for canary analysis; empty: no analysis (a condition says so)."""
    prometheus_selector: str = field(
        default_factory=lambda: _env(
            "PROMETHEUS_SELECTOR",
            'namespace="{namespace}",pod=~"{deployment}-[a-z0-9]{{1,10}}-[a-z0-9]{{5}}"',
        )
    )
    """Label matchers that pick one AdapterDeployment's server series ({namespace},
    {deployment}: the server Deployment's name)."""
    peering_lifetime: int = field(default_factory=lambda: int(_env("PEERING_LIFETIME", "20")))
    """Seconds a replica's peering record lives without a keep-alive; a standby takes over
    from a leader that died within about this long (kopf's default is 60)."""
    network_policies: bool = field(
        default_factory=lambda: _env("NETWORK_POLICIES", "false") == "true"
    )
    """Give each training Job and AdapterDeployment a NetworkPolicy (chart networkPolicies)."""
    api_namespaces: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            n.strip() for n in _env("API_NAMESPACES", "").split(",") if n.strip()
        )
    )
    """Namespaces whose pods may call a server's API besides its own."""
    monitoring_namespace: str = field(
        default_factory=lambda: _env("MONITORING_NAMESPACE", "monitoring")
    )
    """Where Prometheus runs: it may scrape training pods and servers."""
    operator_namespace: str = field(
        default_factory=lambda: _env("OPERATOR_NAMESPACE", "sectune-system")
    )
    """The operator's own namespace: it reads training progress and server reports."""
    finalizer: str = "sectune.io/artifact-cleanup"
    skip_cleanup_annotation: str = "sectune.io/skip-artifact-cleanup"
    """Set to "true" on a FineTuneJob stuck deleting to release it without deleting artifacts."""

"""AdapterDeployment -> the rendered ServingConfig, its ConfigMap, the server Deployment, its
Service and (replicas > 1) a PodDisruptionBudget. Pure functions.

The ServingConfig is the same contract `sectune serve --config` reads on a laptop: the operator
resolves every `fineTuneJob` source to that job's version URI and digest, leaves out versions it
must not serve (gates failed, job not finished), moves the traffic of rolled-back canaries to
the stable version, and keeps an adapter's previous versions when none of its new ones can be
rendered. The servers re-read the mounted file and swap adapters without a restart (runtime
sectune); vLLM, whose runtime adapter loading is documented as unsafe, is rolled instead, and
answers behind a router sidecar (`sectune route-vllm`) that takes the API port, routes each
adapter's name by traffic weight to a version's served name `name@version`, checks the same API
keys and records the same per-version series as a sectune server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sectune.serving import traffic
from sectune.serving.config import VLLM_ARGS, ServedAdapter, ServedVersion, ServingConfig
from sectune.yamlio import dump_yaml
from sectune_operator.api import AdapterDeploymentSpec
from sectune_operator.builders import pods
from sectune_operator.settings import Settings

SERVING_LABEL = "sectune.io/adapterdeployment"
CONFIG_KEY = "serving.yaml"
CONFIG_DIR = "/etc/sectune"
KEYS_KEY = "api-keys"
KEYS_DIR = "/etc/sectune/keys"
ADAPTERS_DIR = "/adapters"
API_PORT = 8000
OBSERVER_PORT = 9400
"""runtime: vllm — the router sidecar's metrics and readiness (sectune.serving.observe)."""
VLLM_PORT = 8001
"""runtime: vllm — where vLLM listens, called by the router in the same pod only (the
NetworkPolicy admits API_PORT and OBSERVER_PORT)."""
ROUTER_CPU = "500m"
ROUTER_MEMORY = "512Mi"
RUNTIME_LABEL = "sectune.io/runtime"
"""On server pods: sectune or vllm (the chart's PodMonitor scrapes each runtime's own port)."""
CONTAINER = "server"
FETCH_MEMORY = "4Gi"
"""vLLM pods' init container (sectune fetch-adapters)."""
CONFIG_HASH_ANNOTATION = "sectune.io/serving-config-sha256"
SPEC_HASH_ANNOTATION = "sectune.io/rendered-sha256"


def child_name(name: str) -> str:
    """Predictable name of every child: <deployment>-serve."""
    return f"{name}-serve"


def labels(name: str) -> dict[str, str]:
    return pods.labels(SERVING_LABEL, "sectune-server", name)


def metrics_port(spec: AdapterDeploymentSpec) -> int:
    """Where a replica reports what it serves: the server itself, or a vLLM pod's router."""
    return OBSERVER_PORT if spec.runtime == "vllm" else API_PORT


def endpoint(name: str, namespace: str) -> str:
    return f"http://{child_name(name)}.{namespace}.svc:{API_PORT}/v1"


# --------------------------------------------------------------------------- the adapter set


@dataclass(frozen=True)
class Resolved:
    """Where a version's files are and the digest of its manifest.json."""

    uri: str
    sha256: str


@dataclass
class Rendered:
    """The ServingConfig to hand the servers, and what was left out and why."""

    config: ServingConfig | None
    kept_previous: list[str] = field(default_factory=list)
    """Adapters none of whose new versions can be served: their previous versions stay."""


def render_serving_config(
    spec: AdapterDeploymentSpec,
    resolved: dict[tuple[str, str], Resolved],
    rolled_back: set[tuple[str, str]],
    previous: ServingConfig | None,
) -> Rendered:
    """The adapter set the servers should load (see the module docstring)."""
    before = {a.name: a for a in previous.adapters} if previous else {}
    adapters: list[ServedAdapter] = []
    kept: list[str] = []
    for adapter in spec.adapters:
        servable = {v.version for v in adapter.versions if (adapter.name, v.version) in resolved}
        out = {version for name, version in rolled_back if name == adapter.name}
        shares = traffic.served(adapter.versions, servable, out)
        shadows = {v.version: v.shadow for v in adapter.versions}
        if traffic.stable(adapter.versions).version not in servable or not shares:
            # Its main version cannot be served (yet): what served it before stays.
            if adapter.name in before:
                adapters.append(before[adapter.name])
                kept.append(adapter.name)
                continue
            if not shares:
                continue
        adapters.append(
            ServedAdapter(
                name=adapter.name,
                versions=[
                    ServedVersion(
                        version=version,
                        uri=resolved[(adapter.name, version)].uri,
                        sha256=resolved[(adapter.name, version)].sha256,
                        traffic=share,
                        shadow=shadows.get(version, 0.0) if share == 0 else 0.0,
                    )
                    for version, share in shares.items()
                ],
            )
        )
    if not adapters:
        return Rendered(None, kept)
    config = ServingConfig(
        base_model=spec.base_model,
        adapters=adapters,
        drift=spec.drift,
        feedback=spec.feedback,
        require_passed_gates=spec.promotion.require_passed_gates,
    )
    return Rendered(config, kept)


def config_document(config: ServingConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", by_alias=True, exclude_none=True)


def config_sha256(config: ServingConfig) -> str:
    canonical = json.dumps(config_document(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe(config: ServingConfig) -> str:
    """The adapter set in a line: "alert-triage v1 90%, v2 10%; attack-tactics v1 100%"."""
    return "; ".join(
        f"{a.name} " + ", ".join(f"{v.version} {v.traffic}%" for v in a.versions)
        for a in config.adapters
    )


# --------------------------------------------------------------------------- children


def build_configmap(name: str, config: ServingConfig) -> dict[str, Any]:
    header = (
        f"# Rendered by the sectune operator from AdapterDeployment {name}; edits are "
        "overwritten.\n"
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(name),
            "labels": labels(name),
            "annotations": {CONFIG_HASH_ANNOTATION: config_sha256(config)},
        },
        "data": {CONFIG_KEY: header + dump_yaml(config_document(config))},
    }


def build_service(name: str, peers: bool = False) -> dict[str, Any]:
    """The servers' Service. `peers`: the headless one whose DNS name resolves to every
    replica, ready or not, so a replica can pass an analyst's verdict to the one that gave
    the answer (sectune.serving.peers)."""
    spec: dict[str, Any] = {
        "selector": {SERVING_LABEL: name},
        "ports": [{"name": "http", "port": API_PORT, "targetPort": "http"}],
    }
    if peers:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": True}
    else:
        spec["type"] = "ClusterIP"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": peers_service_name(name) if peers else child_name(name),
            "labels": labels(name),
        },
        "spec": spec,
    }


def peers_service_name(name: str) -> str:
    return f"{child_name(name)}-peers"


def build_pdb(name: str) -> dict[str, Any]:
    """At most one server replica down at a time for voluntary disruptions (drains)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": child_name(name), "labels": labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {SERVING_LABEL: name}}},
    }


def build_network_policy(
    name: str, spec: AdapterDeploymentSpec, settings: Settings
) -> dict[str, Any]:
    """Servers accept the API port from their own namespace and the allowed API namespaces, and
    (for /metrics on the same port) from the operator's and the monitoring namespace; a vLLM
    pod's metrics port (its router's) from those two only; vLLM's own port from nowhere."""
    callers: list[dict[str, Any]] = [{"podSelector": {}}]
    if settings.api_namespaces:
        callers.append(pods.from_namespaces(list(settings.api_namespaces)))
    watchers = pods.from_namespaces([settings.operator_namespace, settings.monitoring_namespace])
    callers.append(watchers)
    ingress = [{"from": callers, "ports": [{"protocol": "TCP", "port": API_PORT}]}]
    if spec.runtime == "vllm":
        ingress.append({"from": [watchers], "ports": [{"protocol": "TCP", "port": OBSERVER_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": child_name(name), "labels": labels(name)},
        "spec": {
            "podSelector": {"matchLabels": {SERVING_LABEL: name}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _storage_env(spec: AdapterDeploymentSpec) -> list[dict[str, Any]]:
    credentials = spec.credentials
    return [*pods.cache_env(), *pods.storage_env(credentials.name if credentials else None)]


def _resources(spec: AdapterDeploymentSpec, settings: Settings) -> dict[str, Any]:
    return pods.compute(
        spec.resources.cpu or settings.serving_cpu,
        spec.resources.memory or settings.serving_memory,
        spec.resources.gpus,
    )


def _probes(port: str = "http", ready: str = "/readyz") -> dict[str, Any]:
    # A sectune server answers both on the event loop, never behind inference
    # (sectune.serving.server): a busy replica is not restarted. Loading a base model can take
    # minutes: readiness waits for it, liveness only checks the process is serving.
    return {
        "readinessProbe": {
            "httpGet": {"path": ready, "port": port},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def server_command(name: str, spec: AdapterDeploymentSpec) -> list[str]:
    """What a sectune server replica runs (the e2e tests run exactly this locally)."""
    command = [
        "sectune", "serve",
        "--config", f"{CONFIG_DIR}/{CONFIG_KEY}",
        "--host", "0.0.0.0",
        "--port", str(API_PORT),
    ]  # fmt: skip
    if spec.auth_secret:
        command += ["--api-keys-file", f"{KEYS_DIR}/{KEYS_KEY}"]
    if spec.feedback.store is not None:
        # A verdict can reach any replica: it is passed to the one holding the answer.
        command += ["--peers-service", peers_service_name(name)]
    return command


def fetch_command() -> list[str]:
    """The vLLM init container: verify and place every adapter version (same digest checks)."""
    return [
        "sectune", "fetch-adapters",
        "--config", f"{CONFIG_DIR}/{CONFIG_KEY}",
        "--out", ADAPTERS_DIR,
    ]  # fmt: skip


def router_command(spec: AdapterDeploymentSpec) -> list[str]:
    """vLLM pods' sidecar on the API port: routes by traffic weight, checks the API keys,
    records per-version requests; reports which verified versions vLLM lists."""
    command = [
        "sectune", "route-vllm",
        "--config", f"{CONFIG_DIR}/{CONFIG_KEY}",
        "--adapters", ADAPTERS_DIR,
        "--vllm-url", f"http://127.0.0.1:{VLLM_PORT}",
        "--host", "0.0.0.0",
        "--port", str(API_PORT),
        "--metrics-port", str(OBSERVER_PORT),
    ]  # fmt: skip
    if spec.auth_secret:
        command += ["--api-keys-file", f"{KEYS_DIR}/{KEYS_KEY}"]
    return command


def vllm_command(config: ServingConfig, spec: AdapterDeploymentSpec) -> list[str]:
    """vLLM's OpenAI server with every version as a LoRA module under its immutable served
    name `name@version` (a name never reused by another version, so no cached prefix block of
    an older version can answer for a newer one); the router maps `name` to one of them."""
    modules = [
        f"{adapter.name}@{v.version}={ADAPTERS_DIR}/{adapter.name}/{v.version}/adapter"
        for adapter in config.adapters
        for v in adapter.versions
    ]
    count = sum(len(a.versions) for a in config.adapters)
    return [
        "vllm", "serve", f"{ADAPTERS_DIR}/base",
        "--served-model-name", "base",
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
        "--enable-lora",
        "--max-loras", str(min(count, 16)),
        # --max-lora-rank: written by the init container from the verified adapters' ranks.
        "--config", f"{ADAPTERS_DIR}/{VLLM_ARGS}",
        *(["--api-key", "$(SECTUNE_VLLM_API_KEY)"] if spec.auth_secret else []),
        "--lora-modules", *modules,
    ]  # fmt: skip


def build_deployment(
    name: str, spec: AdapterDeploymentSpec, config: ServingConfig, settings: Settings
) -> dict[str, Any]:
    """The server Deployment. A sectune server hot-swaps adapters from the mounted ConfigMap,
    so a new adapter set does not roll its pods; vLLM pods are rolled (config hash)."""
    pod_labels = labels(name) | {RUNTIME_LABEL: spec.runtime}
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child_name(name)}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    env = _storage_env(spec)
    if spec.feedback.store is not None:
        # The address the other replicas pass verdicts to (sectune serve --peers-service).
        pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
        env.append({"name": "SECTUNE_POD_IP", "valueFrom": pod_ip})
    if spec.auth_secret:
        mounts.append({"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": spec.auth_secret.name,
                    "items": [{"key": KEYS_KEY, "path": KEYS_KEY}],
                },
            }
        )
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.server_image,
        "imagePullPolicy": "IfNotPresent",
        "command": server_command(name, spec),
        "env": env,
        "ports": [{"name": "http", "containerPort": API_PORT}],
        "resources": _resources(spec, settings),
        "securityContext": pods.RESTRICTED,
        "volumeMounts": mounts,
        **_probes(),
    }
    template_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port(spec)),
        "prometheus.io/path": "/metrics",
    }
    init_containers: list[dict[str, Any]] = []
    sidecars: list[dict[str, Any]] = []
    if spec.runtime == "vllm":
        volumes.append({"name": "adapters", "emptyDir": {}})
        init_containers.append(
            {
                "name": "fetch-adapters",
                "image": settings.server_image,
                "imagePullPolicy": "IfNotPresent",
                "command": fetch_command(),
                "env": env,
                # Verifying streams files through sha256: no GPU, a bounded memory.
                "resources": pods.compute(
                    spec.resources.cpu or settings.serving_cpu, FETCH_MEMORY, 0
                ),
                "securityContext": pods.RESTRICTED,
                "volumeMounts": [*mounts, {"name": "adapters", "mountPath": ADAPTERS_DIR}],
            }
        )
        vllm_env = [e for e in env if e["name"] in ("HOME", "HF_HOME")]
        if spec.auth_secret:
            ref = {"name": spec.auth_secret.name, "key": "vllm-api-key"}
            vllm_env.append({"name": "SECTUNE_VLLM_API_KEY", "valueFrom": {"secretKeyRef": ref}})
        adapters_mount = {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True}
        sidecars.append(
            {
                "name": "router",
                "image": settings.server_image,
                "imagePullPolicy": "IfNotPresent",
                "command": router_command(spec),
                "env": [e for e in vllm_env if e["name"] == "SECTUNE_VLLM_API_KEY"],
                "ports": [
                    {"name": "http", "containerPort": API_PORT},
                    {"name": "metrics", "containerPort": OBSERVER_PORT},
                ],
                "resources": pods.compute(ROUTER_CPU, ROUTER_MEMORY, 0),
                "securityContext": pods.RESTRICTED,
                "volumeMounts": [
                    *[m for m in mounts if m["name"] in ("config", "api-keys")],
                    adapters_mount,
                ],
                # Ready when vLLM lists every verified version: the pod's readiness is the
                # whole adapter set served, not only vLLM's process up.
                **_probes("metrics", ready="/ready"),
            }
        )
        vllm_probe = {"path": "/health", "port": "vllm"}
        container |= {
            "image": spec.image or settings.vllm_image,
            "command": vllm_command(config, spec),
            "env": vllm_env,
            "ports": [{"name": "vllm", "containerPort": VLLM_PORT}],
            "volumeMounts": [
                *[m for m in mounts if m["name"] not in ("config", "api-keys")],
                adapters_mount,
            ],
            "readinessProbe": {"httpGet": vllm_probe, "periodSeconds": 5},
            "livenessProbe": {
                "httpGet": vllm_probe,
                "periodSeconds": 10,
                "failureThreshold": 6,
            },
        }
        # vLLM loads adapters only at start: a new adapter set rolls the pods.
        template_annotations[CONFIG_HASH_ANNOTATION] = config_sha256(config)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pods.POD_SECURITY,
        "terminationGracePeriodSeconds": 60,
        "containers": [container, *sidecars],
        "volumes": volumes,
        **pods.placement(spec.resources),
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if spec.replicas > 1:
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {SERVING_LABEL: name}},
            }
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
        ]
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": child_name(name), "labels": labels(name)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {SERVING_LABEL: name}},
            # A replica is replaced only once its successor is ready: no capacity lost.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": template_annotations},
                "spec": pod_spec,
            },
        },
    }
    digest = hashlib.sha256(json.dumps(deployment, sort_keys=True).encode()).hexdigest()
    deployment["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest, **pods.EXCEPTIONS}
    return deployment

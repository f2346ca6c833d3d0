"""One Kubernetes API client for every handler thread.

`client.CoreV1Api()` without an ApiClient builds a new one, with a new connection pool, on
every call: each request then paid a TCP and TLS handshake (28 % of the operator's CPU while
1,000 FineTuneJobs were being created, benchmarks/operator_scale.py --profile). Here one pool
holds a connection per handler thread and reuses it.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from kubernetes import client

POOL_SIZE = 32
"""Connections kept open: kopf's handler threads (settings.execution.max_workers) and room."""

REPORTING_COMPONENT = "sectune-operator"

_lock = threading.Lock()
_shared: client.ApiClient | None = None


def api_client() -> client.ApiClient:
    """The shared ApiClient, made on first use from the loaded kubeconfig or in-cluster
    configuration (load it first)."""
    global _shared
    with _lock:
        if _shared is None:
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = POOL_SIZE
            _shared = client.ApiClient(configuration)
        return _shared


def reset() -> None:
    """Forget the shared client (after the configuration was loaded again)."""
    global _shared
    with _lock:
        _shared = None


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def policy() -> client.PolicyV1Api:
    return client.PolicyV1Api(api_client())


def networking() -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api_client())


def custom_objects() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def discard(response: Any) -> None:
    """Read and drop a response made with `_preload_content=False`, and give its connection
    back to the pool (a connection with unread data would be closed and a new TLS one opened)."""
    response.drain_conn()
    response.release_conn()


def post_event(involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """An Event about `involved` ({apiVersion, kind, metadata: {name, namespace, uid}}), from
    threads that are not kopf handlers (kopf.info needs a handler's context)."""
    now = dt.datetime.now(dt.UTC).isoformat()
    metadata = involved["metadata"]
    core().create_namespaced_event(
        metadata["namespace"],
        {
            "metadata": {"namespace": metadata["namespace"], "generateName": "sectune-event-"},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "action": reason,
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": REPORTING_COMPONENT,
            "source": {"component": REPORTING_COMPONENT},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata.get("uid"),
            },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
        },
    )

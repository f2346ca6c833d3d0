"""One Kubernetes API client for every handler thread.

`client.CoreV1Api()` without an ApiClient builds a new one, with a new connection pool, on
every call: each request then paid a TCP and TLS handshake (28 % of the operator's CPU while
1,000 FineTuneJobs were being created, benchmarks/operator_scale.py --profile). Here one pool
holds a connection per handler thread and reuses it.
"""

from __future__ import annotations

import threading

from kubernetes import client

POOL_SIZE = 32
"""Connections kept open: kopf's handler threads (settings.execution.max_workers) and room."""

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

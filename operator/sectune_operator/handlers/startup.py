"""The one startup hook: every operator setting in one place."""

from __future__ import annotations

import logging
import threading
from typing import Any

import aiohttp
import kopf
from kubernetes import config as kube_config

from sectune_operator import finetunejob_status as job_status
from sectune_operator import kube, metrics
from sectune_operator.settings import Settings
from sectune_operator.tracking import JobTracker


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    ours: Settings = memo.settings  # read once by __main__
    # Shared by reference with every handler's memo (kopf copies the memo per object).
    memo.tracker = JobTracker()
    # What was rendered last per AdapterDeployment (handlers/adapterdeployment.py).
    memo.serving = {}
    memo.serving_lock = threading.Lock()
    # The CRDs' status is structural: kopf keeps its bookkeeping in annotations instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="sectune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="sectune.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = ours.finalizer
    # A replica that dies without leaving the peering (killed, node lost) is taken over from
    # when its peering record expires: this lifetime bounds the failover.
    settings.peering.lifetime = ours.peering_lifetime
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = kube.REPORTING_COMPONENT  # as the status writer's
    settings.watching.server_timeout = 300
    # After its own patch kopf waits this long for the patched version to come back through
    # the watch before it acts on older events again. At 1,000 jobs created at once the watch
    # lags more than kopf's 5 s, and every creation was handled twice.
    settings.persistence.consistency_timeout = 30
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 16
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    kube.reset()  # handlers share one client built from this configuration
    peering, namespaces = memo.get("peering", ("", ()))
    if peering:
        ensure_peering(peering, namespaces, logger)
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)
    tracker = memo.tracker
    metrics.FINETUNEJOBS.source = lambda: job_status.phase_counts(tracker)
    memo.stop_background = job_status.start_background(tracker, ours)
    logger.info(
        f"Started sectune operator (trainer image {ours.trainer_image}, server image "
        f"{ours.server_image}, metrics :{ours.metrics_port}, canary analysis "
        f"{'on' if ours.prometheus_url else 'off'}, peering priority {settings.peering.priority})"
    )


def ensure_peering(name: str, namespaces: tuple[str, ...], logger: Any) -> None:
    """Create the peering object the replicas elect their leader through, unless it exists:
    a ClusterKopfPeering when watching the whole cluster, a KopfPeering in each watched
    namespace otherwise. The chart cannot render it: Helm maps every object of a release to
    its API before it applies any, and the peering CRD comes in that same release."""
    from kubernetes.client.rest import ApiException

    body = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
    api = kube.custom_objects()

    def create(call: Any, *args: Any) -> bool:
        try:
            call(*args)
        except ApiException as exc:
            if exc.status != 409:  # already there: another replica made it, or an earlier start
                raise
            return False
        return True

    if not namespaces:
        created = create(
            api.create_cluster_custom_object,
            "kopf.dev", "v1", "clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"},
        )  # fmt: skip
        if created:
            logger.info(f"Created ClusterKopfPeering {name}")
    for namespace in namespaces:
        created = create(
            api.create_namespaced_custom_object,
            "kopf.dev", "v1", namespace, "kopfpeerings", {**body, "kind": "KopfPeering"},
        )  # fmt: skip
        if created:
            logger.info(f"Created KopfPeering {namespace}/{name}")


KOPF_CONNECTIONS = 48
"""Connections kopf's own client may hold open: its watch streams (one per watched resource)
plus its patches and Event posts. Without a bound, a burst of 1,000 creations opened one TLS
connection per concurrent request (~330, each with a 256 KiB read buffer: a quarter of the
operator's memory) and paid a TLS handshake for each."""


@kopf.on.login()
async def login(logger: Any, **kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's own login (service account in the cluster, else kubeconfig), with a bounded pool."""
    info = kopf.login_via_client(logger=logger, **kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        priority=info.priority,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
    )


@kopf.on.cleanup()
def stop(memo: kopf.Memo, **_: Any) -> None:
    if "stop_background" in memo:
        memo.stop_background.set()

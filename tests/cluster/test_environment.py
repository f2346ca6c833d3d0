"""The test environment is the real thing: Jobs run, owners collect garbage, RBAC refuses,
S3 stores, Prometheus scrapes."""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from support.processes import wait_until

pytestmark = pytest.mark.cluster


def _job(name: str, annotations: dict[str, str] | None = None, gpus: int = 0) -> dict:
    """A Job whose pod kwok finishes as `annotations` say (exit code 0 unless told)."""
    annotations = {"sectune.dev/test-exit-code": "0"} if annotations is None else annotations
    container: dict = {"name": "main", "image": "busybox", "command": ["true"]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {"restartPolicy": "Never", "containers": [container]},
            },
        },
    }


def _job_condition(batch: client.BatchV1Api, namespace: str, name: str, kind: str) -> bool:
    job = batch.read_namespaced_job(name, namespace)
    return any(c.type == kind and c.status == "True" for c in job.status.conditions or [])


def test_job_runs_to_completion_on_a_gpu_node(api_client, namespace):
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    batch.create_namespaced_job(namespace, _job("ok", gpus=1))

    wait_until(lambda: _job_condition(batch, namespace, "ok", "Complete"), 60, "Job complete")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=ok").items
    assert [p.status.phase for p in pods] == ["Succeeded"]
    assert pods[0].spec.node_name.startswith("kwok-gpu-")


def test_pod_exit_code_and_message_fail_the_job(api_client, namespace):
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    annotations = {
        "sectune.dev/test-exit-code": "3",
        "sectune.dev/test-termination-message": '{"reason": "BadData"}',
    }
    batch.create_namespaced_job(namespace, _job("bad", annotations))

    wait_until(lambda: _job_condition(batch, namespace, "bad", "Failed"), 60, "Job failed")
    pod = core.list_namespaced_pod(namespace, label_selector="job-name=bad").items[0]
    terminated = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed"
    assert terminated.exit_code == 3
    assert terminated.message == '{"reason": "BadData"}'


def test_pod_stays_running_until_the_test_chooses_the_outcome(api_client, namespace):
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    batch.create_namespaced_job(namespace, _job("held", {}))

    def running_pod():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=held").items
        return pods[0] if pods and pods[0].status.phase == "Running" else None

    wait_until(lambda: running_pod() is not None, 60, "pod running")
    time.sleep(2)
    pod = running_pod()
    assert pod is not None, "the pod finished without being told to"
    core.patch_namespaced_pod(
        pod.metadata.name,
        namespace,
        {"metadata": {"annotations": {"sectune.dev/test-exit-code": "0"}}},
    )
    wait_until(lambda: _job_condition(batch, namespace, "held", "Complete"), 60, "Job complete")


def test_owned_configmap_is_garbage_collected(api_client, namespace):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "owned",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner.metadata.uid,
                    }
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, 60, "garbage collection of the owned ConfigMap")


def test_service_account_needs_a_role_binding(api_client, control_plane, namespace, tmp_path: Path):
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    as_reader = client.CoreV1Api(
        config.new_client_from_config(
            str(control_plane.token_kubeconfig(token, tmp_path / "reader.kubeconfig"))
        )
    )

    with pytest.raises(ApiException) as refused:
        as_reader.list_namespaced_config_map(namespace)
    assert refused.value.status == 403

    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    wait_until(lambda: as_reader.list_namespaced_config_map(namespace) is not None, 30, "RBAC")
    with pytest.raises(ApiException) as still_refused:
        as_reader.list_namespaced_secret(namespace)
    assert still_refused.value.status == 403


def test_s3_put_list_get_and_wrong_key_refused(s3_server, s3_bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="adapters/a/manifest.json", Body=b'{"ok": true}')

    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="adapters/")
    assert [o["Key"] for o in listed["Contents"]] == ["adapters/a/manifest.json"]
    body = s3.get_object(Bucket=s3_bucket, Key="adapters/a/manifest.json")["Body"].read()
    assert body == b'{"ok": true}'

    with pytest.raises(ClientError) as refused:
        s3_server.client(secret_key="wrong-" + uuid.uuid4().hex).list_objects_v2(Bucket=s3_bucket)
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_prometheus_scrapes_an_exporter(prometheus):
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    Gauge("sectune_smoke_value", "A value for the smoke test", registry=registry).set(42)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    try:
        prometheus.start(
            [
                {
                    "job_name": "smoke",
                    "static_configs": [{"targets": [f"127.0.0.1:{exporter.server_port}"]}],
                }
            ]
        )
        wait_until(lambda: prometheus.query("sectune_smoke_value"), 60, "scraped sample")
        [sample] = prometheus.query("sectune_smoke_value")
        assert sample["metric"]["job"] == "smoke"
        assert float(sample["value"][1]) == 42.0
    finally:
        exporter.shutdown()

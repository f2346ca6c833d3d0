"""The operator against the real control plane, acting as its own ServiceAccount with only the
chart's ClusterRole: children, pod spec, status from observed state, failures, preemption,
suspend/resume, deletion with and without artifact cleanup, restarts (replicas and failover: test_install.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sectune.config import JobSpec
from sectune_operator.builders.finetunejob import pod_trainer_config
from support.processes import wait_until

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "sectune.io", "v1alpha1", "finetunejobs"
RESULT = {
    "phase": "Succeeded",
    "reason": "GatesPassed",
    "message": "all gates passed",
    "adapter": {"uri": "s3://adapters/soc/triage/versions/run-1", "sha256": "ab" * 32},
    "metrics": {"accuracy": 0.91, "macroF1": 0.87},
    "gates": [{"name": "macroF1>=0.85", "passed": True, "value": 0.87}],
    "dataset": {
        "digest": "sha256:" + "cd" * 32,
        "counts": {"train": 800, "validation": 200},
        "redactions": {"IP_ADDRESS": 12},
    },
}


def _ftj(name: str = "triage", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/smollm2"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "task": {"type": "classification", "labels": ["benign", "malicious"]},
        "resources": {
            "gpus": 1,
            "memory": "16Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "output": {"uri": "s3://adapters/soc", "credentials": {"name": "storage"}},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def _secret(
    api_client: Any, namespace: str, name: str = "storage", data: dict[str, str] | None = None
) -> None:
    data = data or {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": name}, "stringData": data}
    )


def _get(api_client: Any, namespace: str, name: str = "triage") -> dict[str, Any]:
    return client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )


def _create(api_client: Any, namespace: str, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )


def _status(api_client: Any, namespace: str, name: str = "triage") -> dict[str, Any]:
    return _get(api_client, namespace, name).get("status") or {}


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def _running_pod(api_client: Any, namespace: str, job: str = "triage") -> Any:
    pods = (
        client.CoreV1Api(api_client)
        .list_namespaced_pod(namespace, label_selector=f"sectune.io/finetunejob={job}")
        .items
    )
    running = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
    return running[-1] if running else None


def _finish(
    api_client: Any, namespace: str, exit_code: int, message: str = "", job: str = "triage"
) -> str:
    """Let kwok finish the job's running pod with this exit code and termination message."""
    wait_until(
        lambda: _running_pod(api_client, namespace, job) is not None, 60, "training pod running"
    )
    pod = _running_pod(api_client, namespace, job)
    annotations = {
        "sectune.dev/test-exit-code": str(exit_code),
        "sectune.dev/test-termination-message": message,
    }
    client.CoreV1Api(api_client).patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": annotations}}
    )
    return str(pod.metadata.name)


def _deleted(api_client: Any, namespace: str, name: str = "triage") -> bool:
    try:
        _get(api_client, namespace, name)
    except ApiException as exc:
        return exc.status == 404
    return False


def _create_with_cleanup(api_client: Any, namespace: str, bucket: str) -> None:
    """A job with cleanupPolicy: Delete, once the operator has put its finalizer on."""
    output = {"uri": f"s3://{bucket}/soc", "credentials": {"name": "storage"}}
    _create(api_client, namespace, _ftj(cleanupPolicy="Delete", output=output))

    def finalized() -> bool:
        finalizers = _get(api_client, namespace)["metadata"].get("finalizers") or []
        return "sectune.io/artifact-cleanup" in finalizers

    wait_until(finalized, 30, "finalizer")


def _events(api_client: Any, namespace: str, name: str = "triage") -> list[tuple[str, str]]:
    events = (
        client.CoreV1Api(api_client)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return [(e.reason, e.message) for e in events]


def _phase_is(api_client: Any, namespace: str, phase: str, name: str = "triage") -> bool:
    return _status(api_client, namespace, name).get("phase") == phase


def test_creates_a_restricted_training_job_and_mirrors_success(
    api_client, namespace, start_operator
):
    start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    batch = client.BatchV1Api(api_client)

    wait_until(lambda: batch.list_namespaced_job(namespace).items, 30, "training Job")
    [job] = batch.list_namespaced_job(namespace).items
    assert job.metadata.name == "triage-train"
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    assert job.spec.active_deadline_seconds == 172800 and job.spec.backoff_limit == 3
    rules = job.spec.pod_failure_policy.rules
    assert rules[0].action == "FailJob" and rules[0].on_exit_codes.values == [2, 3]
    assert rules[1].action == "Ignore" and rules[1].on_pod_conditions[0].type == "DisruptionTarget"
    pod_spec = job.spec.template.spec
    [trainer] = pod_spec.containers
    assert trainer.command == ["sectune", "train", "--config", "/etc/sectune/job.json"]
    assert trainer.image == "sectune-trainer:test"
    assert trainer.resources.limits == {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert trainer.security_context.read_only_root_filesystem is True
    assert trainer.security_context.allow_privilege_escalation is False
    assert trainer.security_context.capabilities.drop == ["ALL"]
    assert pod_spec.security_context.run_as_non_root is True
    assert pod_spec.security_context.seccomp_profile.type == "RuntimeDefault"
    assert pod_spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert trainer.termination_message_path == "/dev/termination-log"
    secret_env = {e.name: e.value_from.secret_key_ref.name for e in trainer.env if e.value_from}
    assert (
        secret_env["AWS_ACCESS_KEY_ID"] == "storage"
        and secret_env["AWS_SECRET_ACCESS_KEY"] == "storage"
    )
    assert not [e for e in trainer.env if e.value and "secret" in e.value.lower()]
    assert {v.name for v in pod_spec.volumes} == {"config", "cache", "tmp", "shm"}
    config = pod_trainer_config(job.spec.template.metadata.annotations)
    assert config["name"] == "triage"
    assert JobSpec.model_validate(config["spec"]).resources.gpus == 1  # the trainer's contract

    _finish(api_client, namespace, 0, json.dumps(RESULT))
    wait_until(lambda: _phase_is(api_client, namespace, "Succeeded"), 60, "Succeeded")
    status = _status(api_client, namespace)
    assert status["adapter"] == RESULT["adapter"]
    assert status["metrics"] == {"accuracy": 0.91, "macroF1": 0.87}
    assert status["gatesSummary"] == "1/1 passed"
    assert status["dataset"]["redactions"] == {"IP_ADDRESS": 12}
    assert status["attempts"] == 1 and status["startTime"] and status["completionTime"]
    assert _condition(status, "Succeeded")["status"] == "True"
    assert _condition(status, "GatesPassed")["status"] == "True"
    assert status["observedGeneration"] == 1
    # Events are posted in the background, after the status they announce.
    wait_until(
        lambda: {"Created", "Succeeded"} <= {r for r, _ in _events(api_client, namespace)},
        30,
        "Created and Succeeded Events",
    )


def test_bad_input_exit_code_fails_fast_with_the_trainers_message(
    api_client, namespace, start_operator
):
    start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    message = {
        "phase": "Failed",
        "reason": "InvalidInput",
        "message": "file:///data/train.jsonl:9: field 'label' is missing",
    }
    _finish(api_client, namespace, 2, json.dumps(message))

    wait_until(lambda: _phase_is(api_client, namespace, "Failed"), 60, "Failed")
    status = _status(api_client, namespace)
    failed = _condition(status, "Failed")
    assert failed["reason"] == "InvalidInput"
    assert "field 'label' is missing" in failed["message"]
    assert status["attempts"] == 1  # not retried
    # Events are posted in the background, after the status they announce.
    wait_until(
        lambda: ("InvalidInput", failed["message"]) in _events(api_client, namespace),
        30,
        "InvalidInput Event",
    )


def test_failed_gates_end_failed_naming_the_gate(api_client, namespace, start_operator):
    start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    result = {
        **RESULT,
        "phase": "Failed",
        "reason": "GatesFailed",
        "gates": [{"name": "recall[critical]>=0.95", "passed": False, "value": 0.8}],
    }
    _finish(api_client, namespace, 3, json.dumps(result))

    wait_until(lambda: _phase_is(api_client, namespace, "Failed"), 60, "Failed")
    status = _status(api_client, namespace)
    assert _condition(status, "GatesPassed") == {
        **_condition(status, "GatesPassed"),
        "status": "False",
        "reason": "GatesFailed",
    }
    assert "recall[critical]>=0.95" in _condition(status, "GatesPassed")["message"]
    assert status["gatesSummary"] == "0/1 passed"


def test_preempted_pod_is_retried_and_counted(api_client, namespace, start_operator):
    start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    wait_until(lambda: _running_pod(api_client, namespace) is not None, 60, "pod running")
    first = _running_pod(api_client, namespace)
    # An eviction (as for preemption or node drain) marks the pod DisruptionTarget.
    client.CoreV1Api(api_client).create_namespaced_pod_eviction(
        first.metadata.name,
        namespace,
        {"metadata": {"name": first.metadata.name, "namespace": namespace}},
    )
    wait_until(
        lambda: (p := _running_pod(api_client, namespace)) is not None and p.metadata.name != first.metadata.name,
        60, "replacement pod",
    )  # fmt: skip
    _finish(api_client, namespace, 0, json.dumps(RESULT))
    wait_until(lambda: _phase_is(api_client, namespace, "Succeeded"), 60, "Succeeded")
    status = _status(api_client, namespace)
    assert status["attempts"] == 2, (status.get("pod"), status.get("attempts"))


def test_suspend_and_resume(api_client, namespace, start_operator):
    start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    wait_until(lambda: _running_pod(api_client, namespace) is not None, 60, "pod running")
    objects, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)

    objects.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "triage", {"spec": {"suspend": True}}
    )
    wait_until(
        lambda: batch.read_namespaced_job("triage-train", namespace).spec.suspend,
        30,
        "Job suspended",
    )
    wait_until(lambda: _running_pod(api_client, namespace) is None, 60, "pods stopped")
    wait_until(
        lambda: (
            (_condition(_status(api_client, namespace), "Suspended") or {}).get("status") == "True"
        ),
        30,
        "Suspended condition",
    )
    assert _status(api_client, namespace)["phase"] == "Pending"

    objects.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "triage", {"spec": {"suspend": False}}
    )
    wait_until(lambda: _running_pod(api_client, namespace) is not None, 60, "pod running again")
    _finish(api_client, namespace, 0, json.dumps(RESULT))
    wait_until(lambda: _phase_is(api_client, namespace, "Succeeded"), 60, "Succeeded")
    wait_until(
        lambda: {"Suspended", "Resumed"} <= {r for r, _ in _events(api_client, namespace)},
        30,
        "Suspended and Resumed Events",
    )


def test_file_uris_are_refused_in_cluster(api_client, namespace, start_operator):
    start_operator()
    _create(
        api_client,
        namespace,
        _ftj(dataset={"train": "file:///data/train.jsonl"}, output={"uri": "s3://a/b"}),
    )
    wait_until(lambda: _phase_is(api_client, namespace, "Failed"), 30, "Failed")
    failed = _condition(_status(api_client, namespace), "Failed")
    assert failed["reason"] == "LocalURINotAllowed"
    assert "spec.dataset.train" in failed["message"]
    assert client.BatchV1Api(api_client).list_namespaced_job(namespace).items == []


def test_missing_secret_blocks_until_it_exists(api_client, namespace, start_operator):
    start_operator()
    _create(api_client, namespace, _ftj())
    wait_until(
        lambda: (
            (_condition(_status(api_client, namespace), "Ready") or {}).get("reason")
            == "SecretNotFound"
        ),
        30,
        "SecretNotFound",
    )
    assert "Secret 'storage'" in _condition(_status(api_client, namespace), "Ready")["message"]
    assert client.BatchV1Api(api_client).list_namespaced_job(namespace).items == []

    _secret(api_client, namespace)
    wait_until(
        lambda: client.BatchV1Api(api_client).list_namespaced_job(namespace).items,
        60,
        "Job after the Secret appears",
    )


def test_delete_removes_children_and_keeps_artifacts_by_default(
    api_client, namespace, start_operator, s3_server, s3_bucket
):
    start_operator()
    _secret(api_client, namespace, data=s3_server.env())
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="soc/triage/current.json", Body=b"{}")
    _create(
        api_client,
        namespace,
        _ftj(output={"uri": f"s3://{s3_bucket}/soc", "credentials": {"name": "storage"}}),
    )
    batch = client.BatchV1Api(api_client)
    wait_until(lambda: batch.list_namespaced_job(namespace).items, 30, "Job")

    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "triage"
    )
    wait_until(lambda: not batch.list_namespaced_job(namespace).items, 60, "Job garbage-collected")
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix="soc/triage/")["KeyCount"] == 1


def _allowing(s3_server) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Operator settings that let it call the test's S3 endpoint (chart: storage.endpoints)."""
    return {"env": {"SECTUNE_STORAGE_ENDPOINTS": s3_server.endpoint}}


def test_cleanup_policy_delete_removes_artifacts(
    api_client, namespace, start_operator, s3_server, s3_bucket
):
    start_operator(**_allowing(s3_server))
    _secret(api_client, namespace, data=s3_server.env())
    s3 = s3_server.client()
    for key in (
        "soc/triage/current.json",
        "soc/triage/versions/r1/manifest.json",
        "soc/other/current.json",
    ):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    _create_with_cleanup(api_client, namespace, s3_bucket)

    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "triage"
    )

    wait_until(lambda: _deleted(api_client, namespace), 60, "FineTuneJob deleted")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["soc/other/current.json"]  # only this job's prefix went


def test_storage_error_on_cleanup_is_reported_and_can_be_skipped(
    api_client, namespace, start_operator, s3_server, s3_bucket
):
    start_operator(**_allowing(s3_server))
    _secret(api_client, namespace, data={**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    _create_with_cleanup(api_client, namespace, s3_bucket)
    objects = client.CustomObjectsApi(api_client)
    objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "triage")

    wait_until(
        lambda: any(r == "CleanupFailed" for r, _ in _events(api_client, namespace)),
        60,
        "CleanupFailed event",
    )
    message = next(m for r, m in _events(api_client, namespace) if r == "CleanupFailed")
    assert "SignatureDoesNotMatch" in message and "sectune.io/skip-artifact-cleanup=true" in message

    objects.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "triage",
        {"metadata": {"annotations": {"sectune.io/skip-artifact-cleanup": "true"}}},
    )

    wait_until(lambda: _deleted(api_client, namespace), 60, "FineTuneJob released")


@pytest.mark.parametrize(
    ("output", "secret", "refusal"),
    [
        # no credentials: the operator would have deleted with its own identity
        ({"uri": "s3://{bucket}/soc"}, {}, "never its own"),
        # a tenant's Secret pointing the operator at an endpoint it was not given
        (
            {"uri": "s3://{bucket}/soc", "credentials": {"name": "storage"}},
            {"AWS_ENDPOINT_URL": "http://169.254.169.254"},
            "not allowed to call",
        ),
        # a Secret with no keys at all, while the operator's own environment holds valid ones:
        # boto3 would have fallen back on them and deleted another tenant's prefix
        (
            {"uri": "s3://{bucket}/soc", "credentials": {"name": "storage"}},
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_REGION": "eu-west-1"},
            "carries no AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY",
        ),
    ],
    ids=["no-credentials", "foreign-endpoint", "region-only-secret"],
)
def test_cleanup_never_acts_as_a_confused_deputy(
    api_client, namespace, start_operator, s3_server, s3_bucket, output, secret, refusal
):
    env = s3_server.env()
    # the operator's own identity could delete the prefix: it must never be used for it
    start_operator(env={**_allowing(s3_server)["env"], **env})
    data = {k: v for k, v in {**env, **secret}.items() if v is not None}
    _secret(api_client, namespace, data=data)
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="soc/triage/current.json", Body=b"{}")
    output = {**output, "uri": output["uri"].format(bucket=s3_bucket)}
    _create(api_client, namespace, _ftj(cleanupPolicy="Delete", output=output))
    finalizer = "sectune.io/artifact-cleanup"
    wait_until(
        lambda: finalizer in (_get(api_client, namespace)["metadata"].get("finalizers") or []),
        30,
        "finalizer",
    )
    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "triage"
    )

    wait_until(lambda: _deleted(api_client, namespace), 60, "FineTuneJob released")
    wait_until(
        lambda: any(r == "CleanupRefused" for r, _ in _events(api_client, namespace)),
        30,
        "CleanupRefused Event",
    )
    message = next(m for r, m in _events(api_client, namespace) if r == "CleanupRefused")
    assert refusal in message
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix="soc/triage/")["KeyCount"] == 1


def test_restarted_operator_creates_no_duplicate_and_converges(
    api_client, namespace, start_operator
):
    first = start_operator("first")
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    batch = client.BatchV1Api(api_client)
    wait_until(lambda: batch.list_namespaced_job(namespace).items, 30, "Job")
    first.stop(kill=True)

    start_operator("second")
    _finish(api_client, namespace, 0, json.dumps(RESULT))
    wait_until(lambda: _phase_is(api_client, namespace, "Succeeded"), 60, "Succeeded after restart")
    assert len(batch.list_namespaced_job(namespace).items) == 1


def test_operator_metrics(api_client, namespace, start_operator):
    operator = start_operator()
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj())
    _finish(api_client, namespace, 0, json.dumps(RESULT))
    wait_until(lambda: _phase_is(api_client, namespace, "Succeeded"), 60, "Succeeded")
    wait_until(
        lambda: (
            f'sectune_operator_finetunejobs{{namespace="{namespace}",phase="Succeeded"}} 1.0'
            in operator.metrics()
        ),
        30,
        "phase gauge",
    )
    text = operator.metrics()
    assert "sectune_operator_reconcile_duration_seconds_count" in text
    assert "sectune_operator_training_duration_seconds_count 1.0" in text


def test_operator_identity_cannot_read_what_it_does_not_need(operator_kubeconfig):
    from kubernetes import config as kube_config

    as_operator = client.CoreV1Api(kube_config.new_client_from_config(str(operator_kubeconfig)))
    with pytest.raises(ApiException) as refused:
        as_operator.list_secret_for_all_namespaces()
    assert refused.value.status == 403
    with pytest.raises(ApiException) as refused:
        as_operator.delete_collection_namespaced_pod("default")
    assert refused.value.status == 403


def test_max_concurrent_jobs_queues_the_rest(api_client, namespace, start_operator):
    start_operator(env={"SECTUNE_MAX_CONCURRENT_JOBS": "1"})
    _secret(api_client, namespace)
    _create(api_client, namespace, _ftj("first"))
    batch = client.BatchV1Api(api_client)
    wait_until(lambda: batch.list_namespaced_job(namespace).items, 30, "first Job")
    _create(api_client, namespace, _ftj("second"))
    wait_until(
        lambda: (
            (_condition(_status(api_client, namespace, "second"), "Ready") or {}).get("reason")
            == "Queued"
        ),
        30,
        "second queued",
    )
    assert [j.metadata.name for j in batch.list_namespaced_job(namespace).items] == ["first-train"]

    _finish(api_client, namespace, 0, json.dumps(RESULT), job="first")
    wait_until(
        lambda: len(batch.list_namespaced_job(namespace).items) == 2,
        60,
        "second Job once the first finished",
    )

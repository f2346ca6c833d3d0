"""Builders and status derivation: pure functions, no cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sectune.config import JobSpec
from sectune_operator.api import FineTuneJobSpec
from sectune_operator.builders.finetunejob import (
    CONFIG_ANNOTATION,
    build_job,
    build_service,
    pod_trainer_config,
)
from sectune_operator.settings import Settings
from sectune_operator.status import derive_status, progress_from_metrics, termination_message

NOW = "2026-11-23T08:00:00Z"


def _spec(**overrides: Any) -> FineTuneJobSpec:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://m/base"},
        "dataset": {"train": "s3://d/train.jsonl"},
        "task": {"labels": ["a", "b"]},
        "output": {"uri": "s3://out", "credentials": {"name": "storage"}},
    }
    spec.update(overrides)
    return FineTuneJobSpec.model_validate(spec)


def test_single_gpu_job_runs_sectune_train():
    job = build_job("j", _spec(), Settings())
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sectune", "train", "--config", "/etc/sectune/job.json"]
    assert "completionMode" not in job["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_multi_node_deepspeed_job_is_indexed_with_rendezvous():
    spec = _spec(
        resources={"gpus": 8, "nodes": 2, "distributed": {"strategy": "deepspeed", "zeroStage": 3}}
    )
    job = build_job("big", spec, Settings())
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "big-train"
    command = pod["containers"][0]["command"]
    assert command[:3] == ["accelerate", "launch", "--use_deepspeed"]
    # torch's elastic agent on every node: accelerate's default multi-node launcher is pdsh/ssh.
    assert command[command.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert command[command.index("--num_machines") + 1] == "2"
    assert command[command.index("--main_process_port") + 1] == "29500"
    assert command[-5:] == ["-m", "sectune.cli", "train", "--config", "/etc/sectune/job.json"]
    # No launch file: the trainer builds the DeepSpeed configuration from the job.
    assert "--deepspeed_config_file" not in command and "--config_file" not in command
    assert command[command.index("--num_processes") + 1] == "16"
    assert command[command.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert command[command.index("--main_process_ip") + 1] == "big-train-0.big-train"
    service = build_service("big")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {
        "sectune.io/finetunejob": "big"
    }


def test_tolerations_reach_the_pod_as_kubernetes_spells_them():
    tolerations = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300},
    ]
    job = build_job("j", _spec(resources={"tolerations": tolerations}), Settings())
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
         "tolerationSeconds": 300},
    ]  # fmt: skip


def test_ddp_on_several_gpus_uses_torchrun():
    spec = _spec(resources={"gpus": 4, "distributed": {"strategy": "ddp"}})
    command = build_job("j", spec, Settings())["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert command[:5] == ["torchrun", "--nnodes", "1", "--nproc_per_node", "4"]


def test_kueue_queue_creates_the_job_suspended_and_labelled():
    job = build_job("j", _spec(queueName="gpu-team"), Settings())
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"


def test_the_pod_reads_only_the_trainers_contract_from_its_annotation():
    job = build_job("j", _spec(queueName="q", resources={"gpus": 1, "memory": "8Gi"}), Settings())
    template = job["spec"]["template"]
    config = pod_trainer_config(template["metadata"]["annotations"])
    # The kubelet writes the annotation to the file the trainer's command names.
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    [item] = volume["downwardAPI"]["items"]
    assert item == {
        "path": "job.json",
        "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"},
    }
    [container] = template["spec"]["containers"]
    assert "/etc/sectune/job.json" in container["command"]
    assert {"name": "config", "mountPath": "/etc/sectune", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert config["name"] == "j"
    assert "queueName" not in config["spec"] and "memory" not in config["spec"]["resources"]
    assert JobSpec.model_validate(config["spec"]).output.uri == "s3://out"


def _job(conditions: list[dict[str, Any]] | None = None, suspend: bool = False) -> dict[str, Any]:
    return {
        "spec": {"suspend": suspend},
        "status": {"startTime": NOW, "conditions": conditions or []},
    }


def _failed_job(reason: str) -> dict[str, Any]:
    """A Job the Job controller marked Failed for `reason`."""
    return _job([{"type": "Failed", "status": "True", "reason": reason, "lastTransitionTime": NOW}])


def _pod(
    name: str, phase: str, exit_code: int | None = None, message: str | None = None
) -> dict[str, Any]:
    state: dict[str, Any] = (
        {"running": {}}
        if exit_code is None
        else {"terminated": {"exitCode": exit_code, "message": message}}
    )
    return {
        "metadata": {"name": name, "creationTimestamp": NOW},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def test_running_pod_means_preparing_until_the_first_step():
    status = derive_status(
        _job(), [_pod("p1", "Running")], {"phase": "Pending"}, 1, NOW, attempts=1
    )
    assert status["phase"] == "Preparing"
    status = derive_status(
        _job(), [_pod("p1", "Running")], {**status, "progress": {"step": 3}}, 1, NOW, attempts=1
    )
    assert status["phase"] == "Training"


def test_a_finished_trainer_is_succeeded_before_the_job_controller_says_so():
    """A one-pod Job whose trainer exited 0 is Succeeded at once (the Job controller, busy,
    may take a minute to mark it Complete); a multi-node Job waits for every node, and its
    phase never drops back to Pending meanwhile."""
    result = json.dumps({"phase": "Succeeded", "adapter": {"uri": "s3://a/b", "sha256": "0" * 64}})
    done = _pod("p1", "Succeeded", 0, result)
    status = derive_status(_job(), [done], {"phase": "Evaluating"}, 1, NOW, attempts=1)
    assert status["phase"] == "Succeeded"
    assert status["adapter"]["uri"] == "s3://a/b"

    multi_node = {**_job(), "spec": {"suspend": False, "completions": 2}}
    status = derive_status(multi_node, [done], {"phase": "Evaluating"}, 1, NOW, attempts=1)
    assert status["phase"] == "Evaluating"
    # A failed pod the Job controller will replace is waiting again: Pending.
    failed = _pod("p1", "Failed", 1, "boom")
    assert derive_status(_job(), [failed], {"phase": "Training"}, 1, NOW)["phase"] == "Pending"


def test_failed_job_takes_reason_and_message_from_the_trainer():
    message = json.dumps(
        {"reason": "InvalidInput", "message": "train.jsonl:3: field 'label' is missing"}
    )
    job = _failed_job("PodFailurePolicy")
    status = derive_status(
        job, [_pod("p1", "Failed", 2, message)], {"phase": "Training"}, 1, NOW, attempts=1
    )
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed"
    assert (failed["reason"], failed["message"]) == (
        "InvalidInput",
        "train.jsonl:3: field 'label' is missing",
    )


def test_log_tail_is_used_when_the_message_is_not_json():
    job = _failed_job("BackoffLimitExceeded")
    status = derive_status(
        job, [_pod("p1", "Failed", 1, "Traceback ... CUDA out of memory")], {}, 1, NOW, attempts=4
    )
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerError" and "CUDA out of memory" in failed["message"]
    assert status["attempts"] == 4


def test_terminal_status_is_never_rewritten():
    current = {"phase": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True"}]}
    assert derive_status(_job(), [], current, 2, NOW)["phase"] == "Succeeded"


def test_condition_transition_time_moves_only_on_change():
    first = derive_status(_job(suspend=True), [], {}, 1, "2026-01-01T00:00:00Z")
    second = derive_status(_job(suspend=True), [], first, 1, "2026-01-01T00:05:00Z")
    suspended = next(c for c in second["conditions"] if c["type"] == "Suspended")
    assert suspended["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_progress_from_trainer_metrics():
    text = (
        "sectune_train_step 40.0\nsectune_train_total_steps 160.0\nsectune_train_loss 0.51234\n"
        "sectune_train_tokens_per_second 812.3\nsectune_train_eta_seconds 95.2\n"
    )
    assert progress_from_metrics(text) == {
        "step": 40, "totalSteps": 160, "percent": 25, "loss": 0.5123,
        "tokensPerSecond": 812.3, "etaSeconds": 95, "display": "40/160",
    }  # fmt: skip
    assert progress_from_metrics("other_metric 1\n") is None


@pytest.mark.parametrize("message", [None, ""])
def test_no_termination_message(message):
    assert termination_message(_pod("p", "Succeeded", 0, message)) is None


def test_trainer_results_cross_the_boundary_old_new_and_oversized():
    from sectune.contract import ExitCode, ResultGate, TrainerResult

    # What a trainer before the versioned contract wrote still parses (as version 1).
    old = '{"phase":"Succeeded","reason":"GatesPassed","message":"ok","adapter":{"uri":"s3://a/v","sha256":"ab"},"gates":[{"name":"f1","passed":true,"value":0.9}]}'
    parsed = TrainerResult.parse(old, exit_code=0)
    assert parsed is not None and parsed.version == 1 and parsed.exit_code == 0
    assert (
        parsed.gates[0].passed and parsed.adapter is not None and parsed.adapter.uri == "s3://a/v"
    )
    # A newer trainer's unknown fields are ignored, never fatal.
    newer = '{"version":7,"phase":"Failed","reason":"GatesFailed","novelty":{"x":1},"gates":[]}'
    assert TrainerResult.parse(newer) == TrainerResult(
        version=7, phase="Failed", reason="GatesFailed"
    )
    assert TrainerResult.parse("Traceback (most recent call last): ...") is None
    # The message always fits the 4 KiB Kubernetes keeps: gates go first, then the message.
    big = TrainerResult(
        phase="Failed",
        reason="GatesFailed",
        message="m" * 3000,
        gates=[ResultGate(name=f"gate-{i}" * 10, passed=False, value=0.1) for i in range(100)],
    )
    text = big.to_message()
    assert len(text.encode()) <= 4096
    assert TrainerResult.parse(text) is not None
    assert [ExitCode.BAD_INPUT, ExitCode.GATES_FAILED] == [2, 3]
    # The Pod failure policy fails fast on exactly those.
    job = build_job("j", _spec(), Settings())
    [rule, _] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"]["values"] == [2, 3]

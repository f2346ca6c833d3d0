"""Fixtures shared by every tier.

The cluster and e2e tiers run against real components started here: one control plane per
session (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok), one namespace per
test, a MinIO S3 server with a bucket per test, and Prometheus on demand. A component that is
not installed fails the test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.controlplane import ControlPlane, add_gpu_nodes  # noqa: E402
from support.operator import OperatorProcess, install_chart_rbac  # noqa: E402
from support.prometheus import PrometheusServer  # noqa: E402
from support.s3 import S3Server  # noqa: E402

GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    from kubernetes import client, config

    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    try:
        core = client.CoreV1Api(config.new_client_from_config(str(plane.kubeconfig)))
        add_gpu_nodes(core, GPU_NODES)
        yield plane
    except BaseException:
        print(plane.logs(), file=sys.stderr)
        raise
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane):  # type: ignore[no-untyped-def]
    from kubernetes import config

    return config.new_client_from_config(str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> ControlPlane:
    """The sectune CRDs from crds/, installed and Established."""
    applied = control_plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    assert applied.returncode == 0, applied.stderr
    established = control_plane.kubectl(
        "wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/part-of=sectune"
    )
    assert established.returncode == 0, established.stderr
    return control_plane


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, control_plane: ControlPlane, api_client
) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh namespace per test, with its default ServiceAccount ready."""
    from kubernetes import client

    from support.processes import wait_until

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"sectune.dev/test": "true"}}})
    wait_until(
        lambda: bool(core.list_namespaced_service_account(name).items), 30, "default ServiceAccount"
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket per test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    """Prometheus from the Debian package; call .start(scrape_configs) in the test."""
    server = PrometheusServer(tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure of a test that used the control plane, attach the component logs."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed and "control_plane" in getattr(item, "fixturenames", ()):
        plane = item.funcargs.get("control_plane")  # type: ignore[attr-defined]
        if plane is not None:
            report.sections.append(("control plane logs", plane.logs()))
    return report


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("SECTUNE_LOG_LEVEL", "INFO")
    # Every run scores its base model unless a test sets a cache of its own: a user's
    # ~/.cache/sectune/scores never decides what a test measures.
    os.environ["SECTUNE_SCORE_CACHE"] = "off"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template (safetensors)."""
    from support.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --------------------------------------------------------------------------- the operator


@pytest.fixture(scope="session")
def operator_kubeconfig(crds: ControlPlane, api_client) -> Path:  # type: ignore[no-untyped-def]
    return install_chart_rbac(crds, api_client)


@pytest.fixture
def start_operator(
    operator_kubeconfig: Path, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator:  # type: ignore[type-arg]
    """Start operators watching the test's namespace; stopped (and their logs attached on
    failure) at the end of the test."""
    started: list[OperatorProcess] = []

    def start(name: str = "operator", **kwargs) -> OperatorProcess:  # type: ignore[no-untyped-def]
        process = OperatorProcess(operator_kubeconfig, tmp_path, name=name, **kwargs)
        process.env.setdefault("SECTUNE_WATCH", namespace)
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for process in started:
            print(f"----- {process.name} -----\n{process.log()[-6000:]}")

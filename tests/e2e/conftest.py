"""Helpers for the end-to-end tier: real training of a tiny model into the real S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sectune.yamlio import dump_yaml
from support.jobs import tiny_job, write_dataset
from support.kubelet import Kubelet
from support.replicas import ReplicaNetwork
from support.serving import SectuneServer, start_server
from support.trained import Trained, train_adapters


@pytest.fixture
def job_manifest(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """Write a FineTuneJob for the tiny model; returns a function taking spec overrides."""

    def make(name: str = "tiny", rows: int = 48, **spec_overrides: Any) -> Path:
        train = write_dataset(tmp_path / f"{name}-train.jsonl", rows)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_yaml(tiny_job(name, tiny_model_dir, train, **spec_overrides)))
        return path

    return make


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # type: ignore[no-untyped-def]
    """Storage credentials in the environment, as the operator sets them from the Secret."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


@pytest.fixture(scope="session")
def trained(s3_server, tiny_model_dir, tmp_path_factory) -> Trained:  # type: ignore[no-untyped-def]
    """Two versions of a triage adapter and one other adapter in the S3 server (trained once)."""
    return train_adapters(s3_server, tiny_model_dir, tmp_path_factory.mktemp("serving"))


@pytest.fixture
def serve(trained: Trained, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start `sectune serve` with the trained adapters' storage credentials; stopped after."""
    servers: list[SectuneServer] = []

    def start(*args: str) -> SectuneServer:
        server = start_server(tmp_path, list(args), trained.env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def kubelet(api_client, namespace, tmp_path) -> Iterator[Kubelet]:  # type: ignore[no-untyped-def]
    """Server pods of the AdapterDeployment `soc` run as local processes (see Kubelet)."""
    network = ReplicaNetwork()
    kube = Kubelet(api_client, namespace, tmp_path, network)
    yield kube
    kube.stop()
    network.stop()

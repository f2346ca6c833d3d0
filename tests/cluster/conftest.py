"""The operator, running as a process with only the Helm chart's RBAC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.controlplane import ControlPlane
from support.operator import OperatorProcess, install_chart_rbac


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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

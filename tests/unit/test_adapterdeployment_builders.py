"""AdapterDeployment rendering, replica reports and canary judgement: pure functions, no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sectune.serving.config import ServingConfig
from sectune.yamlio import load_yaml
from sectune_operator import canary, serving_status
from sectune_operator.api import AdapterDeploymentSpec, RollbackSpec
from sectune_operator.builders.adapterdeployment import (
    CONFIG_KEY,
    Resolved,
    build_configmap,
    build_deployment,
    build_network_policy,
    build_pdb,
    build_service,
    config_sha256,
    describe,
    fetch_command,
    render_serving_config,
    router_command,
)
from sectune_operator.settings import Settings

SHA = {n: f"{n}" * 64 for n in "abcdef"}


def _spec(**overrides: Any) -> AdapterDeploymentSpec:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/base"},
        "adapters": [
            {
                "name": "triage",
                "versions": [
                    {
                        "version": "v1",
                        "source": {"uri": "s3://a/triage/versions/r1", "sha256": SHA["a"]},
                        "traffic": 90,
                    },
                    {"version": "v2", "source": {"fineTuneJob": "triage-v2"}, "traffic": 10},
                ],
            },
            {
                "name": "tactics",
                "versions": [{"version": "v1", "source": {"fineTuneJob": "tactics"}}],
            },
        ],
        "credentials": {"name": "storage"},
    }
    spec.update(overrides)
    return AdapterDeploymentSpec.model_validate(spec)


RESOLVED = {
    ("triage", "v1"): Resolved("s3://a/triage/versions/r1", SHA["a"]),
    ("triage", "v2"): Resolved("s3://a/triage-v2/versions/r2", SHA["b"]),
    ("tactics", "v1"): Resolved("s3://a/tactics/versions/r3", SHA["c"]),
}


def _traffic(config: ServingConfig | None) -> dict[str, dict[str, int]]:
    assert config is not None
    return {a.name: {v.version: v.traffic for v in a.versions} for a in config.adapters}


def test_every_version_resolved_renders_the_spec_traffic_with_digests():
    rendered = render_serving_config(_spec(), RESOLVED, set(), None)
    assert _traffic(rendered.config) == {"triage": {"v1": 90, "v2": 10}, "tactics": {"v1": 100}}
    assert rendered.config is not None
    v2 = rendered.config.adapters[0].versions[1]
    assert (v2.uri, v2.sha256) == ("s3://a/triage-v2/versions/r2", SHA["b"])
    assert rendered.config.require_passed_gates is True
    assert describe(rendered.config) == "triage v1 90%, v2 10%; tactics v1 100%"


def test_an_unresolved_canary_gives_its_share_to_the_versions_that_resolve():
    resolved = {k: v for k, v in RESOLVED.items() if k != ("triage", "v2")}
    rendered = render_serving_config(_spec(), resolved, set(), None)
    assert _traffic(rendered.config)["triage"] == {"v1": 100}


def test_a_rolled_back_canary_stays_loaded_with_no_traffic():
    rendered = render_serving_config(_spec(), RESOLVED, {("triage", "v2")}, None)
    assert _traffic(rendered.config)["triage"] == {"v1": 100, "v2": 0}


def test_an_adapter_whose_main_version_cannot_be_served_keeps_its_previous_versions():
    before = render_serving_config(_spec(), RESOLVED, set(), None).config
    spec = _spec(
        adapters=[
            {
                "name": "triage",
                "versions": [{"version": "v3", "source": {"fineTuneJob": "failed-gates"}}],
            },
            {"name": "tactics", "versions": [{"version": "v1", "source": {"fineTuneJob": "t"}}]},
        ]
    )
    rendered = render_serving_config(
        spec, {("tactics", "v1"): RESOLVED[("tactics", "v1")]}, set(), before
    )
    assert _traffic(rendered.config)["triage"] == {"v1": 90, "v2": 10}
    assert rendered.kept_previous == ["triage"]
    nothing = render_serving_config(spec, {}, set(), None)
    assert nothing.config is None


def test_configmap_holds_a_serving_config_the_server_reads():
    config = render_serving_config(_spec(), RESOLVED, set(), None).config
    assert config is not None
    configmap = build_configmap("soc", config)
    parsed = ServingConfig.model_validate(load_yaml(configmap["data"][CONFIG_KEY]))
    assert parsed == config
    assert configmap["metadata"]["annotations"]["sectune.io/serving-config-sha256"] == (
        config_sha256(config)
    )


def test_server_deployment_is_restricted_probed_and_gets_credentials_by_reference():
    spec = _spec(replicas=3, resources={"gpus": 1}, authSecret={"name": "keys"})
    config = render_serving_config(spec, RESOLVED, set(), None).config
    assert config is not None
    deployment = build_deployment("soc", spec, config, Settings())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:4] == ["sectune", "serve", "--config", "/etc/sectune/serving.yaml"]
    assert container["command"][-2:] == ["--api-keys-file", "/etc/sectune/keys/api-keys"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secret_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert secret_env["AWS_SECRET_ACCESS_KEY"] == "storage"
    assert not any("value" in e and "SECRET" in e["name"] for e in container["env"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {
        "kubernetes.io/hostname"
    }
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    # A new adapter set is hot-swapped: it must not change the pod template (no restart).
    other = render_serving_config(spec, RESOLVED, {("triage", "v2")}, None).config
    assert other is not None
    assert (
        build_deployment("soc", spec, other, Settings())["spec"]["template"]
        == (deployment["spec"]["template"])
    )
    assert build_service("soc")["spec"]["ports"][0]["port"] == 8000
    assert build_pdb("soc")["spec"]["maxUnavailable"] == 1


def test_vllm_runtime_verifies_in_an_init_container_and_rolls_on_a_new_set():
    spec = _spec(
        runtime="vllm",
        adapters=[
            {
                "name": "triage",
                "versions": [
                    {
                        "version": "v1",
                        "source": {"uri": "s3://a/t/versions/r1", "sha256": SHA["a"]},
                    },
                    {"version": "v2", "source": {"fineTuneJob": "t2"}, "traffic": 0},
                ],
            }
        ],
    )
    config = render_serving_config(
        spec, RESOLVED | {("triage", "v2"): RESOLVED[("triage", "v2")]}, set(), None
    ).config
    assert config is not None
    deployment = build_deployment("soc", spec, config, Settings())
    pod = deployment["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["command"] == fetch_command()
    command = pod["containers"][0]["command"]
    assert command[:3] == ["vllm", "serve", "/adapters/base"]
    modules = command[command.index("--lora-modules") + 1 :]
    # Every version under its immutable served name only: `triage` is the router's to route.
    assert modules == [
        "triage@v1=/adapters/triage/v1/adapter",
        "triage@v2=/adapters/triage/v2/adapter",
    ]
    # vLLM listens on a port the NetworkPolicy admits from nowhere; the router takes the API's.
    assert command[command.index("--port") + 1] == "8001"
    assert pod["containers"][0]["ports"] == [{"name": "vllm", "containerPort": 8001}]
    ingress = build_network_policy("soc", spec, Settings())["spec"]["ingress"]
    assert sorted(p["port"] for rule in ingress for p in rule["ports"]) == [8000, 9400]
    # A different adapter set rolls the vLLM pods (their adapters are fixed at start);
    # rendering the same set again does not.
    annotation = "sectune.io/serving-config-sha256"
    rolled = deployment["spec"]["template"]["metadata"]["annotations"][annotation]
    again = build_deployment("soc", spec, config, Settings())
    assert again["spec"]["template"]["metadata"]["annotations"][annotation] == rolled
    [triage] = config.adapters
    fewer = config.model_copy(
        update={"adapters": [triage.model_copy(update={"versions": triage.versions[:1]})]}
    )
    changed = build_deployment("soc", spec, fewer, Settings())
    assert changed["spec"]["template"]["metadata"]["annotations"][annotation] != rolled

    # The router sidecar takes the Service's port (`http`) and reports what the replica serves;
    # it is Ready only when vLLM lists every verified version; Prometheus scrapes it (vLLM's
    # series pass through), the chart's PodMonitor tells the runtimes apart by the pod label.
    _, router = pod["containers"]
    assert router["command"] == router_command(spec)
    assert router["command"][:2] == ["sectune", "route-vllm"]
    assert "--api-keys-file" not in router["command"]  # no authSecret: no keys
    assert router["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in router["ports"]} == {
        "http": 8000,
        "metrics": 9400,
    }
    assert build_service("soc")["spec"]["ports"][0]["targetPort"] == "http"
    assert router["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"] for m in router["volumeMounts"]} == {"config", "adapters"}
    template = deployment["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == "9400"
    assert template["labels"]["sectune.io/runtime"] == "vllm"


def test_vllm_router_checks_the_deployments_keys_and_calls_vllm_with_its_own():
    """Clients present the same keys on both runtimes (the Secret's `api-keys`, mounted into
    the router only); vLLM gets `vllm-api-key`, which the router alone sends."""
    spec = _spec(runtime="vllm", authSecret={"name": "soc-keys"})
    config = render_serving_config(spec, RESOLVED, set(), None).config
    assert config is not None
    pod = build_deployment("soc", spec, config, Settings())["spec"]["template"]["spec"]
    vllm, router = pod["containers"]
    assert router["command"][-2:] == ["--api-keys-file", "/etc/sectune/keys/api-keys"]
    assert {m["name"] for m in router["volumeMounts"]} == {"config", "api-keys", "adapters"}
    assert "api-keys" not in {m["name"] for m in vllm["volumeMounts"]}
    [key] = router["env"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "soc-keys", "key": "vllm-api-key"}
    assert vllm["command"][vllm["command"].index("--api-key") + 1] == "$(SECTUNE_VLLM_API_KEY)"
    # A canary split is the router's to make: accepted on vLLM as on sectune.
    assert [v.traffic for v in config.adapters[0].versions] == [90, 10]


def test_base_is_not_an_adapter_name():
    with pytest.raises(ValidationError, match="reserved for the base model"):
        _spec(
            adapters=[
                {"name": "base", "versions": [{"version": "v1", "source": {"fineTuneJob": "x"}}]}
            ]
        )


# --------------------------------------------------------------------------- replica reports


def _info(adapter: str, version: str, sha256: str, traffic: int) -> str:
    return (
        f'sectune_serve_adapter_info{{adapter="{adapter}",version="{version}",'
        f'sha256="{sha256}",traffic="{traffic}"}} 1.0\n'
    )


INFO = "# TYPE sectune_serve_adapter_info gauge\n"
METRICS = (
    INFO
    + _info("triage", "v1", SHA["a"], 90)
    + _info("triage", "v2", SHA["b"], 10)
    + _info("tactics", "v1", SHA["c"], 100)
)
REFUSING = (
    INFO
    + _info("triage", "v1", SHA["a"], 100)
    + _info("tactics", "v1", SHA["c"], 100)
    + "# TYPE sectune_serve_adapter_refused gauge\n"
    + 'sectune_serve_adapter_refused{adapter="triage",version="v2",reason="integrity"} 1.0\n'
)


def test_a_swap_is_done_only_when_every_ready_replica_reports_the_rendered_set():
    config = render_serving_config(_spec(), RESOLVED, set(), None).config
    good = serving_status.parse_report("pod-a", METRICS)
    refusing = serving_status.parse_report("pod-b", REFUSING)
    both = serving_status.observe(config, [good, refusing], ["pod-a", "pod-b"])
    assert not both.converged and both.lagging == ["pod-b"]
    assert both.refusals == ["pod-b refused triage@v2 (integrity)"]
    assert ("triage", "v2", SHA["b"], 10) not in both.active  # not served by every replica
    active = serving_status.active_adapters(both.active, config)
    assert {(a.name, a.version) for a in active} == {("tactics", "v1")}
    assert active[0].uri == "s3://a/tactics/versions/r3"
    one = serving_status.observe(config, [good], ["pod-a"])
    assert one.converged and len(one.active) == 3
    silent = serving_status.observe(config, [good], ["pod-a", "pod-c"])
    assert silent.lagging == ["pod-c"]
    assert serving_status.phase(True, 2, 2, one, degraded=False) == "Ready"
    assert serving_status.phase(True, 2, 2, silent, degraded=False) == "Progressing"
    assert serving_status.phase(True, 3, 2, one, degraded=False) == "Degraded"
    assert serving_status.phase(False, 2, 0, one, degraded=False) == "Pending"


def test_garbage_metrics_are_no_report():
    assert serving_status.parse_report("p", "not {{ prometheus").served == set()


# --------------------------------------------------------------------------- canary judgement


def test_canary_figures_are_judged_against_each_bound():
    bounds = RollbackSpec(max_error_rate=0.02, max_latency_p95_ms=800, max_drift=0.25)
    assert canary.judge(canary.Figures(100, 0.01, 200.0, 0.1), bounds) is None
    errors = canary.judge(canary.Figures(100, 0.5, 200.0, 0.1), bounds)
    assert errors is not None and (errors.metric, errors.value) == ("errorRate", 0.5)
    slow = canary.judge(canary.Figures(100, 0.0, 1200.0, None), bounds)
    assert slow is not None and slow.metric == "latencyP95Ms" and slow.threshold == 800
    drift = canary.judge(canary.Figures(100, None, None, 0.4), bounds)
    assert drift is not None and drift.describe() == "drift 0.4 above 0.25"


def test_network_policies_admit_only_their_callers():
    from sectune_operator.builders import finetunejob

    settings = Settings(
        operator_namespace="sectune-system",
        monitoring_namespace="monitoring",
        api_namespaces=("soc-tools",),
    )
    training = finetunejob.build_network_policy("triage", settings)["spec"]
    assert training["podSelector"] == {"matchLabels": {"sectune.io/finetunejob": "triage"}}
    own, scrapes = training["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"sectune.io/finetunejob": "triage"}}}]}
    assert scrapes["ports"] == [{"protocol": "TCP", "port": 9400}]
    names = scrapes["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert names == ["monitoring", "sectune-system"]

    from sectune_operator.builders.adapterdeployment import build_network_policy

    serving = build_network_policy("soc", _spec(), settings)["spec"]
    [rule] = serving["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"][0] == {"podSelector": {}}  # its own namespace
    allowed = [f["namespaceSelector"]["matchExpressions"][0]["values"] for f in rule["from"][1:]]
    assert allowed == [["soc-tools"], ["monitoring", "sectune-system"]]
    # A vLLM pod's observer port: the operator and Prometheus only, not the API's callers.
    one = [{"name": "triage", "versions": [{"version": "v1", "source": {"fineTuneJob": "t"}}]}]
    vllm = build_network_policy("soc", _spec(runtime="vllm", adapters=one), settings)["spec"]
    api, observer = vllm["ingress"]
    assert api == rule
    assert observer["ports"] == [{"protocol": "TCP", "port": 9400}]
    [watchers] = observer["from"]
    assert watchers["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "monitoring", "sectune-system",
    ]  # fmt: skip


@pytest.mark.parametrize("runtime", ["sectune", "vllm"])
def test_server_replicas_go_to_the_gpu_pool_the_spec_names(runtime: str):
    """A GPU pool is labelled and tainted: replicas land there only with its selector and
    toleration; a spec without them renders no such fields (no rollout on upgrade)."""
    pool = {
        "gpus": 1,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "inference",
    }
    split = [{"name": "triage", "versions": [{"version": "v1", "source": {"fineTuneJob": "t"}}]}]
    spec = _spec(resources=pool, runtime=runtime, adapters=split)
    config = render_serving_config(
        spec, {("triage", "v1"): Resolved("s3://a/t", SHA["a"])}, set(), None
    ).config
    assert config is not None
    pod = build_deployment("soc", spec, config, Settings())["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "inference"
    plain = build_deployment(
        "soc", _spec(), render_serving_config(_spec(), RESOLVED, set(), None).config, Settings()
    )
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(
        plain["spec"]["template"]["spec"]
    )


def test_a_shadow_is_rendered_and_its_agreement_summed_over_replicas():
    spec = _spec(
        adapters=[
            {
                "name": "triage",
                "versions": [
                    {"version": "v1", "source": {"uri": "s3://a/triage/versions/r1", "sha256": SHA["a"]}},
                    {"version": "v2", "source": {"fineTuneJob": "triage-v2"}, "traffic": 0, "shadow": 0.25},
                ],
            }
        ]
    )  # fmt: skip
    config = render_serving_config(spec, RESOLVED, set(), None).config
    assert config is not None
    assert [(v.version, v.traffic, v.shadow) for v in config.adapters[0].versions] == [
        ("v1", 100, 0.0),
        ("v2", 0, 0.25),
    ]
    info = "".join(
        f'sectune_serve_adapter_info{{adapter="triage",version="{v}",sha256="{SHA[s]}",'
        f'traffic="{t}"}} 1.0\n'
        for v, s, t in (("v1", "a", 100), ("v2", "b", 0))
    )

    def shadowed(agree: int, disagree: int) -> str:
        return (
            "# TYPE sectune_serve_shadow_answers_total counter\n"
            f'sectune_serve_shadow_answers_total{{adapter="triage",version="v2",agree="true"}} {agree}.0\n'
            f'sectune_serve_shadow_answers_total{{adapter="triage",version="v2",agree="false"}} {disagree}.0\n'
        )  # fmt: skip

    reports = [
        serving_status.parse_report("pod-a", info + shadowed(30, 10)),
        serving_status.parse_report("pod-b", info + shadowed(10, 10)),
    ]
    observed = serving_status.observe(config, reports, ["pod-a", "pod-b"])
    assert observed.converged and observed.shadow_agreement == {("triage", "v2"): 40 / 60}
    active = serving_status.active_adapters(observed.active, config, observed.shadow_agreement)
    assert [(a.version, a.shadow, a.shadow_agreement) for a in active] == [
        ("v1", None, None),
        ("v2", 0.25, 0.6667),
    ]


@pytest.mark.parametrize(
    ("versions", "runtime", "message"),
    [
        ([("v1", 100, 0.5)], "sectune", "a shadow answers nobody; set its traffic to 0"),
        (
            [("v1", 100, 0.0), ("v2", 0, 0.5)],
            "vllm",
            "shadow: not implemented yet for runtime vllm",
        ),
    ],
)
def test_a_shadow_that_would_answer_or_runs_on_vllm_is_refused(versions, runtime, message):
    adapters = [
        {
            "name": "triage",
            "versions": [
                {"version": v, "traffic": t, "shadow": f, "source": {"fineTuneJob": f"j-{v}"}}
                for v, t, f in versions
            ],
        }
    ]
    with pytest.raises(ValidationError, match=message):
        _spec(adapters=adapters, runtime=runtime)


def test_replicas_with_a_feedback_store_find_each_other_through_a_headless_service():
    """Any replica may receive a verdict: it passes it to the one holding the answer, found
    among the addresses of a headless Service that lists every replica, ready or not."""
    from sectune_operator.builders.adapterdeployment import build_service

    one = [{"name": "triage", "versions": [{"version": "v1", "source": {"fineTuneJob": "t"}}]}]
    spec = _spec(adapters=one, replicas=3, feedback={"store": "s3://verdicts/soc"})
    config = render_serving_config(
        spec, {("triage", "v1"): Resolved("s3://a/t", SHA["a"])}, set(), None
    ).config
    assert config is not None
    [server] = build_deployment("soc", spec, config, Settings())["spec"]["template"]["spec"][
        "containers"
    ]
    command = server["command"]
    assert command[command.index("--peers-service") + 1] == "soc-serve-peers"
    [pod_ip] = [e for e in server["env"] if e["name"] == "SECTUNE_POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    peers = build_service("soc", peers=True)
    assert peers["metadata"]["name"] == "soc-serve-peers"
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == {"sectune.io/adapterdeployment": "soc"}
    # Without a store nothing is passed around: no peers, no pod address in the environment.
    plain = _spec(adapters=one, replicas=3)
    [server] = build_deployment("soc", plain, config, Settings())["spec"]["template"]["spec"][
        "containers"
    ]
    assert "--peers-service" not in server["command"]
    assert "SECTUNE_POD_IP" not in {e["name"] for e in server["env"]}

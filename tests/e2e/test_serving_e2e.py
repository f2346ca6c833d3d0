"""Serving for real: tiny adapters trained into the S3 server, `sectune serve` loading them with
digests verified, mixed-adapter batches, hot swaps, Prometheus scraping, and
`sectune evaluate --endpoint` against the stored evaluation."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sectune import storage
from sectune.yamlio import dump_yaml
from support.jobs import LOGIN_SCHEMA, sectune, tiny_job, write_login_lines
from support.monitoring import dashboard_queries, live_quality_query
from support.processes import wait_until
from support.serving import TEXTS, SectuneServer
from support.serving import serving_config as _config
from support.trained import Trained, Version

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _served(server: SectuneServer) -> dict[str, list[dict[str, Any]]]:
    models = server.get("/v1/models").json()
    return {m["id"]: m.get("versions", []) for m in models["data"]}


def test_two_adapters_served_with_verified_digests_in_mixed_batches(trained, serve, tmp_path):
    config = _config(
        tmp_path / "serving.yaml",
        {"triage": [("v1", trained.triage_v1, 100)], "other": [("v1", trained.other, 100)]},
    )
    server = serve("--config", str(config), "--max-wait-ms", "50")

    served = _served(server)
    assert [v["sha256"] for v in served["triage"]] == [trained.triage_v1.sha256]
    assert [v["sha256"] for v in served["other"]] == [trained.other.sha256]
    assert served["triage"][0]["uri"] == trained.triage_v1.uri

    # Alone, each request is its own batch.
    alone = {(m, t): server.classify(m, t).json() for m in ("triage", "other") for t in TEXTS}
    for answer in alone.values():
        assert answer["label"] in ("benign", "malicious")
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # The two adapters really differ (each request reached its own adapter).
    assert any(
        abs(alone["triage", t]["confidence"] - alone["other", t]["confidence"]) > 1e-4
        for t in TEXTS
    )
    # Together, requests for both adapters share batches and get the same answers.
    jobs = [(m, t) for m in ("triage", "other") for t in TEXTS] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: server.classify(*job).json(), jobs))
    for (model, text), answer in zip(jobs, together, strict=True):
        assert answer["model"] == f"{model}@v1"
        for label, p in answer["probabilities"].items():
            assert p == pytest.approx(alone[model, text]["probabilities"][label], abs=1e-4)
    batches = server.metric("sectune_serve_batch_size_sum", kind="classify")
    count = server.metric("sectune_serve_batch_size_count", kind="classify")
    assert batches is not None and count is not None and batches / count > 1

    chat = server.post(
        "/v1/chat/completions",
        {"model": "triage", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 4},
    )
    assert chat.status_code == 200
    body = chat.json()
    assert body["model"] == "triage@v1"
    # A tiny random model may end its turn at once ("stop", 0 tokens); it never runs past 4.
    finish, tokens = body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
    assert (finish, tokens <= 4) == ("stop", True) or (finish, tokens) == ("length", 4)
    assert chat.headers["x-sectune-adapter-sha256"] == trained.triage_v1.sha256
    base = server.post(
        "/v1/completions", {"model": "base", "prompt": "Failed password", "max_tokens": 3}
    )
    assert base.status_code == 200 and base.json()["model"] == "base"


def test_config_change_hot_swaps_versions_and_canary_splits_traffic(trained, serve, tmp_path):
    config = _config(tmp_path / "serving.yaml", {"triage": [("v1", trained.triage_v1, 100)]})
    server = serve("--config", str(config))
    pid = server.process.process.pid if server.process.process else None

    _config(config, {"triage": [("v1", trained.triage_v1, 50), ("v2", trained.triage_v2, 50)]})
    wait_until(lambda: len(_served(server)["triage"]) == 2, 60, "v2 loaded next to v1")
    answered = {server.classify("triage", TEXTS[0]).json()["model"] for _ in range(40)}
    assert answered == {"triage@v1", "triage@v2"}
    # A pinned version answers alone, whatever the split.
    assert {server.classify("triage@v2", TEXTS[0]).json()["model"] for _ in range(5)} == {
        "triage@v2"
    }

    _config(config, {"triage": [("v2", trained.triage_v2, 100)]})
    wait_until(
        lambda: [v["version"] for v in _served(server)["triage"]] == ["v2"], 60, "v1 unloaded"
    )
    gone = server.classify("triage@v1", TEXTS[0])
    assert gone.status_code == 404
    assert "triage@v1" in gone.json()["error"]["message"]
    assert server.process.alive() and server.process.process and server.process.process.pid == pid
    assert (server.metric("sectune_serve_config_reloads_total", result="applied") or 0) >= 3

    server.stop()  # SIGTERM, as the kubelet sends it: answered requests, clean exit
    assert server.process.process and server.process.process.returncode == 0


def test_a_version_that_fails_verification_is_refused_and_the_previous_stays(
    trained, serve, tmp_path
):
    config = _config(tmp_path / "serving.yaml", {"triage": [("v1", trained.triage_v1, 100)]})
    server = serve("--config", str(config))

    wrong = trained.other.sha256  # a real digest, of another version
    _config(config, {"triage": [("v2", Version(trained.triage_v2.uri, wrong), 100)]})
    wait_until(lambda: server.get("/v1/models").json()["errors"], 60, "the refusal reported")
    errors = server.get("/v1/models").json()["errors"]
    assert "sha256" in errors["triage@v2"] and wrong in errors["triage@v2"]
    assert [v["version"] for v in _served(server)["triage"]] == ["v1"]
    assert server.classify("triage", TEXTS[0]).json()["model"] == "triage@v1"
    assert (
        server.metric(
            "sectune_serve_adapter_load_failures_total",
            adapter="triage",
            version="v2",
            reason="integrity",
        )
        == 1
    )
    assert server.get("/readyz").status_code == 200

    # A file changed in the store after publishing: its digest no longer matches the manifest.
    client = _s3_client(trained)
    key = (
        trained.triage_v2.uri.removeprefix(f"s3://{trained.bucket}/")
        + "/adapter/adapter_config.json"
    )
    original = client.get_object(Bucket=trained.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=trained.bucket, Key=key, Body=original.replace(b'"r": 4', b'"r": 8'))
    try:
        _config(config, {"triage": [("v3", trained.triage_v2, 100)]})
        wait_until(
            lambda: "triage@v3" in server.get("/v1/models").json()["errors"], 60, "tamper reported"
        )
        message = server.get("/v1/models").json()["errors"]["triage@v3"]
        assert "adapter/adapter_config.json" in message and "sha256" in message
        assert [v["version"] for v in _served(server)["triage"]] == ["v1"]
    finally:
        client.put_object(Bucket=trained.bucket, Key=key, Body=original)

    invalid = config.read_text()
    config.write_text("adapters:\n- name: triage\n  versions: []\n")
    wait_until(
        lambda: server.metric("sectune_serve_config_reloads_total", result="invalid") == 1,
        60,
        "invalid config counted",
    )
    assert server.classify("triage", TEXTS[0]).json()["model"] == "triage@v1"
    assert "versions" in server.process.tail(200)
    config.write_text(invalid)


def _evaluate(env: dict[str, str], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`sectune evaluate ARGS --out OUT`, as a user runs it."""
    return sectune("evaluate", *args, "--out", str(out), env=env)


def _s3_client(trained: Trained) -> Any:
    return storage.tenant_s3_client(trained.env)


def test_job_prefix_follows_current_json_and_api_keys_guard_the_api(trained, serve, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(
        "# soc-bot: the triage bot; comment lines are never keys\n"
        "first-key-0123456789\n"
        "second second-key-0123456789\n"
        "scoped scoped-key-0123456789 other-adapter\n"
    )
    server = serve("--adapter", f"triage={trained.prefix}/triage", "--api-keys-file", str(keys))

    assert server.get("/v1/models").status_code == 401
    assert server.classify("triage", TEXTS[0]).status_code == 401
    assert server.classify("triage", TEXTS[0], key="wrong").status_code == 401
    comment = "# soc-bot: the triage bot; comment lines are never keys"
    assert server.classify("triage", TEXTS[0], key=comment).status_code == 401
    forbidden = server.classify("triage", TEXTS[0], key="scoped-key-0123456789")
    assert forbidden.status_code == 403 and "'scoped' may not use 'triage'" in forbidden.text
    served = server.get("/v1/models", key="second-key-0123456789").json()
    [triage] = [m for m in served["data"] if m["id"] == "triage"]
    # The job prefix resolved through current.json: the latest version that passed its gates.
    assert triage["versions"][0]["sha256"] == trained.triage_v2.sha256
    assert server.get("/readyz").status_code == 200 and server.get("/metrics").status_code == 200

    unknown = server.classify("nope", TEXTS[0], key="first-key-0123456789")
    assert unknown.status_code == 404 and "triage" in unknown.json()["error"]["message"]
    missing = server.post("/v1/classify", {"model": "triage"}, key="first-key-0123456789")
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "input"
    unimplemented = server.post(
        "/v1/chat/completions",
        {
            "model": "triage",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "lookup"}}],
        },
        key="first-key-0123456789",
    )
    assert unimplemented.status_code == 400
    assert unimplemented.json()["error"]["param"] == "tools"
    assert "not implemented yet" in unimplemented.json()["error"]["message"]
    too_long = server.post(
        "/v1/chat/completions",
        {"model": "triage", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
        key="first-key-0123456789",
    )
    assert too_long.status_code == 422 and "max_tokens" in too_long.json()["error"]["message"]
    huge = server.post(
        "/v1/classify", {"model": "triage", "input": "x" * 5_000_000}, key="first-key-0123456789"
    )
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]

    # current.json moves (a rollback here; a new run that passed its gates alike): followed.
    client, pointer_key = _s3_client(trained), "adapters/triage/current.json"
    original = client.get_object(Bucket=trained.bucket, Key=pointer_key)["Body"].read()
    v1_run = trained.triage_v1.uri.rsplit("/", 1)[1]
    pointer = {
        "version": v1_run,
        "manifest": f"versions/{v1_run}/manifest.json",
        "sha256": trained.triage_v1.sha256,
    }
    client.put_object(Bucket=trained.bucket, Key=pointer_key, Body=json.dumps(pointer).encode())
    try:

        def serving_v1() -> bool:
            answer = server.classify("triage", TEXTS[0], key="first-key-0123456789")
            return answer.headers.get("x-sectune-adapter-sha256") == trained.triage_v1.sha256

        wait_until(serving_v1, 60, "the moved current.json followed")
    finally:
        client.put_object(Bucket=trained.bucket, Key=pointer_key, Body=original)


def test_evaluate_endpoint_matches_the_stored_adapter_and_checks_gates(trained, serve, tmp_path):
    server = serve("--adapter", f"triage={trained.prefix}/triage")
    data = f"file://{trained.held_out}"
    env = trained.env

    stored = _evaluate(
        env,
        tmp_path / "stored",
        "--adapter",
        f"{trained.prefix}/triage",
        "--data",
        data,
        "--precision",
        "fp32",
    )
    assert stored.returncode == 0, stored.stderr[-3000:]
    served = _evaluate(
        env, tmp_path / "served", "--endpoint", server.url, "--model", "triage", "--data", data
    )
    assert served.returncode == 0, served.stderr[-3000:]
    a = json.loads((tmp_path / "stored" / "report.json").read_text())["models"]["tuned"]
    report = json.loads((tmp_path / "served" / "report.json").read_text())
    b = report["models"]["tuned"]
    assert report["adapter"] == {
        "model": "triage@current",
        "uri": trained.triage_v2.uri,
        "sha256": trained.triage_v2.sha256,
    }
    assert b["examples"] == a["examples"] == 24
    assert b["accuracy"] == a["accuracy"]
    assert b["macroF1"] == pytest.approx(a["macroF1"])
    assert b["rocAuc"] == pytest.approx(a["rocAuc"], abs=1e-6)
    assert b["expectedCalibrationError"] == pytest.approx(a["expectedCalibrationError"], abs=1e-3)
    assert b["consistency"] == 1.0 and b["latencyP95Ms"] > 0
    assert set(report["consistency"]) >= {"accuracy", "macroF1"}
    assert "served − training: accuracy" in served.stderr
    assert (tmp_path / "served" / "report.html").read_text().count("against training time") == 1

    gates = tmp_path / "gates.yaml"
    gates.write_text(
        "- metric: accuracy\n  min: 1.01\n- metric: macroF1\n  overBaseline: base\n  min: -1\n"
    )
    failed = _evaluate(
        env,
        tmp_path / "gated",
        "--endpoint",
        server.url,
        "--model",
        "triage",
        "--data",
        data,
        "--gates",
        str(gates),
    )
    assert failed.returncode == 3
    assert "gates failed: accuracy>=1.01" in failed.stderr
    gated = json.loads((tmp_path / "gated" / "report.json").read_text())
    # The margin over the base model uses the baseline measured at training time.
    [over_base] = [g for g in gated["gates"] if g["name"] == "macroF1-over-base>=-1"]
    assert over_base["passed"] and over_base["value"] is not None
    assert gated["baselinesFrom"].startswith("training time")

    pinned = _evaluate(
        env, tmp_path / "pinned", "--endpoint", server.url, "--model", "triage@v9", "--data", data
    )
    assert pinned.returncode == 2 and "no version 'v9'" in pinned.stderr


def test_prometheus_scrapes_latency_predictions_and_drift(trained, serve, tmp_path, prometheus):
    tampered = Version(trained.triage_v2.uri, "0" * 64)  # refused: its digest does not match
    config = _config(
        tmp_path / "serving.yaml",
        {
            "triage": [("v1", trained.triage_v1, 100), ("v9", tampered, 0)],
            "other": [("v1", trained.other, 100)],
        },
        drift={"windowMinutes": 5, "minRequests": 4},
    )
    server = serve("--config", str(config))
    target = server.url.removeprefix("http://")
    prometheus.start([{"job_name": "sectune-serve", "static_configs": [{"targets": [target]}]}])
    for text in TEXTS * 2:
        assert server.classify("triage", text).status_code == 200
        assert server.classify("other", text).status_code == 200

    def scraped() -> bool:
        rows = prometheus.query(
            'sum by (adapter) (sectune_serve_requests_total{endpoint="classify"})'
        )
        return {r["metric"]["adapter"]: float(r["value"][1]) for r in rows} == {
            "triage": 8.0,
            "other": 8.0,
        }

    wait_until(scraped, 60, "request counts scraped")
    [p95] = prometheus.query(
        'histogram_quantile(0.95, sum by (le) (sectune_serve_request_duration_seconds_bucket{adapter="triage"}))'
    )
    assert 0 < float(p95["value"][1]) < 60
    info = prometheus.query("sectune_serve_adapter_info")
    assert {(r["metric"]["adapter"], r["metric"]["sha256"]) for r in info} == {
        ("triage", trained.triage_v1.sha256),
        ("other", trained.other.sha256),
    }
    drift = prometheus.query("sectune_serve_drift_score")
    assert {r["metric"]["adapter"] for r in drift} == {"triage", "other"}
    assert all(0.0 <= float(r["value"][1]) <= 1.0 for r in drift)
    predictions = prometheus.query('sum(sectune_serve_predictions_total{adapter="triage"})')
    assert float(predictions[0]["value"][1]) == 8.0

    # Every query of the shipped Serving dashboard returns series from this real traffic (the
    # 5xx ratio only evaluates: nothing failed).
    def answered(expr: str) -> bool:
        return bool(prometheus.query(expr))

    for expr in dashboard_queries()["sectune-serving"]:
        if live_quality_query(expr):  # verdicts: test_feedback_e2e.py
            continue
        if 'code=~"5.."' in expr:
            prometheus.query(expr)
            continue
        wait_until(lambda expr=expr: answered(expr), 30, f"series for {expr}")


def test_evaluate_endpoint_on_an_extraction_adapter_generates_what_the_stored_one_does(
    trained, serve, tiny_model_dir, tmp_path
):
    data = write_login_lines(tmp_path / "logs.jsonl", 24)
    schema = LOGIN_SCHEMA
    document = tiny_job(
        "extract",
        tiny_model_dir,
        data,
        output={"uri": trained.prefix},
        dataset={"format": "instruction", "fields": {"instruction": "text", "output": "fields"}},
        task={"type": "extraction", "labels": [], "outputSchema": schema},
        hyperparameters={"epochs": 12, "learningRate": 0.02},  # enough to learn the JSON shape
        evaluation={"gates": [{"metric": "schemaCompliance", "min": 0.0}]},
    )
    manifest = tmp_path / "extract.yaml"
    manifest.write_text(dump_yaml(document))
    assert sectune("run", str(manifest), env=trained.env).returncode == 0
    server = serve("--adapter", f"extract={trained.prefix}/extract")
    held_out = write_login_lines(tmp_path / "held-out.jsonl", 8)

    stored = _evaluate(
        trained.env,
        tmp_path / "stored",
        "--adapter",
        f"{trained.prefix}/extract",
        "--data",
        f"file://{held_out}",
        "--precision",
        "fp32",
    )
    assert stored.returncode == 0, stored.stderr[-3000:]
    served = _evaluate(
        trained.env,
        tmp_path / "served",
        "--endpoint",
        server.url,
        "--model",
        "extract",
        "--data",
        f"file://{held_out}",
    )
    assert served.returncode == 0, served.stderr[-3000:]
    a = json.loads((tmp_path / "stored" / "report.json").read_text())
    b = json.loads((tmp_path / "served" / "report.json").read_text())
    for metric in ("formatCompliance", "schemaCompliance", "fieldF1", "exactMatch"):
        assert b["models"]["tuned"][metric] == pytest.approx(a["models"]["tuned"][metric]), metric
    assert b["models"]["tuned"]["examples"] == 8 and b["models"]["tuned"]["latencyP95Ms"] > 0
    # Greedy answers through the API are the stored adapter's answers (same prompts, fp32).
    same = [
        x["output"] == y["output"]
        for x, y in zip(a["probes"]["samples"], b["probes"]["samples"], strict=True)
    ]
    assert len(same) == 5 and sum(same) >= 4, (a["probes"]["samples"], b["probes"]["samples"])
    # ...and they are the adapter's: it learned the JSON's opening, the base model did not.
    assert all(x["output"].startswith('{"event": "ssh_login') for x in b["probes"]["samples"])
    base = server.post(
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "Accepted password for user0"}]},
    )
    assert not base.json()["choices"][0]["message"]["content"].startswith('{"event"')
    assert b["gatesPassed"] and "schemaCompliance" in b["consistency"]


def test_one_client_cannot_starve_or_fail_the_others(trained, serve):
    """Probes answer while the model is saturated; past --max-in-flight requests get 429 with
    Retry-After; a half-sent request is cut off; a prompt too long for the model is refused
    naming the field; a long padded alert is cut as training cuts it, not from the front."""
    import socket

    server = serve(
        "--adapter", f"triage={trained.prefix}/triage",
        "--max-in-flight", "3", "--read-timeout", "2", "--max-batch", "2",
    )  # fmt: skip
    long_chat = {
        "model": "base",
        "messages": [{"role": "user", "content": "describe the alert " * 20}],
        "max_tokens": 200,
    }
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(server.post, "/v1/chat/completions", long_chat) for _ in range(8)]
        wait_until(lambda: any(f.done() for f in busy), 120, "a first answer")
        probe = httpx.get(server.url + "/healthz", timeout=3)
        ready = httpx.get(server.url + "/readyz", timeout=3)
        answers = [f.result() for f in busy]
    assert probe.status_code == 200 and ready.json() == {"status": "ready"}
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"

    # A client that sends half a request line holds nothing for long.
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        sock.settimeout(10)
        assert sock.recv(1024) == b""  # closed by the server after --read-timeout

    too_long = server.post(
        "/v1/completions", {"model": "base", "prompt": "word " * 3000, "max_tokens": 16}
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    assert "context" in too_long.json()["error"]["message"]

    # An alert followed by filler keeps its head (system prompt and alert) in the prompt.
    alert = TEXTS[0]
    padded = server.classify("triage", alert + " filler" * 3000)
    assert padded.status_code == 200
    assert padded.json()["usage"]["prompt_tokens"] <= 96  # the job's maxSeqLength
    assert server.get("/healthz").json() == {"status": "ok"}  # no details without a key


def test_a_keyless_server_on_loopback_refuses_other_host_names(trained, serve):
    server = serve("--adapter", f"triage={trained.prefix}/triage")
    rebinding = httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example"})
    assert rebinding.status_code == 400
    assert server.get("/v1/models").status_code == 200


def test_tenants_on_a_shared_server_are_isolated_audited_and_revocable(trained, serve, tmp_path):
    """A key scoped to one adapter learns nothing of another; one key's flood is refused
    at its own limit while another key is served; refusals of every kind are audited with
    the client's address; a revoked key stops working without a restart; /metrics needs its
    scrape token."""
    keys = tmp_path / "api-keys"
    keys.write_text(
        "triage-bot triage-key-0123456789 triage concurrency=1\n"
        "other-bot other-key-0123456789 other\n"
        "admin admin-key-0123456789 *\n"
    )
    token = tmp_path / "metrics-token"
    token.write_text("scrape-token-0123456789\n")
    config = _config(
        tmp_path / "serving.yaml",
        {"triage": [("v1", trained.triage_v1, 100)], "other": [("v1", trained.other, 100)]},
    )
    server = serve(
        "--config", str(config), "--api-keys-file", str(keys),
        "--metrics-token-file", str(token), "--max-batch", "1",
    )  # fmt: skip
    admin, triage_key, other_key = (
        "admin-key-0123456789",
        "triage-key-0123456789",
        "other-key-0123456789",
    )

    # Scope: /v1/models, /v1/models/{name} and errors name only what the key may use.
    listed = server.get("/v1/models", key=triage_key).json()
    assert [m["id"] for m in listed["data"]] == ["triage"]
    assert trained.other.uri not in json.dumps(listed)
    assert server.get("/v1/models/other", key=triage_key).status_code == 403
    assert server.get("/v1/models/triage", key=triage_key).status_code == 200
    unknown = server.classify("nope", TEXTS[0], key=triage_key).json()["error"]["message"]
    assert "triage" in unknown and "other" not in unknown
    assert {m["id"] for m in server.get("/v1/models", key=admin).json()["data"]} == {
        "triage",
        "other",
        "base",
    }

    # One key at its concurrency limit gets 429; another key is served meanwhile.
    long_chat = {
        "model": "triage",
        "messages": [{"role": "user", "content": "describe the alert " * 20}],
        "max_tokens": 200,
    }
    # Eight at once, not four: an adapter that answers in a few tokens can finish one request
    # before a loaded machine's client threads send the next (seen once in a full run).
    with ThreadPoolExecutor(8) as pool:
        flood = [
            pool.submit(server.post, "/v1/chat/completions", long_chat, triage_key)
            for _ in range(8)
        ]
        other = server.classify("other", TEXTS[1], key=other_key)
        codes = sorted(f.result().status_code for f in flood)
    assert other.status_code == 200
    assert codes.count(200) >= 1 and 429 in codes, codes
    refused = next(f.result() for f in flood if f.result().status_code == 429)
    assert "'triage-bot' has 1 requests in flight" in refused.json()["error"]["message"]

    # Refusals before any route are audited too, with who and from where.
    chunked = httpx.post(
        server.url + "/v1/classify",
        content=iter([b'{"model": "triage"}']),
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert chunked.status_code == 411
    rebinding = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"})
    assert rebinding.status_code == 400
    log_lines = [
        json.loads(line)
        for line in server.process.log_path.read_text().splitlines()
        if line.startswith('{"time"')
    ]
    assert any(entry["status"] == 411 for entry in log_lines)
    assert any(entry["status"] == 400 and entry["key"] is None for entry in log_lines)
    assert all(entry["client"] == "127.0.0.1" for entry in log_lines)
    assert any(entry["status"] == 429 and entry["key"] == "triage-bot" for entry in log_lines)

    # Revoking a key (the Secret's file swapped) takes effect without a restart.
    assert server.classify("other", TEXTS[0], key=other_key).status_code == 200
    replacement = tmp_path / "api-keys.new"
    replacement.write_text("admin admin-key-0123456789 *\n")
    replacement.replace(keys)
    assert server.classify("other", TEXTS[0], key=other_key).status_code == 401
    assert server.classify("other", TEXTS[0], key=admin).status_code == 200

    # /metrics shows adapter identities: only with the scrape token.
    assert httpx.get(server.url + "/metrics").status_code == 401
    scraped = httpx.get(
        server.url + "/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"}
    )
    assert scraped.status_code == 200 and "sectune_serve_adapter_info" in scraped.text

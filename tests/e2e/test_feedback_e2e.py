"""Analysts' verdicts for real: `sectune serve` with a feedback store in the S3 server, answers
judged through POST /v1/feedback with scoped keys, the verdicts read back from the store
(sanitized, in the training format), and live quality computed by a real Prometheus running
the chart's own recording and alert rules, checked against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sectune import storage
from support.monitoring import dashboard_queries, live_quality_query
from support.processes import free_port, wait_until
from support.serving import TEXTS, start_server
from support.serving import serving_config as _config
from support.trained import Trained

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RULES = Path(__file__).resolve().parents[2] / "charts/sectune/files/prometheus/rules.yaml"
TRIAGE_KEY = "triage-key-0123456789"
OTHER_KEY = "other-key-0123456789"
LEAKY = "Failed password for root from 185.220.101.4 port 22 ssh2; sshpass -pHunter22xyz"


def _opposite(label: str) -> str:
    return "benign" if label == "malicious" else "malicious"


def test_verdicts_are_stored_sanitized_and_become_live_quality(
    trained: Trained, serve: Any, tmp_path: Path, prometheus: Any, s3_env: Any
) -> None:
    from sklearn.metrics import f1_score

    keys = tmp_path / "api-keys"
    keys.write_text(f"triage-bot {TRIAGE_KEY} triage\nother-bot {OTHER_KEY} other\n")
    store = f"s3://{trained.bucket}/feedback-{tmp_path.name}"
    config = _config(
        tmp_path / "serving.yaml",
        {
            "triage": [("v1", trained.triage_v1, 100), ("v2", trained.triage_v2, 0)],
            "other": [("v1", trained.other, 100)],
        },
        shadows={"triage@v2": 1.0},  # v2 scores every triage request, unseen
        feedback={
            "store": store,
            "batchSize": 8,
            "flushSeconds": 0.2,
            "minVerdicts": 10,
            "maxDrop": 0.0,
        },
    )
    server = serve("--config", str(config), "--api-keys-file", str(keys))
    prometheus.start(
        [{"job_name": "sectune-serve", "static_configs": [{"targets": [server.url[7:]]}]}],
        rule_files=[RULES],
    )

    # Answers carry ids; triage's analyst agrees with the first 8 and corrects the next 16.
    texts = [f"{t} run {i}" for i in range(6) for t in TEXTS] + [LEAKY]
    answers = [server.classify("triage", t, key=TRIAGE_KEY).json() for t in texts]
    assert len({a["id"] for a in answers}) == len(answers)
    truth = [a["label"] if i < 8 else _opposite(a["label"]) for i, a in enumerate(answers)]
    for answer, label in zip(answers, truth, strict=True):
        posted = server.post(
            "/v1/feedback",
            {
                "id": answer["id"],
                "label": label,
                "reviewer": "analyst-7",
                "comment": "confirmed with bob@example.org",
            },
            key=TRIAGE_KEY,
        )
        assert posted.status_code == 200, posted.text
        assert posted.json()["correct"] == (label == answer["label"])
        assert posted.json()["model"] == "triage@v1"

    # Idempotent per id; refusals name the field and store nothing.
    first = answers[0]
    again = server.post(
        "/v1/feedback",
        {
            "id": first["id"],
            "label": truth[0],
            "reviewer": "analyst-7",
            "comment": "confirmed with bob@example.org",
        },
        key=TRIAGE_KEY,
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    refusals = [
        ({"id": first["id"], "label": _opposite(truth[0])}, TRIAGE_KEY, 409, "id"),
        ({"id": "pred-0123456789abcdef01234567", "label": "benign"}, TRIAGE_KEY, 404, "id"),
        ({"id": answers[1]["id"], "label": "suspicious"}, TRIAGE_KEY, 422, "label"),
        ({"id": answers[1]["id"], "label": "benign"}, OTHER_KEY, 403, "id"),
        ({"id": answers[1]["id"], "label": "benign", "score": 1}, TRIAGE_KEY, 422, "score"),
    ]
    for body, key, status, field in refusals:
        refused = server.post("/v1/feedback", body, key=key)
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["error"]["param"] == field
    assert server.post("/v1/feedback", {"id": first["id"], "label": "benign"}).status_code == 401

    # The other adapter: every verdict corrects it, so its live macro-F1 is 0.
    other = [server.classify("other", t, key=OTHER_KEY).json() for t in texts[:12]]
    for answer in other:
        body = {"id": answer["id"], "label": _opposite(answer["label"])}
        assert server.post("/v1/feedback", body, key=OTHER_KEY).status_code == 200

    # A chat answer is judged accepted or rejected and stored with the reply to learn from.
    chat = server.post(
        "/v1/chat/completions",
        {"model": "triage", "messages": [{"role": "user", "content": LEAKY}], "max_tokens": 4},
        key=TRIAGE_KEY,
    ).json()
    assert chat["id"].startswith("chatcmpl-")
    assert (
        server.post(
            "/v1/feedback", {"id": chat["id"], "verdict": "accepted"}, key=TRIAGE_KEY
        ).status_code
        == 200
    )

    # Stored: one row per verdict, in the training format, sanitized.
    rows = [
        json.loads(line)
        for name in storage.list_files(f"{store}/triage")
        for line in storage.read_bytes(f"{store}/triage/{name}").decode().splitlines()
    ]
    classified = {r["id"]: r for r in rows if "label" in r}
    assert sorted(classified) == sorted(a["id"] for a in answers)
    assert [classified[a["id"]]["label"] for a in answers] == truth
    assert [m["role"] for r in rows if "messages" in r for m in r["messages"]][-1] == "assistant"
    dump = json.dumps(rows)
    for secret in ("185.220.101.4", "Hunter22xyz", "bob@example.org"):
        assert secret not in dump
    assert all(r["feedback"]["caller"] == "triage-bot" for r in classified.values())

    # Live quality in Prometheus, through the chart's recording rules, is scikit-learn's.
    predicted = [a["label"] for a in answers]
    expected = f1_score(truth, predicted, average="macro")

    def recorded(adapter: str, version: str = "v1") -> dict[str, float]:
        rows = prometheus.query(
            f'{{__name__=~"sectune:serve_live_macro_f1:1d|sectune:serve_verdicts:sum1d",'
            f'adapter="{adapter}",version="{version}"}}'
        )
        return {r["metric"]["__name__"]: float(r["value"][1]) for r in rows}

    wait_until(
        lambda: recorded("triage").get("sectune:serve_verdicts:sum1d") == 25,
        60,
        "triage's verdicts recorded",
    )
    assert recorded("triage")["sectune:serve_live_macro_f1:1d"] == pytest.approx(expected)
    wait_until(
        lambda: recorded("other").get("sectune:serve_verdicts:sum1d") == 12,
        60,
        "other's verdicts recorded",
    )
    assert recorded("other")["sectune:serve_live_macro_f1:1d"] == 0.0
    # The shadow answered every triage request without being seen (every answer came from v1),
    # and the same verdicts judge it: its live macro-F1 is there before any user sees it.
    assert {a["model"] for a in answers} == {"triage@v1"}
    shadowed = sum(
        server.metric("sectune_serve_shadow_answers_total", adapter="triage", version="v2",
                      agree=agree) or 0
        for agree in ("true", "false")
    )  # fmt: skip
    assert shadowed == len(answers)
    wait_until(lambda: recorded("triage", "v2").get("sectune:serve_verdicts:sum1d") == 25, 60,
               "the shadow's verdicts recorded")  # fmt: skip
    assert 0.0 <= recorded("triage", "v2")["sectune:serve_live_macro_f1:1d"] <= 1.0
    [offline] = prometheus.query('sectune_serve_offline_macro_f1{adapter="other"}')
    assert float(offline["value"][1]) > 0  # it got something right on its held-out data

    # ... and the alert is on its way for the adapter analysts keep correcting (for: 15m).
    def pending(adapter: str, version: str = "v1") -> bool:
        return bool(
            prometheus.query(
                f'ALERTS{{alertname="SectuneLiveQualityDropped",adapter="{adapter}",'
                f'version="{version}"}}'
            )
        )

    wait_until(lambda: pending("other"), 30, "SectuneLiveQualityDropped pending for other")
    [triage_offline] = prometheus.query(
        'sectune_serve_offline_macro_f1{adapter="triage",version="v1"}'
    )
    assert pending("triage") == (float(triage_offline["value"][1]) > expected)

    # Every Live quality panel of the shipped Serving dashboard answers from this traffic.
    for expr in dashboard_queries()["sectune-serving"]:
        if live_quality_query(expr):
            wait_until(lambda expr=expr: bool(prometheus.query(expr)), 30, f"series for {expr}")


def test_a_verdict_reaches_the_replica_that_gave_the_answer_whichever_replica_it_lands_on(
    trained: Trained, tmp_path: Path, s3_env: Any
) -> None:
    """Two replicas behind one address: an analyst's verdict lands on either; the one that did
    not answer passes it, with the caller's key, to the one that did, which stores it once."""
    keys = tmp_path / "api-keys"
    keys.write_text(f"triage-bot {TRIAGE_KEY} triage\nother-bot {OTHER_KEY} other\n")
    store = f"s3://{trained.bucket}/feedback-{tmp_path.name}"
    config = _config(
        tmp_path / "serving.yaml",
        {"triage": [("v1", trained.triage_v1, 100)], "other": [("v1", trained.other, 100)]},
        feedback={"store": store, "batchSize": 4, "flushSeconds": 0.2},
    )
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    replicas = []
    try:
        for port, address in zip(ports, addresses, strict=True):
            args = ["--config", str(config), "--api-keys-file", str(keys)]
            args += ["--peers", ",".join(addresses), "--advertise", address]
            replicas.append(start_server(tmp_path, args, trained.env, port=port))
        answering, other = replicas
        answers = [answering.classify("triage", t, key=TRIAGE_KEY).json() for t in TEXTS[:4]]
        for answer in answers:
            posted = other.post("/v1/feedback", {"id": answer["id"], "label": "malicious"},
                                key=TRIAGE_KEY)  # fmt: skip
            assert posted.status_code == 200, posted.text
            assert posted.json()["model"] == "triage@v1"
        first = {"id": answers[0]["id"], "label": "malicious"}
        assert other.post("/v1/feedback", first, key=TRIAGE_KEY).json()["duplicate"] is True
        # The holder's refusals come back as it gave them; the caller's key is the one checked.
        refusals = [
            ({"id": answers[0]["id"], "label": "benign"}, TRIAGE_KEY, 409),
            ({"id": answers[1]["id"], "label": "benign"}, OTHER_KEY, 403),
            ({"id": answers[1]["id"], "label": "suspicious"}, TRIAGE_KEY, 422),
            ({"id": answers[1]["id"][:-4] + "0000", "label": "benign"}, TRIAGE_KEY, 404),
        ]
        for body, key, status in refusals:
            refused = other.post("/v1/feedback", body, key=key)
            assert refused.status_code == status, (body, refused.text)
            assert refused.json()["error"]["param"] in ("id", "label")
        assert other.post("/v1/feedback", first).status_code == 401  # no key: not passed on
        # Counted where the answer was given, stored once each.
        assert _verdicts(answering) == 4 and _verdicts(other) == 0
        rows = [
            json.loads(line)
            for name in storage.list_files(f"{store}/triage")
            for line in storage.read_bytes(f"{store}/triage/{name}").decode().splitlines()
        ]
        assert sorted(r["id"] for r in rows) == sorted(a["id"] for a in answers)
        # The replica that gave an answer is gone: the verdict is refused for a retry, not lost
        # silently or stored by a replica that never saw the answer.
        late = answering.classify("triage", f"{TEXTS[0]} late", key=TRIAGE_KEY).json()
        answering.stop()
        gone = other.post("/v1/feedback", {"id": late["id"], "label": "benign"}, key=TRIAGE_KEY)
        assert gone.status_code == 503 and gone.headers["Retry-After"] == "2"
    finally:
        for replica in replicas:
            replica.stop()


def _verdicts(server: Any) -> float:
    """Every verdict a server counted (sectune_serve_verdicts_total, all label pairs)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(server.get("/metrics").text)
        for sample in family.samples
        if sample.name == "sectune_serve_verdicts_total"
    )


def test_the_loop_on_a_laptop_serve_judge_retrain_on_the_corrections(
    trained: Trained, serve: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`sectune serve --feedback-store file://…` → answers judged → SIGTERM writes what is
    pending → `sectune run` trains on the verdicts (newest held out) and gates on them against
    the version that was served."""
    from sectune.yamlio import dump_yaml
    from support.jobs import sectune, tiny_job, write_dataset

    store = tmp_path / "verdicts"
    server = serve(
        "--adapter", f"triage={trained.prefix}/triage", "--feedback-store", f"file://{store}"
    )
    alerts = [json.loads(line) for line in
              write_dataset(tmp_path / "alerts.jsonl", 40, seed=11).read_text().splitlines()]  # fmt: skip
    for alert in alerts:
        answer = server.classify("triage", alert["text"]).json()
        judged = server.post("/v1/feedback", {"id": answer["id"], "label": alert["label"]})
        assert judged.status_code == 200, judged.text
    served = server.get("/v1/models").json()["data"][0]["versions"][0]
    server.stop()  # SIGTERM: anything pending is written first
    stored = [line for f in store.rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(stored) == 40

    train = write_dataset(tmp_path / "train.jsonl", 48, seed=12)
    job = tiny_job(
        "triage", tiny_model_dir, train,
        dataset={"feedback": {"uri": f"file://{store}/triage", "holdOut": 0.25}},
        evaluation={
            "probeExamples": 4,
            "previousVersion": {"uri": served["uri"], "sha256": served["sha256"]},
            "gates": [{"metric": "accuracy", "basis": "verdicts", "overBaseline": "previous",
                       "min": -1.0}],
        },
        output={"uri": f"file://{tmp_path}/out"},
    )  # fmt: skip
    manifest = tmp_path / "retrain.yaml"
    manifest.write_text(dump_yaml(job))
    result = sectune("run", str(manifest), env=trained.env)
    assert result.returncode == 0, result.stderr[-3000:]
    [report_path] = (tmp_path / "out" / "triage" / "versions").glob("*/report.json")
    report = json.loads(report_path.read_text())
    fed = report["data"]["sources"]["feedback"]
    assert (fed["rows"], fed["used"], fed["heldOut"]) == (40, 30, 10)
    assert report["verdicts"]["rows"] == 10
    [gate] = report["gates"]
    assert gate["passed"] and gate["value"] == pytest.approx(
        report["verdicts"]["tuned"]["accuracy"] - report["verdicts"]["previous"]["accuracy"]
    )
    assert report["previousVersion"]["sha256"] == served["sha256"]
    page = (report_path.parent / "report.html").read_text()
    assert "On the newest analysts' verdicts (10 rows, never trained on)" in page

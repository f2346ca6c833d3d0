"""The serving pieces that need no server: config validation, drift math, digest-verified fetches,
and the model worker's mixed-adapter batches on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sectune import artifacts
from sectune.config import ManifestError
from sectune.contract import RunReport
from sectune.serving.config import config_from_flags, load_serving_config, parse_serving_config
from sectune.serving.drift import DriftMonitor, js_divergence, reference_distribution
from support.manifests import adapter_manifest


def _version(uri: str = "s3://b/jobs/triage/versions/r1", **extra: object) -> dict[str, object]:
    return {"version": "v1", "uri": uri, "sha256": "a" * 64, **extra}


def test_a_valid_config_parses_with_defaults() -> None:
    config = parse_serving_config(
        {"adapters": [{"name": "triage", "versions": [_version()]}]}, "serving.yaml"
    )
    assert config.base_model is None
    assert config.adapters[0].versions[0].traffic == 100
    assert config.drift.window_minutes == 60


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"adapters": [{"name": "triage", "versions": [_version(traffic=60)]}]},
            "adapters.0: adapters[triage].versions: traffic adds up to 60; make it 100",
        ),
        (
            {"adapters": [{"name": "Triage", "versions": [_version()]}]},
            "adapters.0.name: String should match pattern",
        ),
        (
            {"adapters": [{"name": "base", "versions": [_version()]}]},
            "'base' is reserved for the base model",
        ),
        (
            {
                "adapters": [
                    {"name": "t", "versions": [_version()]},
                    {"name": "t", "versions": [_version()]},
                ]
            },
            "names must be unique; repeated: t",
        ),
        (
            {"adapters": [{"name": "t", "versions": [_version(uri="https://example.com/a")]}]},
            "adapters.0.versions.0.uri: String should match pattern",
        ),
        (
            {"adapters": [{"name": "t", "versions": [_version(sha256="abc")]}]},
            "adapters.0.versions.0.sha256",
        ),
        (
            {"adapters": [{"name": "t", "versions": []}]},
            "adapters.0.versions: List should have at least 1",
        ),
        (
            {"adapters": [{"name": "t", "versions": [_version()]}], "replicas": 2},
            "replicas: Extra inputs",
        ),
    ],
)
def test_bad_configs_name_the_field(document: dict[str, object], expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_serving_config(document, "serving.yaml")
    assert str(caught.value).startswith("serving.yaml: the serving config is not valid:")
    assert expected in str(caught.value)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"missing\.yaml: cannot read"):
        load_serving_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("adapters: [\n")
    with pytest.raises(ManifestError, match=r"broken\.yaml: not valid YAML"):
        load_serving_config(broken)


def test_adapter_flags_follow_each_jobs_current_version() -> None:
    config = config_from_flags(["triage=s3://b/jobs/triage", "intel=file:///out/intel"], None)
    assert [(a.name, a.versions[0].version, a.versions[0].sha256) for a in config.adapters] == [
        ("triage", "current", None),
        ("intel", "current", None),
    ]
    with pytest.raises(ManifestError, match="expected name=URI"):
        config_from_flags(["s3://b/jobs/triage"], None)


def test_js_divergence_bounds_and_a_known_value() -> None:
    p = {"benign": 0.5, "malicious": 0.5}
    assert js_divergence(p, p) == 0.0
    assert js_divergence({"benign": 1.0}, {"malicious": 1.0}) == pytest.approx(1.0)
    # JS({1, 0}, {0.5, 0.5}) = 1.5 - 0.75 * log2(3) bits.
    expected = 1.5 - 0.75 * math.log2(3)
    assert js_divergence({"benign": 1.0}, p) == pytest.approx(expected)


def test_reference_distribution_is_the_tuned_models_predicted_labels() -> None:
    report = {
        "models": {
            "tuned": {
                "confusionMatrix": {"labels": ["benign", "malicious"], "matrix": [[3, 1], [0, 4]]}
            }
        }
    }
    assert reference_distribution(RunReport.model_validate(report)) == {
        "benign": 3 / 8,
        "malicious": 5 / 8,
    }
    no_labels = RunReport.model_validate({"models": {"tuned": {"validationLoss": 1.0}}})
    assert reference_distribution(no_labels) is None


def test_drift_monitor_needs_enough_predictions_and_forgets_old_ones() -> None:
    monitor = DriftMonitor({"benign": 0.5, "malicious": 0.5}, window_seconds=60, min_requests=4)
    for t in range(3):
        monitor.record("malicious", now=t)
    assert monitor.score(now=3) is None
    monitor.record("benign", now=3)
    assert monitor.score(now=3) == pytest.approx(
        js_divergence({"benign": 0.25, "malicious": 0.75}, monitor.reference)
    )
    # A minute later only the last prediction is in the window: too few to say.
    assert monitor.score(now=62.5) is None


def _publish(tmp_path: Path) -> tuple[str, artifacts.Published]:
    from sectune import storage

    stage = tmp_path / "stage"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (stage / "report.json").write_text("{}")
    (stage / "report.html").write_text("<html></html>")
    prefix = storage.parse_uri(f"file://{tmp_path}/store/triage")
    return prefix.uri, artifacts.publish(stage, prefix, "r1", adapter_manifest("triage"))


def test_resolve_version_follows_current_json_and_demands_a_digest_for_a_version(
    tmp_path: Path,
) -> None:
    prefix, published = _publish(tmp_path)
    assert artifacts.resolve_version(prefix, None) == (published.uri, published.manifest_sha256)
    assert artifacts.resolve_version(published.uri, "b" * 64) == (published.uri, "b" * 64)
    with pytest.raises(artifacts.IntegrityError, match=r"needs the sha256 of its manifest\.json"):
        artifacts.resolve_version(published.uri, None)
    with pytest.raises(artifacts.IntegrityError, match="not the expected"):
        artifacts.resolve_version(prefix, "c" * 64)
    with pytest.raises(artifacts.IntegrityError, match="neither a published version"):
        artifacts.resolve_version(f"file://{tmp_path}/nothing", None)


def test_fetch_verified_takes_only_what_it_verified(tmp_path: Path) -> None:
    _, published = _publish(tmp_path)
    dest = tmp_path / "fetched"
    manifest = artifacts.fetch_verified(
        published.uri, published.manifest_sha256, dest, include=("adapter/", "report.json")
    )
    assert manifest.job == "triage"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "adapter/adapter_model.safetensors",
        "manifest.json",
        "report.json",
    ]

    with pytest.raises(artifacts.IntegrityError, match=r"manifest\.json: sha256"):
        artifacts.fetch_verified(published.uri, "0" * 64, tmp_path / "wrong", include=("adapter/",))
    weights = Path(published.uri.removeprefix("file://")) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)  # same size, other content
    with pytest.raises(
        artifacts.IntegrityError, match=r"adapter/adapter_model\.safetensors: content"
    ):
        artifacts.fetch_verified(
            published.uri, published.manifest_sha256, tmp_path / "t", include=("adapter/",)
        )
    assert not (tmp_path / "t").exists()  # nothing half-fetched is left to be mistaken for good
    json.loads((dest / "manifest.json").read_text())


def _random_adapters(tiny_model_dir: Path, directory: Path) -> None:
    """Two LoRA adapters with random (not zero) weights on the tiny model: `a` and `b`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(
            directory / name
        )


def test_engine_batches_mix_adapters_with_the_answers_each_gives_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune.serving.engine import (
        BASE_ADAPTER,
        AdapterGone,
        ClassifyWork,
        Engine,
        GenerateWork,
    )
    from sectune.serving.metrics import ServingMetrics

    _random_adapters(tiny_model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    metrics = ServingMetrics()
    engine = Engine(model, tokenizer, metrics, autocast=False, max_batch=8, max_wait_ms=200)
    engine.start()
    try:
        engine.load_adapter(str(tmp_path / "a"), "a")
        engine.load_adapter(str(tmp_path / "b"), "b")
        prompt = list(tokenizer("Failed password for admin")["input_ids"])
        labels = [[5], [9], [17]]

        def classify(key: str) -> ClassifyWork:
            return ClassifyWork(key, prompt, labels, distinct_first_tokens=True)

        alone = {key: engine.submit(classify(key)).result() for key in ("a", "b", BASE_ADAPTER)}
        together = [engine.submit(classify(key)) for key in ("a", "b", BASE_ADAPTER, "a")]
        results = [f.result() for f in together]
        for key, result in zip(("a", "b", BASE_ADAPTER, "a"), results, strict=True):
            assert result == pytest.approx(alone[key], abs=1e-5)
        assert max(abs(x - y) for x, y in zip(alone["a"], alone["b"], strict=True)) > 1e-4
        assert metrics.batch_size.labels("classify")._sum.get() > 3  # a batch held several

        exact = ClassifyWork("a", prompt, [[5, 9], [5, 17]], distinct_first_tokens=False)
        assert sum(engine.submit(exact).result()) == pytest.approx(1.0)

        generated = engine.submit(GenerateWork("b", prompt, max_new_tokens=3)).result()
        assert len(generated.token_ids) <= 3 and generated.finish_reason in ("stop", "length")

        engine.unload_adapter("a")
        assert list(engine.model.peft_config) == ["b"]
        # A request routed to an adapter just unloaded fails alone; its batch-mates are answered.
        gone, kept = engine.submit(classify("a")), engine.submit(classify("b"))
        with pytest.raises(AdapterGone, match="adapter a was unloaded"):
            gone.result()
        assert kept.result() == pytest.approx(alone["b"], abs=1e-5)
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- hardening


def test_api_keys_file_comments_ids_scopes_and_errors(tmp_path: Path) -> None:
    from sectune.serving.auth import load_api_keys, parse_api_keys

    keys = parse_api_keys(
        "# the SOC bot\n\nsoc-bot aaaaaaaaaaaaaaaa0 triage,attack\nbbbbbbbbbbbbbbbb1\n", "keys"
    )
    assert [(k.id, k.adapters) for k in keys] == [
        ("soc-bot", frozenset({"triage", "attack"})),
        ("key-4", None),
    ]
    assert keys[0].allows("triage") and not keys[0].allows("other") and keys[1].allows("x")
    with pytest.raises(ManifestError, match="keys:2: the key is shorter than 16"):
        parse_api_keys("# c\nbot short\n", "keys")
    with pytest.raises(ManifestError, match="no API keys"):
        parse_api_keys("# only a comment\n", "keys")
    with pytest.raises(ManifestError, match="appears twice"):
        parse_api_keys("a aaaaaaaaaaaaaaaa0\na bbbbbbbbbbbbbbbb1\n", "keys")
    with pytest.raises(ManifestError, match="cannot read"):
        load_api_keys(tmp_path / "missing")


def test_empty_api_keys_variable_is_an_error_not_auth_off(monkeypatch, capsys) -> None:
    from sectune.cli import main

    monkeypatch.setenv("SECTUNE_API_KEYS_FILE", "")
    assert main(["serve", "--adapter", "a=file:///nowhere"]) == 2
    assert "SECTUNE_API_KEYS_FILE is set but empty" in capsys.readouterr().err


def test_default_allowed_hosts() -> None:
    from sectune.serving.server import default_allowed_hosts

    assert "localhost" in default_allowed_hosts("127.0.0.1")
    assert "*" not in default_allowed_hosts("::1")
    assert default_allowed_hosts("0.0.0.0") == ["*"]


def test_fit_prompt_keeps_head_and_tail_like_training() -> None:
    from sectune.data.format import fit_prompt

    prompt = list(range(100))
    assert fit_prompt(prompt, 200) == prompt
    assert fit_prompt(prompt, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]


def test_a_failing_row_fails_alone_and_abandoned_work_never_runs() -> None:
    from sectune.serving.engine import ClassifyWork, Engine
    from sectune.serving.metrics import ServingMetrics

    ran: list[list[list[int]]] = []

    def classify(works: list[ClassifyWork]) -> None:
        ran.append([w.prompt for w in works])
        if any(w.prompt == [666] for w in works):
            raise ValueError("poisoned row")
        for w in works:
            w.future.set_result([1.0])

    engine = Engine.__new__(Engine)  # the batching logic only, without a model
    engine.max_batch_tokens, engine.max_queue_seconds = 8, 30.0
    engine.autocast, engine.metrics = False, ServingMetrics()
    engine._loaded = lambda key: True  # type: ignore[method-assign]
    engine._amp = lambda: __import__("contextlib").nullcontext()  # type: ignore[method-assign]
    engine._classify = classify  # type: ignore[method-assign]
    good = [ClassifyWork("a", [1], label_ids=[[1]], distinct_first_tokens=True) for _ in range(2)]
    bad = ClassifyWork("a", [666], label_ids=[[1]], distinct_first_tokens=True)
    gone = ClassifyWork("a", [7, 7], label_ids=[[1]], distinct_first_tokens=True)
    gone.abandon()
    long = ClassifyWork("a", list(range(10)), label_ids=[[1]], distinct_first_tokens=True)
    engine._run([*good, bad, gone, long])
    assert [w.future.result() for w in good] == [[1.0], [1.0]]
    with pytest.raises(ValueError, match="poisoned"):
        bad.future.result()
    assert gone.future.cancelled()
    assert not any([7, 7] in batch for batch in ran)  # dropped before it ran
    assert long.future.result() == [1.0]
    assert [list(range(10))] in ran  # the long row ran alone (token budget 8)
    assert any(len(batch) > 1 for batch in ran)  # the short rows shared a batch


def test_prompt_length_reference_and_input_drift() -> None:
    from sectune.serving.drift import input_reference, length_bucket, length_distribution

    assert [length_bucket(n) for n in (0, 15, 16, 100, 5000)] == [
        "<16",
        "<16",
        "<32",
        "<128",
        ">=4096",
    ]
    reference = length_distribution([20, 20, 40, 100])
    assert reference == {"<128": 0.25, "<32": 0.5, "<64": 0.25}
    with_reference = adapter_manifest(reference={"promptTokens": reference})
    assert input_reference(with_reference) == reference
    assert input_reference(adapter_manifest()) is None  # trained before the reference existed
    assert input_reference(adapter_manifest(reference={"promptTokens": {"<16": "x"}})) is None
    monitor = DriftMonitor(reference, window_seconds=60, min_requests=4)
    for _ in range(4):
        monitor.record(length_bucket(3000), now=1.0)  # pasted documents instead of alerts
    assert monitor.score(now=2.0) == pytest.approx(1.0)


def test_a_version_whose_gates_failed_is_refused_naming_the_gate() -> None:
    from sectune.serving.verify import LoadError, require_passed_gates

    require_passed_gates(adapter_manifest(gates_passed=True), "s3://b/v")
    require_passed_gates(adapter_manifest(), "s3://b/v")  # no verdict recorded: nothing to refuse
    manifest = adapter_manifest(
        gates_passed=False,
        gates=[{"name": "macroF1>=0.9", "passed": False}, {"name": "x", "passed": True}],
    )
    with pytest.raises(LoadError, match=r"failed its evaluation gates \(macroF1>=0.9\)") as error:
        require_passed_gates(manifest, "s3://b/v")
    assert error.value.reason == "gates-failed"
    config = parse_serving_config({"adapters": [{"name": "a", "versions": [_version()]}]}, "x")
    assert config.require_passed_gates is True


def test_lineage_manifests_cross_the_boundary_old_new_and_malformed(tmp_path: Path) -> None:
    """manifest.json is typed (sectune.contract.AdapterManifest): what an older trainer wrote
    still reads, a newer writer's unknown fields are ignored, and a manifest missing what every
    reader needs is refused by name before anything is downloaded."""
    import hashlib
    import json

    from sectune.contract import AdapterManifest

    weights = b"weights"
    files = {"adapter/a.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "size": 7}}
    older = {  # as written before the typed contract: same keys, no defaults filled in
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "AdapterManifest",
        "job": "triage",
        "run": "r0",
        "baseModel": {"uri": "s3://m/base", "sha256": "a" * 64, "quantization": "none"},
        "method": "lora",
        "config": {"task": {"type": "classification"}},
        "metrics": {"accuracy": 0.9, "perClass": {"x": 1}, "passed": True},
        "gatesPassed": True,
        "files": files,
    }
    newer = {**older, "signature": {"keyId": "k1"}, "apiVersion": "sectune.io/v1beta1"}
    for name, document in (("older", older), ("newer", newer)):
        version = tmp_path / name
        (version / "adapter").mkdir(parents=True)
        (version / "adapter" / "a.safetensors").write_bytes(weights)
        (version / "manifest.json").write_text(json.dumps(document))
        manifest = artifacts.verify(f"file://{version}")
        assert isinstance(manifest, AdapterManifest)
        assert (manifest.job, manifest.base_model.sha256, manifest.gates_passed) == (
            "triage",
            "a" * 64,
            True,
        )
        assert manifest.metrics == {"accuracy": 0.9}  # numbers only, as the writer meant
        assert manifest.stored_bytes() == 7

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(
        json.dumps({k: v for k, v in older.items() if k != "baseModel"})
    )
    with pytest.raises(
        artifacts.IntegrityError, match=r"manifest\.json: baseModel: Field required"
    ):
        artifacts.verify(f"file://{broken}")


def test_vllm_max_lora_rank_is_the_smallest_it_offers_that_holds_every_adapter() -> None:
    from sectune.serving.fetch import vllm_rank
    from sectune.serving.verify import LoadError

    assert vllm_rank([4, 8]) == 8
    assert vllm_rank([16, 17]) == 32
    assert vllm_rank([300]) == 320
    with pytest.raises(LoadError, match="up to 512"):
        vllm_rank([1024])


def test_a_streamed_answer_holds_back_what_may_start_a_stop_string():
    from sectune.serving.engine import cut_at_stop, safe_to_send

    assert cut_at_stop("alert: high END rest", ["END", "rest"]) == ("alert: high ", True)
    assert cut_at_stop("no stop here", ["END"]) == ("no stop here", False)
    assert safe_to_send("severity hi", ["high\n"]) == "severity "  # "hi" may become "high\n"
    assert safe_to_send("severity high\nmore", ["high\n"]) == "severity "
    assert safe_to_send("severity low", ["high\n"]) == "severity low"
    assert safe_to_send("anything", []) == "anything"


def _observed(listing: dict[str, str | None]) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    from sectune.serving.fetch import Verified
    from sectune.serving.observe import Listing, served

    config = parse_serving_config(
        {
            "adapters": [
                {
                    "name": "triage",
                    "versions": [
                        {"version": "v1", "uri": "s3://b/t/v1", "sha256": "a" * 64, "traffic": 100},
                        {"version": "v2", "uri": "s3://b/t/v2", "sha256": "b" * 64, "traffic": 0},
                    ],
                }
            ]
        },
        "serving.yaml",
    )
    verified = [
        Verified("triage", "v1", "a" * 64, "/adapters/triage/v1/adapter"),
        Verified("triage", "v2", "b" * 64, "/adapters/triage/v2/adapter"),
    ]
    body = {"object": "list", "data": [{"id": k, "root": v} for k, v in listing.items()]}
    result = served(config, verified, Listing.parse(body))
    return result.info, result.missing


def test_a_vllm_replica_serves_what_it_lists_from_the_verified_directory() -> None:
    """The observer sidecar's join: vLLM's /v1/models against the init container's digests."""
    v1, v2 = "/adapters/triage/v1/adapter", "/adapters/triage/v2/adapter"
    everything = {"base": "/adapters/base", "triage@v1": v1, "triage@v2": v2}
    # Each version under its served name, with the share the router gives it.
    assert _observed(everything) == (
        [("triage", "v1", "a" * 64, 100), ("triage", "v2", "b" * 64, 0)],
        [],
    )
    # A module loaded from another directory than the one verified for it is not served.
    assert _observed(everything | {"triage@v2": "/elsewhere"})[1] == ["triage@v2"]
    # Not listed (vLLM failed to load it): missing, so the pod is not Ready.
    assert _observed({"triage@v1": v1}) == ([("triage", "v1", "a" * 64, 100)], ["triage@v2"])
    # An unpinned name vLLM lists (not one the router sends to) stands for no version.
    assert _observed({"triage": v2})[1] == ["triage@v1", "triage@v2"]


def test_the_vllm_observer_refuses_an_answer_that_is_not_a_model_list() -> None:
    from sectune.serving.observe import Listing

    with pytest.raises(ValueError, match="not an OpenAI model list"):
        Listing.parse({"detail": "Not Found"})


def test_classify_after_a_cached_prompt_head_answers_as_the_whole_prompt(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Prompts sharing a system prompt and template head: with the prefix cache the engine
    computes the head once per adapter and gives the numbers it gives without; a head longer
    than the next prompts share shrinks; loading other weights under the key drops the head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune.evaluation.prefix import common_length
    from sectune.serving.engine import ClassifyWork, Engine
    from sectune.serving.metrics import ServingMetrics

    _random_adapters(tiny_model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    system = "You triage security alerts. Answer with one label: benign or malicious."

    def prompt(text: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = [
        "Failed password for root from 10.0.0.1 port 22",
        "Failed password for admin from 10.0.0.9 port 2222",
        "Accepted publickey for deploy",
        "mimikatz sekurlsa::logonpasswords",
        "scheduled backup completed",
    ]
    labels = [[5], [9], [17]]
    engines = {}
    for cached in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        engine = Engine(model, tokenizer, ServingMetrics(), autocast=False, max_batch=8,
                        max_wait_ms=50, prefix_cache=cached)  # fmt: skip
        engine.start()
        engine.load_adapter(str(tmp_path / "a"), "triage")
        engines[cached] = engine
    try:

        def answers(engine: Engine, batch: list[str]) -> list[list[float]]:
            works = [ClassifyWork("triage", prompt(t), labels, distinct_first_tokens=True)
                     for t in batch]  # fmt: skip
            futures = [engine.submit(w) for w in works]
            return [f.result() for f in futures]

        cache = engines[True].prefixes
        assert cache is not None
        # The first two share "Failed password for": the head learned from them is too long
        # for the next ones, and shrinks to what every prompt shares.
        for batch in (texts[:2], texts[2:], texts):
            for whole, after in zip(answers(engines[False], batch), answers(engines[True], batch),
                                    strict=True):  # fmt: skip
                assert after == pytest.approx(whole, abs=1e-5)
        every = [prompt(t) for t in texts]
        head = cache._heads["triage"].tokens
        assert head == tuple(every[0][: common_length(every)])
        system_turn = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}], tokenize=False
        )
        assert len(tokenizer(system_turn, add_special_tokens=False)["input_ids"]) < len(head)
        assert cache.encoded == 2  # learned once, shrunk once; reused since
        # Other weights under the same key: the head computed with the old ones is dropped.
        for engine in engines.values():
            engine.load_adapter(str(tmp_path / "b"), "triage")
        assert "triage" not in cache._heads
        for whole, after in zip(answers(engines[False], texts), answers(engines[True], texts),
                                strict=True):  # fmt: skip
            assert after == pytest.approx(whole, abs=1e-5)
    finally:
        for engine in engines.values():
            engine.stop()


def test_the_vllm_router_routes_a_name_by_weight_and_a_pinned_name_as_given() -> None:
    """The router's table: `name` drawn by the versions' shares (the sectune server's rule),
    `name@version` pinned, `base` to the base model, anything else unknown."""
    import random

    from sectune.serving.vllm_router import Routed, RoutingTable

    config = parse_serving_config(
        {
            "adapters": [
                {
                    "name": "triage",
                    "versions": [
                        {"version": "v1", "uri": "s3://b/t/v1", "sha256": "a" * 64, "traffic": 90},
                        {"version": "v2", "uri": "s3://b/t/v2", "sha256": "b" * 64, "traffic": 10},
                        {"version": "v0", "uri": "s3://b/t/v0", "sha256": "c" * 64, "traffic": 0},
                    ],
                }
            ]
        },
        "serving.yaml",
    )
    table = RoutingTable(config, random.Random(7))
    drawn = [table.resolve("triage") for _ in range(2000)]
    shares = {v: sum(r is not None and r.version == v for r in drawn) / 2000 for v in ("v1", "v2")}
    assert 0.87 < shares["v1"] < 0.93 and 0.07 < shares["v2"] < 0.13
    assert all(r is not None and r.routing == "traffic" for r in drawn)
    assert not any(r is not None and r.version == "v0" for r in drawn)  # a standby takes none
    assert table.resolve("triage@v0") == Routed("triage", "v0", "pinned")
    assert Routed("triage", "v0", "pinned").served_name == "triage@v0"
    assert table.resolve("base") is None
    for unknown in ("triage@v9", "other", "triage@"):
        with pytest.raises(KeyError):
            table.resolve(unknown)

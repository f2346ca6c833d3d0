"""What the API server checks of a manifest beyond its JSON Schema: the CEL rules
(`x-kubernetes-validations`) that mirror the job contract's cross-field validators (each rule
shares its validator's message, so `sectune run` and `kubectl apply` refuse a manifest in the
same words), and the defaults default factories produce. Kubernetes knowledge, kept on the
operator's side: `crd.py` generates the CRDs with `KubernetesJsonSchema`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from sectune.config import (
    CLASS_WEIGHTS_MESSAGE,
    DECISION_GATE_MESSAGE,
    DEEPSPEED_QUANTIZED_MESSAGE,
    FORMAT_GATE_MESSAGE,
    HF_DATASET_MESSAGE,
    PREVIOUS_GATE_MESSAGE,
    QUALITY_AUDIT_MESSAGE,
    QUALITY_CLASSIFICATION_MESSAGE,
    QUANTIZED_FULL_MESSAGE,
    RECALL_TARGETS_MESSAGE,
    TEMPLATE_MESSAGE,
    VERDICT_GATE_BASELINE_MESSAGE,
    VERDICT_GATE_MESSAGE,
    ZERO3_BASELINE_MESSAGE,
    ZERO3_PREVIOUS_MESSAGE,
    DatasetSpec,
    EvaluationSpec,
    Gate,
    JobSpec,
    QualitySpec,
    ResourcesSpec,
    Spec,
    TaskSpec,
)
from sectune_operator.api import (
    PREVIOUS_TEMPLATE_MESSAGE,
    AdapterDeploymentSpec,
    AdapterSource,
    AdapterSpec,
    FineTuneJobTemplate,
)

_DEEPSPEED = (
    "(has(self.resources) && has(self.resources.distributed) && "
    "has(self.resources.distributed.strategy) && "
    "self.resources.distributed.strategy == 'deepspeed')"
)
_ZERO3 = (
    f"({_DEEPSPEED} && has(self.resources.distributed.zeroStage) && "
    "self.resources.distributed.zeroStage == 3)"
)

CEL_RULES: dict[type[BaseModel], list[dict[str, str]]] = {
    TaskSpec: [
        {
            "rule": "!has(self.recallTargets) || size(self.recallTargets) == 0 || "
            "self.type == 'classification'",
            "message": RECALL_TARGETS_MESSAGE,
            "fieldPath": ".recallTargets",
        },
        {
            "rule": "!has(self.recallTargets) || self.recallTargets.all(k, k in self.labels)",
            "message": "task.recallTargets: every key must be one of task.labels",
            "fieldPath": ".recallTargets",
        },
        {
            "rule": "self.type != 'classification' || "
            "self.labels.exists(a, self.labels.exists(b, a != b))",
            "message": "task.labels: classification needs at least 2 distinct labels; list them",
            "fieldPath": ".labels",
        },
        {
            "rule": "self.type != 'extraction' || has(self.outputSchema)",
            "message": "task.outputSchema: extraction needs a JSON Schema for its output; add one",
            "fieldPath": ".outputSchema",
        },
        {
            "rule": "self.template.contains('{text}') || self.template.contains('{instruction}')"
            " || self.template.contains('{input}')",
            "message": TEMPLATE_MESSAGE,
            "fieldPath": ".template",
        },
        {
            "rule": "self.head != 'classifier' || self.type == 'classification'",
            "message": "task.head: classifier is only for type classification; use lm",
            "fieldPath": ".head",
        },
        {
            "rule": "self.classWeights == 'none' || self.type == 'classification'",
            "message": CLASS_WEIGHTS_MESSAGE,
            "fieldPath": ".classWeights",
        },
    ],
    ResourcesSpec: [
        {
            "rule": "self.nodes <= 1 || self.gpus >= 1",
            "message": "resources.gpus: nodes > 1 needs at least 1 GPU per node",
            "fieldPath": ".gpus",
        },
        {
            "rule": "self.gpus * self.nodes <= 1 || has(self.distributed)",
            "message": "resources.distributed: gpus x nodes > 1 needs a distributed setting "
            "(strategy: ddp or deepspeed)",
            "fieldPath": ".distributed",
        },
    ],
    Gate: [
        {
            "rule": "has(self.min) || has(self.max)",
            "message": "evaluation.gates: set min, max or both",
        },
        {
            "rule": "!has(self.basis) || self.basis != 'decision' || !has(self.overBaseline)",
            "message": DECISION_GATE_MESSAGE,
            "fieldPath": ".overBaseline",
        },
        {
            "rule": "!has(self.basis) || self.basis != 'verdicts' || !has(self.overBaseline) || "
            "self.overBaseline == 'previous'",
            "message": VERDICT_GATE_BASELINE_MESSAGE.format(metric="…"),
            "fieldPath": ".overBaseline",
        },
        {
            "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
            "message": "evaluation.gates: min is above max, so the gate can never pass; "
            "swap or fix them",
            "fieldPath": ".min",
        },
        {
            # `class` is a plain field name for CEL in Kubernetes (not one of its escaped keywords).
            "rule": "!(self.metric in ['precision', 'recall', 'f1']) || has(self.class)",
            "message": "evaluation.gates: per-class metric (precision, recall, f1) needs class",
        },
    ],
    DatasetSpec: [
        {
            "rule": f"!self.{name}.startsWith('hf://')"
            if name == "train"
            else f"!has(self.{name}) || !self.{name}.startsWith('hf://')",
            "message": HF_DATASET_MESSAGE.format(field=name),
            "fieldPath": f".{name}",
        }
        for name in ("train", "validation", "test")
    ]
    + [
        {
            "rule": "!has(self.feedback) || self.format in ['classification', 'chat']",
            "message": "dataset.feedback: not implemented yet for this format (verdicts are "
            "stored as classification rows or chat messages); use format classification or chat",
            "fieldPath": ".feedback",
        },
        {
            "rule": "!has(self.feedback) || !self.feedback.uri.startsWith('hf://')",
            "message": HF_DATASET_MESSAGE.format(field="feedback.uri"),
            "fieldPath": ".feedback.uri",
        },
    ],
    QualitySpec: [
        {
            "rule": "self.audit || !((has(self.enforceMinimums) && self.enforceMinimums) || "
            "has(self.maxLabelErrors) || has(self.maxLeakage) || has(self.maxConflicting))",
            "message": QUALITY_AUDIT_MESSAGE,
            "fieldPath": ".audit",
        },
    ],
    JobSpec: [
        {
            "rule": "!has(self.evaluation) || !has(self.evaluation.gates) || "
            "!self.evaluation.gates.exists(g, has(g.basis) && g.basis == 'decision') || "
            "(has(self.task.recallTargets) && size(self.task.recallTargets) > 0)",
            "message": DECISION_GATE_MESSAGE,
        },
        {
            "rule": "!has(self.evaluation) || !has(self.evaluation.gates) || "
            "!self.evaluation.gates.exists(g, has(g.basis) && g.basis == 'verdicts') || "
            "(self.task.type == 'classification' && has(self.dataset.feedback) && "
            "has(self.dataset.feedback.holdOut) && self.dataset.feedback.holdOut > 0.0)",
            "message": VERDICT_GATE_MESSAGE,
        },
        {
            "rule": "self.task.type == 'classification' || !has(self.dataset.quality) || "
            "!(has(self.dataset.quality.maxLabelErrors) || "
            "has(self.dataset.quality.maxConflicting))",
            "message": QUALITY_CLASSIFICATION_MESSAGE,
            "fieldPath": ".dataset.quality",
        },
        {
            "rule": "!(self.method.type in ['full', 'continued-pretraining']) || "
            "!has(self.baseModel.quantization) || self.baseModel.quantization == 'none'",
            "message": QUANTIZED_FULL_MESSAGE,
            "fieldPath": ".baseModel.quantization",
        },
        {
            "rule": "self.task.type != 'classification' || !has(self.evaluation) || "
            "!has(self.evaluation.gates) || "
            "self.evaluation.gates.all(g, g.metric != 'formatCompliance')",
            "message": FORMAT_GATE_MESSAGE,
        },
        {
            "rule": "self.method.type != 'qlora' || self.baseModel.quantization == 'nf4'",
            "message": "baseModel.quantization: method qlora trains on a 4-bit base; set "
            "quantization: nf4",
            "fieldPath": ".baseModel.quantization",
        },
        {
            "rule": "self.task.type != 'classification' || "
            "self.dataset.format in ['classification', 'instruction']",
            "message": "dataset.format: classification tasks read classification (text, "
            "label) or instruction rows",
            "fieldPath": ".dataset.format",
        },
        {
            "rule": "!has(self.evaluation) || !has(self.evaluation.previousVersion) || "
            "self.method.type in ['lora', 'qlora']",
            "message": "evaluation.previousVersion: only adapters (method lora or qlora) are "
            "compared with a previous version",
        },
        {
            "rule": f"!{_DEEPSPEED} || !has(self.baseModel.quantization) || "
            "self.baseModel.quantization == 'none'",
            "message": DEEPSPEED_QUANTIZED_MESSAGE,
        },
        {
            "rule": f"!{_ZERO3} || !has(self.evaluation) || !has(self.evaluation.previousVersion)",
            "message": ZERO3_PREVIOUS_MESSAGE,
        },
        {
            "rule": f"!{_ZERO3} || self.method.type in ['lora', 'qlora'] || "
            "(has(self.evaluation) && has(self.evaluation.baseline) && "
            "!self.evaluation.baseline)",
            "message": ZERO3_BASELINE_MESSAGE,
        },
    ],
    EvaluationSpec: [
        {
            "rule": "!has(self.gates) || has(self.previousVersion) || "
            "!self.gates.exists(g, has(g.overBaseline) && g.overBaseline == 'previous')",
            "message": PREVIOUS_GATE_MESSAGE,
        },
    ],
}

CEL_RULES.update(
    {
        AdapterSource: [
            {
                "rule": "has(self.fineTuneJob) != has(self.uri)",
                "message": "source: set exactly one of fineTuneJob or uri",
            },
            {
                "rule": "!has(self.uri) || has(self.sha256)",
                "message": "source.sha256: an adapter given by uri needs its sha256",
                "fieldPath": ".sha256",
            },
        ],
        FineTuneJobTemplate: [
            {
                "rule": "!has(self.evaluation) || !has(self.evaluation.gates) || "
                "!self.evaluation.gates.exists(g, has(g.overBaseline) && "
                "g.overBaseline == 'previous') || self.method.type in ['lora', 'qlora']",
                "message": PREVIOUS_TEMPLATE_MESSAGE,
            },
        ],
        AdapterDeploymentSpec: [
            {
                "rule": "self.runtime != 'vllm' || "
                "self.adapters.all(a, a.versions.all(v, !has(v.shadow) || v.shadow == 0.0))",
                "message": "adapters[].versions[].shadow: not implemented yet for runtime vllm; "
                "use runtime sectune, or set shadow to 0",
            },
            {
                "rule": "!has(self.feedback) || !has(self.feedback.store) || "
                "self.runtime != 'vllm'",
                "message": "feedback.store: not implemented yet for runtime vllm (it has no "
                "/v1/feedback); use runtime sectune, or unset feedback.store",
            },
        ],
        AdapterSpec: [
            {
                "rule": "self.versions.all(v, !has(v.shadow) || v.shadow == 0.0 || v.traffic == 0)",
                "message": "adapters[].versions[].shadow: a shadow answers nobody; set its "
                "traffic to 0",
                "fieldPath": ".versions",
            },
            {
                "rule": "self.versions.map(v, v.traffic).sum() == 100",
                "message": "adapters[].versions: traffic of one adapter's versions must add "
                "up to 100",
                "fieldPath": ".versions",
            },
        ],
    }
)


class KubernetesJsonSchema(GenerateJsonSchema):
    """JSON Schema with each contract model's CEL rules and factory defaults added."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        cls = schema["cls"]
        if issubclass(cls, Spec):
            _add_extras(json_schema, cls)
        return json_schema


def _add_extras(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """Add what the CRD needs beyond plain JSON Schema: CEL rules, and the defaults that
    factories produce (so the API server fills nested defaults when a section is omitted)."""
    # A subclass (the operator's FineTuneJobSpec) carries its parents' rules too, except those
    # it waives (CEL_WAIVED: the messages of rules that do not hold for it).
    waived = getattr(cls, "CEL_WAIVED", ())
    rules = [
        rule
        for model, rs in CEL_RULES.items()
        if issubclass(cls, model)
        for rule in rs
        if rule["message"] not in waived
    ]
    if rules:
        schema["x-kubernetes-validations"] = rules
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        factory = field.default_factory
        is_model = isinstance(factory, type) and issubclass(factory, BaseModel)
        prop = schema.get("properties", {}).get(field.alias or name)
        if prop is not None:
            # The whole default object: the API server checks defaults against the CEL rules
            # before filling nested defaults in.
            value = factory()  # type: ignore[call-arg]
            prop["default"] = (
                value.model_dump(mode="json", by_alias=True, exclude_none=True)
                if is_model
                else value
            )

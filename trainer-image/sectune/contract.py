"""What crosses the boundary between the trainer and the operator: the exit codes its Pod failure
policy reads and the result the trainer writes as its termination message.

Typed and versioned (`version`), written by the trainer (`TrainerResult.to_message`) and parsed by
the operator (`TrainerResult.parse`). Readers are tolerant: an unknown field is ignored, so a
newer trainer never breaks an older operator; a result from a trainer before the version field
parses as version 1.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

SCHEMA = 1
"""The version of TrainerResult this code writes."""
MESSAGE_LIMIT = 4096
"""Kubernetes keeps 4 KiB of a container's termination message."""


class ExitCode(IntEnum):
    """Exit codes of `sectune train`, read by the training Job's Pod failure policy."""

    OK = 0
    INFRASTRUCTURE = 1
    """Anything unexpected (storage down, node lost): retried, resuming from the checkpoint."""
    BAD_INPUT = 2
    """Bad config or data: retrying cannot help; the Job fails at once with the message."""
    GATES_FAILED = 3
    """The adapter was trained and stored but did not meet its gates: fails at once."""
    PREEMPTED = 143
    """Stopped by SIGTERM after writing a checkpoint: retried."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class ResultAdapter(_Tolerant):
    uri: str | None = None
    sha256: str | None = None


class ResultGate(_Tolerant):
    name: str
    passed: bool
    value: float | None = None


class ResultDataset(_Tolerant):
    digest: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    redactions: dict[str, int] = Field(default_factory=dict)


class TrainerResult(_Tolerant):
    """The trainer's result, as its termination message."""

    version: int = SCHEMA
    """The schema of this result (SCHEMA when written by this code; 1 when absent)."""
    phase: str = ""
    """Succeeded, Failed, or Training (preempted: the Job retries). The operator takes the
    phase from the Job; a result without one still gives its reason and message."""
    reason: str = ""
    """CamelCase: GatesPassed, GatesFailed, InvalidInput, InvalidConfig, StorageError, …"""
    message: str = ""
    adapter: ResultAdapter | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: list[ResultGate] = Field(default_factory=list)
    dataset: ResultDataset | None = None
    exit_code: int | None = None
    """Filled in by the reader from the container status, never written by the trainer."""

    def to_message(self, limit: int = MESSAGE_LIMIT) -> str:
        """Compact JSON within `limit` bytes: gates are dropped from the end, then the message
        is cut, until it fits."""
        result = self.model_copy(deep=True)

        def dump() -> str:
            return result.model_dump_json(by_alias=True, exclude_none=True, exclude={"exit_code"})

        text = dump()
        while len(text.encode()) > limit and result.gates:
            result.gates.pop()
            text = dump()
        while len(text.encode()) > limit and result.message:
            result.message = result.message[: len(result.message) // 2]
            text = dump()
        return text

    @classmethod
    def parse(cls, text: str, exit_code: int | None = None) -> TrainerResult | None:
        """The result in a termination message, or None when it is not one (a log tail)."""
        try:
            result = cls.model_validate_json(text)
        except ValidationError:
            return None
        result.exit_code = exit_code
        return result

    @classmethod
    def failure(cls, reason: str, message: str, phase: str = "Failed") -> TrainerResult:
        return cls(phase=phase, reason=reason, message=message[:3000])

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

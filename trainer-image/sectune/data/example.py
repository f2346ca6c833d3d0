"""One example as every stage after data preparation sees it (training, evaluation, the audit,
the review round trip)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    """One training or evaluation example after validation and sanitization."""

    id: str
    fields: dict[str, str]
    """text / instruction / input (the prompt side), as sanitized."""
    target: str
    """label or expected output, as sanitized."""
    messages: list[dict[str, str]] | None = None
    canary: bool = False
    where: str = ""
    """file:line it was read from (reports and review files name rows by it and the id)."""

    @property
    def text(self) -> str:
        return self.fields.get("text", "")

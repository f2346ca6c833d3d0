"""YAML in and out, with ruamel.yaml (safe loader, block style, key order kept)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

__all__ = ["YAMLError", "dump_yaml", "dump_yaml_all", "load_yaml", "load_yaml_all"]


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]  # keep key order
    yaml.width = 4096
    return yaml


def load_yaml(text: str) -> Any:
    return _yaml().load(text)


def load_yaml_all(text: str) -> Iterator[Any]:
    return (doc for doc in _yaml().load_all(text) if doc is not None)


def dump_yaml(data: Any) -> str:
    buffer = io.StringIO()
    _yaml().dump(data, buffer)
    return buffer.getvalue()


def dump_yaml_all(documents: list[Any]) -> str:
    buffer = io.StringIO()
    _yaml().dump_all(documents, buffer)
    return buffer.getvalue()

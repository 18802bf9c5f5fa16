"""Typed config records built from plain dicts (YAML or HF config.json), with errors that name the field.

A family declares its config as a frozen dataclass whose field names are Hugging Face's. `build_record`
checks unknown keys, types and positivity generically; the family's own `check()` adds cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import UserError

# Field metadata key: the value must be > 0 (sizes, counts, eps).
POSITIVE = "positive"


def positive(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that must be > 0 when set."""
    return dataclasses.field(default=default, metadata={POSITIVE: True})


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    if typing.get_origin(tp) is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items())
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # YAML/JSON may write 10000 for 10000.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def build_record(cls: type, values: dict[str, Any], where: str) -> Any:
    """Make `cls(**values)` after checking keys, types and positivity; errors say `where: field 'x' ...`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(f"{where}: unknown field '{key}' (known: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing field '{missing[0]}'")
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise UserError(
                f"{where}: field '{key}' must be {_type_name(hints[key])}, got {value!r}"
            )
        if fields[key].metadata.get(POSITIVE) and value is not None and not value > 0:
            raise UserError(f"{where}: field '{key}' must be positive, got {value!r}")
    record = cls(**{k: (float(v) if hints[k] is float else v) for k, v in values.items()})
    record.check(where)
    return record


def hf_rope_theta(hf: dict[str, Any], where: str, default: float) -> float:
    """RoPE base from an HF config: transformers 5.x writes `rope_parameters.rope_theta`, older files a
    top-level `rope_theta`; absent means the family's HF default. Only the default RoPE type is built."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(spec, dict):
            raise UserError(f"{where}: field '{key}' must be a mapping, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise UserError(f"{where}: field '{key}' has rope_type {kind!r}; only 'default' is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", default))
    if not _matches(theta, float):
        raise UserError(f"{where}: field 'rope_theta' must be float, got {theta!r}")
    return float(theta)


def read_json_object(path: Path, *, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing file raises UserError(missing), bad content names the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return data

"""Model families: each declares its config schema, HF mapping and Relax builder in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from . import qwen2


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "decoder" (prefill/decode/generate) or "encoder" (encode)
    config_class: type
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this family reads
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]
    config_to_hf: Callable[[Any], dict[str, Any]]
    build: Callable[[Any, str], Any]  # (config, dtype) -> nn.Module with export_spec()
    hf_tensors: Callable[[Any], dict[str, tuple[int, ...]]]  # checkpoint tensor -> shape
    weight_map: Callable[[Any], dict[str, list[str]]]  # library parameter -> HF tensors (concat axis 0)
    tensor_parallel_plan: dict[str, str]


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        name="qwen2", kind="decoder", config_class=qwen2.Qwen2Config, hf_model_types=("qwen2",),
        config_from_hf=qwen2.config_from_hf, config_to_hf=qwen2.config_to_hf, build=qwen2.build,
        hf_tensors=qwen2.hf_tensors, weight_map=qwen2.weight_map,
        tensor_parallel_plan=qwen2.TENSOR_PARALLEL_PLAN),
}


def family_for_hf_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)

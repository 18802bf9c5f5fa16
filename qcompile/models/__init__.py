"""Model families: each declares its config schema, HF mapping and Relax builder in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from . import decoder, qwen2, qwen3_moe, vit
from .kinds import DECODER, ENCODER, Kind


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: Kind  # DECODER (prefill/decode/generate) or ENCODER (encode)
    config_class: type
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this family reads
    config_from_hf: Callable[..., dict[str, Any]]  # (config.json dict, where, checkpoint dir) -> fields
    config_to_hf: Callable[[Any], dict[str, Any]]
    build: Callable[[Any, str], Any]  # (config, dtype) -> nn.Module with export_spec()
    hf_tensors: Callable[[Any], dict[str, tuple[int, ...]]]  # checkpoint tensor -> shape
    # Library parameter -> HF tensors: a list concatenated along axis 0, or a list of such lists
    # stacked along a new axis 0.
    weight_map: Callable[[Any], dict[str, list]]
    # HF tensor-name pattern -> "colwise" (split output features) | "rowwise" (split input features, one
    # all-reduce after) | "replicated", as transformers' own tp plans spell it. Shown by `zoo show`; the
    # tensor-parallel build will apply it.
    tensor_parallel_plan: dict[str, str]
    # Parameters the model computes with, and those one token touches (MoE: fewer).
    parameter_count: Callable[[Any], int]
    active_parameter_count: Callable[[Any], int]
    # Fused tensors a checkpoint may hold instead of several HF tensors: name -> {tensor: index}.
    checkpoint_views: Callable[[Any], dict[str, dict[str, tuple]]] = lambda _cfg: {}
    # Other JSON files of an HF checkpoint directory that init-weights writes: file name -> content.
    checkpoint_files: Callable[[Any], dict[str, dict]] = lambda _cfg: {}
    # Name prefixes some checkpoints carry that the family's tensor names do not (stripped on load).
    checkpoint_prefixes: tuple[str, ...] = ()
    # Field defaults the zoo's family block starts from (a family whose defaults are HF's own states
    # them in its module, once).
    zoo_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


def _total(hf_tensors):
    return lambda cfg: decoder.parameter_count(hf_tensors(cfg))


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        name="qwen2", kind=DECODER, config_class=qwen2.Qwen2Config, hf_model_types=("qwen2",),
        config_from_hf=qwen2.config_from_hf, config_to_hf=qwen2.config_to_hf, build=qwen2.build,
        hf_tensors=qwen2.hf_tensors, weight_map=qwen2.weight_map,
        tensor_parallel_plan=qwen2.TENSOR_PARALLEL_PLAN, parameter_count=_total(qwen2.hf_tensors),
        active_parameter_count=_total(qwen2.hf_tensors), checkpoint_files=decoder.tokenizer_files),
    "qwen3_moe": Family(
        name="qwen3_moe", kind=DECODER, config_class=qwen3_moe.Qwen3MoeConfig,
        hf_model_types=("qwen3_moe",), config_from_hf=qwen3_moe.config_from_hf,
        config_to_hf=qwen3_moe.config_to_hf, build=qwen3_moe.build, hf_tensors=qwen3_moe.hf_tensors,
        weight_map=qwen3_moe.weight_map, tensor_parallel_plan=qwen3_moe.TENSOR_PARALLEL_PLAN,
        parameter_count=_total(qwen3_moe.hf_tensors),
        active_parameter_count=qwen3_moe.active_parameter_count,
        checkpoint_views=qwen3_moe.checkpoint_views, checkpoint_files=decoder.tokenizer_files),
    "vit": Family(
        name="vit", kind=ENCODER, config_class=vit.ViTConfig, hf_model_types=tuple(vit.HF_MODEL_TYPES),
        config_from_hf=vit.config_from_hf, config_to_hf=vit.config_to_hf, build=vit.build,
        hf_tensors=vit.hf_tensors, weight_map=vit.weight_map, tensor_parallel_plan=vit.TENSOR_PARALLEL_PLAN,
        parameter_count=vit.parameters_used, active_parameter_count=vit.parameters_used,
        checkpoint_prefixes=vit.CHECKPOINT_PREFIXES,
        checkpoint_files=vit.checkpoint_files,
        zoo_defaults=vit.HF_MODEL_TYPES["vit"]),
}


def family_for_hf_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)

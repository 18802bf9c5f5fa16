"""The memory plan: bytes a built model needs on each device, before anything is built (no TVM).

Per device:
  weights     every tensor the model computes with (a tied embedding once; MoE experts all resident):
              under a scheme, the tensors `quant.policy.is_quantized` selects as stored (q8/q4 packed
              weights + float16 scales, bf16/f16 weights), every other tensor in the compute dtype.
  kv_cache    keys + values of every layer at `max_seq_len` in the compute dtype, except that a
              sliding layer holds only its window: 2 * kv_heads * head_dim * min(window, max_seq_len)
              * dtype bytes per layer, reported per layer kind (full, sliding W).
  workspace   an estimate: the largest activations of one prefill chunk of C tokens over T =
              max_seq_len positions, all live at once (an upper bound for one layer's step):
                attention scores [heads, C, T] float32
              + MLP: gate/up output [C, 2 I] + SwiGLU product [C, I] in dtype (MoE: I = top-k * the
                expert width, or the dense width if larger)
              + q/k/v [C, (heads + 2 kv_heads) * head_dim] + 3 x [C, hidden] (hidden, residual,
                normed) in dtype
              + logits [C, vocab] float32 (the device that holds the LM head)
              An encoder: C = T = its token count, output features [tokens, hidden] float32 for logits.
Tensor parallel N: the family's `tensor_parallel_plan` column- and row-parallel weights (and column-
parallel biases) are divided by N, so are heads, KV heads and the MLP width; the embedding, LM head,
norms and the MoE router are replicated. Pipeline stages S: the layers cut as the build cuts them
(`parallel.stages.partition`: contiguous stages balanced by parameter bytes), the embedding with stage 0,
the final norm and LM head with the last (a tied embedding is on both). One entry per device: S x N.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np

from ..errors import UserError
from ..quant import schemes
from ..quant.checkpoint import stored_layout
from ..quant.policy import is_quantized
from ..spec.model import ModelSpec
from ..spec.target import TargetSpec
from ..units import parse_memory_size  # noqa: F401 (--device-memory; api and tests import it from here)
from ..parallel.stages import partition

F32 = 4
DEFAULT_PREFILL_CHUNK = 256
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _used_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor -> shape, for the tensors the library computes with (not unread pooling heads)."""
    def names(recipe) -> list[str]:
        return [n for part in recipe for n in (names(part) if isinstance(part, list) else [part])]

    used = {n for recipe in spec.family.weight_map(spec.config).values() for n in names(recipe)}
    return {n: tuple(s) for n, s in spec.family.hf_tensors(spec.config).items() if n in used}


def _tensor_bytes(name: str, shape: tuple[int, ...], dtype: str,
                  quantization: tuple[schemes.Scheme, int] | None) -> int:
    if quantization is None or not is_quantized(name, shape):
        return math.prod(shape) * np.dtype(dtype).itemsize
    scheme, group_size = quantization
    schemes.check_group_size(scheme, group_size, name, shape[-1])
    return sum(math.prod(s) * np.dtype(d).itemsize
               for _, s, d in stored_layout(name, shape, quantization).values())


@functools.lru_cache(maxsize=64)
def _pattern(glob: str) -> re.Pattern:
    return re.compile("^" + re.escape(glob).replace(r"\*", r"[^.]+") + "$")


def _split(spec: ModelSpec, name: str, shape: tuple[int, ...], tp: int,
           quantization: tuple[schemes.Scheme, int] | None) -> int:
    """How many ways tensor parallelism divides this tensor (1: replicated)."""
    if tp == 1:
        return 1
    module, leaf = name.rsplit(".", 1)
    style = next((s for glob, s in spec.family.tensor_parallel_plan.items() if _pattern(glob).match(module)),
                 "replicated")
    if style == "colwise" or (style == "rowwise" and leaf == "weight"):
        axis = 0 if style == "colwise" else -1
        if shape[axis] % tp or (style == "rowwise" and quantization and quantization[0].grouped
                                and is_quantized(name, shape) and (shape[-1] // tp) % quantization[1]):
            raise UserError(f"{name}: {style} dimension {shape[axis]} cannot be split into {tp} parts"
                            + (f" of whole groups of {quantization[1]}" if style == "rowwise" else ""))
        return tp
    return 1  # replicated, or a row-parallel bias (added once, after the all-reduce)


def _workspace(spec: ModelSpec, dtype: str, chunk: int, positions: int, tp: int) -> dict[str, int]:
    c, d = spec.config, np.dtype(dtype).itemsize
    if not spec.kind.has_sequence:  # encoder: one image's tokens attend to each other
        chunk = positions = c.num_positions
        heads, kv_heads, head_dim = c.num_attention_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads
        width, out = c.intermediate_size, chunk * c.hidden_size * F32
    else:
        heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
        width = max(getattr(c, "num_experts_per_tok", 0) * getattr(c, "moe_intermediate_size", 0),
                    c.intermediate_size)
        out = chunk * c.vocab_size * F32
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                    ("the MLP width", width)):
        if n % tp:
            raise UserError(f"tensor parallel {tp} does not divide {what} ({n}) of {spec.name}")
    return {"attention_scores": heads // tp * chunk * positions * F32,
            "mlp": 3 * chunk * width // tp * d,
            "hidden": (chunk * (heads + 2 * kv_heads) * head_dim // tp + 3 * chunk * c.hidden_size) * d,
            "logits": out}


def _kv_per_layer(spec: ModelSpec, dtype: str, max_seq_len: int, tp: int) -> list[tuple[int | None, int]]:
    """Per decoder layer: (window or None, its KV-cache bytes on one device)."""
    c = spec.config
    if c.num_key_value_heads % tp:
        raise UserError(f"tensor parallel {tp} does not divide num_key_value_heads ({c.num_key_value_heads}) "
                        f"of {spec.name}")
    per_token = 2 * c.num_key_value_heads // tp * c.resolved_head_dim * np.dtype(dtype).itemsize
    return [(w, per_token * (min(w, max_seq_len) if w else max_seq_len)) for w in c.layer_windows()]


def memory_plan(spec: ModelSpec, *, dtype: str, quantization: str | schemes.Scheme | None = None,
                group_size: int = schemes.DEFAULT_GROUP_SIZE, max_seq_len: int | None,
                tensor_parallel: int = 1, pipeline_stages: int = 1,
                prefill_chunk: int | None = None) -> dict[str, Any]:
    """The bytes each device needs (see the module docstring for what is counted and how)."""
    if tensor_parallel < 1:
        raise UserError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    if isinstance(quantization, schemes.Scheme):  # a BuildPlan may carry the Scheme itself
        quantization = quantization.name
    quant = (schemes.get(quantization), group_size) if quantization else None
    decoder = spec.kind.has_sequence
    if not decoder and (pipeline_stages != 1 or tensor_parallel != 1):
        raise UserError(f"{spec.name}: the memory plan splits decoders only (an {spec.kind.name} runs on one device)")
    positions = (max_seq_len or spec.config.max_position_embeddings) if decoder else 0
    chunk = min(prefill_chunk or DEFAULT_PREFILL_CHUNK, positions) if decoder else 0
    tp = tensor_parallel

    # Weight bytes on one device of a tensor-parallel group, by where they live.
    layers = spec.config.num_hidden_layers
    per_layer, head, embedding, total_quantized, total_other = [0] * layers, 0, 0, 0, 0
    for name, shape in _used_tensors(spec).items():
        full = _tensor_bytes(name, shape, dtype, quant)
        if quant and is_quantized(name, shape):
            total_quantized += full
        else:
            total_other += full
        share = full // _split(spec, name, shape, tp, quant)
        layer = _LAYER.match(name)
        if layer and decoder:
            per_layer[int(layer.group(1))] += share
        elif name.startswith("model.embed_tokens."):
            embedding += share
        else:
            head += share  # final norm, LM head (an encoder: everything outside decoder layers)
    if decoder and spec.config.tie_word_embeddings and pipeline_stages > 1:
        head += embedding  # the last stage needs the tied table as its LM head

    kv = _kv_per_layer(spec, dtype, positions, tp) if decoder else []
    kinds: dict[str, dict[str, int]] = {}
    for window, b in kv:
        kind = kinds.setdefault("full" if window is None else f"sliding {window}",
                                {"layers": 0, "tokens": min(window or positions, positions), "bytes": 0})
        kind["layers"] += 1
        kind["bytes"] += b * tp
    workspace = _workspace(spec, dtype, chunk, positions, tp)

    # The build's own cut (`parallel.stages.partition`: balanced by parameter bytes), so the plan
    # describes the devices the library will run on.
    stage_layers = [(s.first_layer, s.end_layer) for s in partition(spec, pipeline_stages)] \
        if decoder and pipeline_stages > 1 else [(0, layers)]
    devices = []
    for s, (start, end) in enumerate(stage_layers):
        last = s == len(stage_layers) - 1
        weights = sum(per_layer[start:end]) + (embedding if s == 0 else 0) + (head if last else 0)
        cache = sum(b for _, b in kv[start:end])
        work = sum(v for k, v in workspace.items() if k != "logits" or last)
        for rank in range(tp):
            devices.append({"device": len(devices), "stage": s, "tensor_parallel_rank": rank,
                            "layers": [start, end], "weight_bytes": weights, "kv_cache_bytes": cache,
                            "workspace_bytes": work, "total_bytes": weights + cache + work})
    return {"dtype": dtype, "quantization": quantization, "group_size": group_size if quant else None,
            "max_seq_len": positions or None, "prefill_chunk": chunk or None,
            "tensor_parallel": tp, "pipeline_stages": len(stage_layers),
            "weights": {"quantized_bytes": total_quantized, "other_bytes": total_other,
                        "total_bytes": total_quantized + total_other},
            "kv_cache": {"per_layer_kind": kinds, "total_bytes": sum(b for _, b in kv) * tp},
            "workspace": {**{f"{k}_bytes": v for k, v in workspace.items()},
                          "formula": "scores [heads, chunk, max_seq_len] f32 + MLP 3 x [chunk, width] + "
                                     "q/k/v + 3 x [chunk, hidden] in dtype + logits [chunk, vocab] f32"},
            "devices": devices, "max_device_bytes": max(d["total_bytes"] for d in devices)}


def plan_for(spec: ModelSpec, target: TargetSpec, *, dtype: str | None = None, quantization: str | None = None,
             group_size: int = schemes.DEFAULT_GROUP_SIZE, max_seq_len: int | None = None,
             tensor_parallel: int = 1, pipeline_stages: int = 1) -> dict[str, Any]:
    """The plan of the library `compile` would build for TARGET with these options (its dtype and prefill
    chunk; max_seq_len defaults to the model's context), without the target's toolchain."""
    from .plan import DTYPES  # noqa: PLC0415

    dtype = dtype or target.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    chunk = None
    if spec.kind.has_sequence:
        context = spec.config.max_position_embeddings
        max_seq_len = context if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= context:
            raise UserError(f"--max-seq-len must be in 1..{context} (the model's max_position_embeddings), "
                            f"got {max_seq_len}")
        chunk = min(target.prefill_chunk, max_seq_len)
    return memory_plan(spec, dtype=dtype, quantization=quantization, group_size=group_size,
                       max_seq_len=max_seq_len, tensor_parallel=tensor_parallel,
                       pipeline_stages=pipeline_stages, prefill_chunk=chunk)


def of_build(plan: Any) -> dict[str, Any]:
    """The plan of a BuildPlan (its quantization, if it has one)."""
    quant = plan.quantization  # quant.choice.Quantization or None
    return memory_plan(plan.spec, dtype=plan.dtype, quantization=quant.scheme if quant else None,
                       group_size=(quant.group_size if quant else None) or schemes.DEFAULT_GROUP_SIZE,
                       max_seq_len=plan.max_seq_len, prefill_chunk=plan.prefill_chunk,
                       tensor_parallel=plan.parallel.shards if plan.parallel else 1,
                       pipeline_stages=len(plan.stages) if plan.stages else 1)


def fit_line(plan: dict[str, Any], device_memory_bytes: int) -> tuple[bool, str]:
    """(fits, one line saying so with the margin, or needed vs available and by how much)."""
    ok, margin = fits(plan, device_memory_bytes)
    need, have = human(plan["max_device_bytes"]), human(device_memory_bytes)
    per = " per device" if plan["tensor_parallel"] * plan["pipeline_stages"] > 1 else ""
    if ok:
        return True, f"memory plan: fits {have}{per}: needs {need}, {human(margin)} to spare"
    return False, f"memory plan: does not fit {have}{per}: needs {need}, {human(-margin)} more than available"


def fits(plan: dict[str, Any], device_memory_bytes: int) -> tuple[bool, int]:
    """(whether every device's total fits `device_memory_bytes`, the margin: available minus the
    largest device's need; negative = short by that much)."""
    margin = device_memory_bytes - plan["max_device_bytes"]
    return margin >= 0, margin


def human(n: int) -> str:
    """Bytes in decimal units with the binary figure beside above 1 GB: '40.7 GB (37.9 GiB)', '2.1 MB'."""
    for unit, size in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if abs(n) >= size:
            binary = f" ({n / 2 ** 30:.1f} GiB)" if size >= 10 ** 9 else ""
            return f"{n / size:.1f} {unit}{binary}"
    return f"{n} B"


def describe(plan: dict[str, Any]) -> list[str]:
    """Human-readable lines of a plan (for inspect and compile)."""
    scheme = plan["quantization"] or plan["dtype"]
    lines = [f"weights    {human(plan['weights']['total_bytes'])} in all ({scheme}"
             + (f", group size {plan['group_size']}" if plan["group_size"] else "") + ")"]
    if plan["max_seq_len"]:
        kinds = ", ".join(f"{k['layers']} {name} x {k['tokens']} tokens: {human(k['bytes'])}"
                          for name, k in plan["kv_cache"]["per_layer_kind"].items())
        lines.append(f"kv cache   {human(plan['kv_cache']['total_bytes'])} in all at {plan['max_seq_len']} "
                     f"tokens ({plan['dtype']}; {kinds})")
    largest = max(plan["devices"], key=lambda d: d["total_bytes"])
    chunk = f"prefill chunk {plan['prefill_chunk']}" if plan["prefill_chunk"] else "one image"
    lines.append(f"workspace  {human(largest['workspace_bytes'])} estimated ({chunk}: {plan['workspace']['formula']})")
    split = plan["tensor_parallel"] * plan["pipeline_stages"]
    lines.append(f"per device {human(largest['total_bytes'])} = weights {human(largest['weight_bytes'])} + kv "
                 f"cache {human(largest['kv_cache_bytes'])} + workspace {human(largest['workspace_bytes'])}"
                 + (f" (the largest of {split}: tensor parallel {plan['tensor_parallel']} x "
                    f"{plan['pipeline_stages']} pipeline stages)" if split > 1 else ""))
    return lines

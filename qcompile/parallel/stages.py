"""Pipeline stages: a decoder's layers cut into S contiguous runs, balanced by the bytes of their
parameters; the embedding goes with the first stage, the final norm and the LM head with the last (a tied
LM head is the embedding: the last stage holds it too). No TVM here.

Stage s of a library built with S stages has its own entry points and parameters (its own shared object):
stage 0 takes token ids, later stages the hidden state [n, hidden] the previous stage returned; the last
returns the logits. Each stage carries the KV cache of its own layers only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ..errors import UserError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    first_layer: int
    end_layer: int  # exclusive
    is_first: bool
    is_last: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)


def tensor_bytes_by_owner(spec: Any) -> tuple[list[int], int, int]:
    """Parameter counts (bytes / dtype size: one dtype throughout) of each layer, of what the first stage adds (embedding) and of
    what the last adds (final norm, LM head: the embedding again when tied)."""
    layers = [0] * spec.config.num_hidden_layers
    first = last = 0
    for name, shape in spec.family.hf_tensors(spec.config).items():
        size, layer = math.prod(shape), _LAYER.match(name)
        if layer:
            layers[int(layer.group(1))] += size
        elif name == "model.embed_tokens.weight":
            first += size
            last += size if spec.config.tie_word_embeddings else 0
        else:
            last += size
    return layers, first, last


def partition(spec: Any, stages: int) -> list[Stage]:
    """The contiguous cut of the layers into `stages` runs whose largest stage (in parameter bytes, the
    embedding counted in the first, norm + LM head in the last) is smallest."""
    if not isinstance(stages, int) or stages < 1:
        raise UserError(f"--pipeline-stages must be a positive integer, got {stages!r}")
    if spec.kind.name != "decoder":
        raise UserError(f"--pipeline-stages applies to decoders; {spec.name} is an {spec.kind.name}")
    n = spec.config.num_hidden_layers
    if stages > n:
        raise UserError(f"{spec.name}: field 'num_hidden_layers' ({n}) is fewer than --pipeline-stages {stages}")
    layers, first, last = tensor_bytes_by_owner(spec)
    prefix = [0]
    for size in layers:
        prefix.append(prefix[-1] + size)

    def cost(s: int, a: int, b: int) -> int:  # stage s holding layers a..b-1
        return prefix[b] - prefix[a] + (first if s == 0 else 0) + (last if s == stages - 1 else 0)

    # best[s][b]: (largest stage, cuts) placing layers 0..b-1 in stages 0..s
    best: list[dict[int, tuple[int, list[int]]]] = [{b: (cost(0, 0, b), [b]) for b in range(1, n + 1)}]
    for s in range(1, stages):
        row = {}
        for b in range(s + 1, n + 1):
            row[b] = min(((max(best[s - 1][a][0], cost(s, a, b)), best[s - 1][a][1] + [b])
                          for a in range(s, b) if a in best[s - 1]), key=lambda t: t[0])
        best.append(row)
    ends = best[stages - 1][n][1]
    starts = [0, *ends[:-1]]
    return [Stage(s, a, b, s == 0, s == stages - 1) for s, (a, b) in enumerate(zip(starts, ends, strict=True))]


def stage_parameter_name(name: str, stage: Stage) -> str:
    """A stage module's parameter name (its layers numbered from 0) -> the model's (`model.layers.N`)."""
    return _LAYER.sub(lambda m: f"model.layers.{stage.first_layer + int(m.group(1))}.", name, count=1)


def record(spec: Any, cut: list[Stage]) -> list[dict[str, Any]]:
    """Per stage: its layers [first, end) and the parameter count it balances (whole model, unsharded)."""
    layers, first, last = tensor_bytes_by_owner(spec)
    return [{"stage": s.index, "layers": [s.first_layer, s.end_layer],
             "parameter_count": sum(layers[s.first_layer:s.end_layer]) + (first if s.is_first else 0)
             + (last if s.is_last else 0)} for s in cut]


def device_parameter_counts(spec: Any, split: Any | None, cut: list[Stage] | None) -> list[int]:
    """Per stage, the parameters each of its devices holds (every shard of a stage holds as many): its
    tensors, those the plan splits (`split`, a `shards.TensorParallel`) divided by the shard count. The
    hook for a per-device memory plan (weights bytes = count x dtype size)."""
    cut = cut or [Stage(0, 0, spec.config.num_hidden_layers, True, True)]
    counts = [0] * len(cut)
    stage_of = {layer: s.index for s in cut for layer in s.layers}
    for name, shape in spec.family.hf_tensors(spec.config).items():
        layer = _LAYER.match(name)
        if layer:
            owners = [stage_of[int(layer.group(1))]]
        elif name == "model.embed_tokens.weight":
            owners = sorted({0, len(cut) - 1} if spec.config.tie_word_embeddings else {0})
        else:
            owners = [len(cut) - 1]
        size = math.prod(shape)
        if split is not None:
            region = split.tensor_slice(name, tuple(shape), 0).region
            size = math.prod(len(range(*r.indices(d))) for r, d in zip(region, shape, strict=True))
        for s in owners:
            counts[s] += size
    return counts

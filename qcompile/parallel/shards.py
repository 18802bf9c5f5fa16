"""A family's tensor-parallel plan applied to one model: the single source of the per-shard shapes, of
which slice of each HF tensor a shard reads, and of where the all-reduces go. No TVM here (the runtime and
the worker processes read it).

The plan (`Family.tensor_parallel_plan`) maps HF module patterns to "colwise" (split the output features:
q/k/v, gate/up, each expert's gate/up), "rowwise" (split the input features: o_proj, down_proj, each
expert's down; one all-reduce sums the shards' partial outputs after each) or "replicated". Splitting q
splits the heads, k/v the kv heads, gate/up the MLP's (or each expert's) intermediate size: those config
fields are divided by the shard count, head_dim stays. Everything not in the plan (embedding, norms, LM
head, the MoE router) is replicated.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import UserError

COLWISE, ROWWISE, REPLICATED = "colwise", "rowwise", "replicated"

# The config field that counts the output features of each column-parallel projection (the module
# pattern after `model.layers.*.`): the plan splitting that projection divides that field.
COLUMN_FIELDS = {
    "self_attn.q_proj": "num_attention_heads",
    "self_attn.k_proj": "num_key_value_heads",
    "self_attn.v_proj": "num_key_value_heads",
    "mlp.gate_proj": "intermediate_size",
    "mlp.up_proj": "intermediate_size",
    "mlp.experts.*.gate_proj": "moe_intermediate_size",
    "mlp.experts.*.up_proj": "moe_intermediate_size",
}
LAYER_PREFIX = "model.layers.*."


def _pattern(module: str) -> re.Pattern:
    """A plan key (`*` = one name component) as a regex over HF module names."""
    return re.compile("\\.".join("[^.]+" if part == "*" else re.escape(part) for part in module.split(".")))


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    """The part of one HF tensor a shard holds: `region` indexes the full tensor. `zero`: a row-parallel
    projection's bias on shards > 0 (each shard's partial output would add it once more; rank 0 adds it)."""

    region: tuple[slice, ...]
    zero: bool = False


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A model split into `shards` by its family's plan."""

    shards: int
    plan: dict[str, str]

    @classmethod
    def for_model(cls, spec: Any, shards: int) -> TensorParallel:
        """The plan for `spec` (a ModelSpec) over `shards` devices; UserError naming the field that does
        not divide, or why the model cannot be split."""
        if not isinstance(shards, int) or shards < 1:
            raise UserError(f"--tensor-parallel must be a positive integer, got {shards!r}")
        if spec.kind.name != "decoder":
            raise UserError(f"--tensor-parallel applies to decoders; {spec.name} is an {spec.kind.name}")
        tp = cls(shards, dict(spec.family.tensor_parallel_plan))
        for field in tp.divided_fields():
            value = getattr(spec.config, field)
            if value % shards:
                raise UserError(f"{spec.name}: field '{field}' ({value}) is not divisible by "
                                f"--tensor-parallel {shards}")
        return tp

    def rule(self, hf_tensor: str) -> str:
        """colwise | rowwise | replicated for an HF tensor name (`...q_proj.weight`)."""
        module = hf_tensor.rsplit(".", 1)[0]
        return next((how for key, how in self.plan.items() if _pattern(key).fullmatch(module)), REPLICATED)

    def divided_fields(self) -> list[str]:
        """The config fields the plan divides by the shard count, kv heads first (the usual culprit)."""
        fields = {COLUMN_FIELDS[key[len(LAYER_PREFIX):]] for key, how in self.plan.items()
                  if how == COLWISE and key.startswith(LAYER_PREFIX) and key[len(LAYER_PREFIX):] in COLUMN_FIELDS}
        order = list(dict.fromkeys(COLUMN_FIELDS.values()))
        return sorted(fields, key=lambda f: (f != "num_key_value_heads", order.index(f)))

    def shard_config(self, config: Any) -> Any:
        """The config one shard computes with: the divided fields / shards, head_dim stated (unchanged)."""
        fields = {f: getattr(config, f) // self.shards for f in self.divided_fields()}
        return dataclasses.replace(config, **fields, head_dim=config.resolved_head_dim)

    def tensor_slice(self, hf_tensor: str, shape: tuple[int, ...], rank: int) -> TensorSlice:
        """Which part of the HF tensor (full `shape`) shard `rank` holds. HF Linear weights are [out, in]:
        column-parallel splits axis 0 (weight and bias), row-parallel axis 1 (its bias is rank 0's)."""
        whole = tuple(slice(None) for _ in shape)
        how = self.rule(hf_tensor)
        if how == REPLICATED:
            return TensorSlice(whole)
        axis = 0 if how == COLWISE or len(shape) == 1 else 1
        if how == ROWWISE and len(shape) == 1:
            return TensorSlice(whole, zero=rank > 0)
        part = shape[axis] // self.shards
        region = list(whole)
        region[axis] = slice(rank * part, (rank + 1) * part)
        return TensorSlice(tuple(region))

    def record(self, config: Any) -> dict[str, Any]:
        """What the manifest says about the split (the library's `parameters` are one shard's)."""
        shard = self.shard_config(config)
        return {"tensor_parallel": self.shards, "plan": self.plan,
                "shard_config": {f: getattr(shard, f) for f in self.divided_fields()},
                "all_reduce_after": sorted(k for k, how in self.plan.items() if how == ROWWISE)}


def from_manifest(manifest: dict[str, Any]) -> TensorParallel | None:
    """The split a library was built with (None: one device)."""
    record = manifest.get("parallel")
    if not record or record["tensor_parallel"] == 1:
        return None
    return TensorParallel(record["tensor_parallel"], record["plan"])

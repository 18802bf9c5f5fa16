"""What every decoder family shares: the config fields and checks, the HF config.json reading, and the HF
tensor names of attention. A family adds its fields, its layer, and its MLP's tensors.

No TVM here: the runtime reads configs and weight maps without the compiler. The causal LM skeleton in
Relax (embedding -> layers -> norm -> LM head, the prefill/decode entry points) is `decoder_graph`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from ..spec.schema import hf_rope_theta, positive

Shapes = dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Fields every Qwen decoder has (Hugging Face names)."""

    vocab_size: int = positive()
    hidden_size: int = positive()
    intermediate_size: int = positive()
    num_hidden_layers: int = positive()
    num_attention_heads: int = positive()
    num_key_value_heads: int = positive()
    max_position_embeddings: int = positive()
    rms_norm_eps: float = positive()
    rope_theta: float = positive()
    tie_word_embeddings: bool
    hidden_act: str
    use_sliding_window: bool
    sliding_window: int | None = positive(None)
    head_dim: int | None = positive(None)  # absent: hidden_size / num_attention_heads

    # Fields whose meaning `layer_windows()` captures; `canonical()` replaces them by it.
    WINDOW_FIELDS = ("use_sliding_window", "sliding_window")

    def check(self, where: str) -> None:
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % kv:
            raise UserError(f"{where}: field 'num_key_value_heads' ({kv}) must divide "
                            f"num_attention_heads ({heads})")
        if self.head_dim is None and self.hidden_size % heads:
            raise UserError(f"{where}: field 'hidden_size' ({self.hidden_size}) must be a multiple of "
                            f"num_attention_heads ({heads}) when head_dim is not given")
        if self.resolved_head_dim % 2:
            raise UserError(f"{where}: head dimension {self.resolved_head_dim} must be even for RoPE")
        if self.hidden_act != "silu":
            raise UserError(f"{where}: field 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        if self.use_sliding_window and self.sliding_window is not None \
                and self.sliding_window > self.max_position_embeddings:
            raise UserError(f"{where}: field 'sliding_window' ({self.sliding_window}) is larger than the "
                            f"context max_position_embeddings ({self.max_position_embeddings})")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_windows(self) -> list[int | None]:
        """Per layer, the sliding window or None (full attention). Default: one window for all layers
        when `use_sliding_window` (Qwen3-MoE); Qwen2 derives it per layer."""
        window = self.sliding_window if self.use_sliding_window else None
        return [window] * self.num_hidden_layers

    def kv_cache_layout(self, max_seq_len: int) -> list[dict[str, Any]]:
        """Per layer, its KV buffers' rows ("slots"): a full-attention layer keeps every position up to
        max_seq_len; a sliding layer only its window (a ring: position q in slot q % slots)."""
        return [{"kind": "full_attention", "slots": max_seq_len} if window is None else
                {"kind": "sliding_attention", "window": window, "slots": min(window, max_seq_len)}
                for window in self.layer_windows()]

    def canonical(self) -> dict[str, Any]:
        """What decides the computation, one spelling per meaning (for keys and checkpoint checks)."""
        fields = dataclasses.asdict(self)
        for key in (*self.WINDOW_FIELDS, "head_dim"):
            del fields[key]
        return {**fields, "head_dim": self.resolved_head_dim, "layer_windows": self.layer_windows()}


def config_from_hf(cls: type, hf: dict[str, Any], where: str, defaults: dict[str, Any],
                   aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """HF config.json -> `cls` fields: HF's defaults filled in, RoPE read from either spelling, alias
    names (e.g. num_local_experts -> num_experts) mapped; HF keys `cls` does not have are dropped."""
    hf = dict(hf)
    for alias, name in (aliases or {}).items():
        if alias in hf:
            if name in hf and hf[name] != hf[alias]:
                raise UserError(f"{where}: fields '{alias}' ({hf[alias]}) and '{name}' ({hf[name]}) disagree")
            hf[name] = hf.pop(alias)
    names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
    values = {**defaults, **{k: v for k, v in hf.items() if k in names}}
    values["rope_theta"] = hf_rope_theta(hf, where, default=defaults["rope_theta"])
    if values.get("num_key_value_heads") is None and "num_attention_heads" in values:
        values["num_key_value_heads"] = values["num_attention_heads"]
    return values


def attention_hf_tensors(cfg: DecoderConfig, prefix: str, *, qkv_bias: bool, o_bias: bool = False,
                         qk_norm: bool = False) -> Shapes:
    """HF names and shapes of one layer's attention (`prefix` = model.layers.N.self_attn)."""
    hidden, hd = cfg.hidden_size, cfg.resolved_head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    t: Shapes = {}
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        t[f"{prefix}.{name}.weight"] = (rows, hidden)
        if qkv_bias:
            t[f"{prefix}.{name}.bias"] = (rows,)
    t[f"{prefix}.o_proj.weight"] = (hidden, q)
    if o_bias:
        t[f"{prefix}.o_proj.bias"] = (hidden,)
    if qk_norm:
        t[f"{prefix}.q_norm.weight"] = (hd,)
        t[f"{prefix}.k_norm.weight"] = (hd,)
    return t


def swiglu_hf_tensors(hidden: int, ffn: int, prefix: str) -> Shapes:
    return {f"{prefix}.gate_proj.weight": (ffn, hidden), f"{prefix}.up_proj.weight": (ffn, hidden),
            f"{prefix}.down_proj.weight": (hidden, ffn)}


def decoder_hf_tensors(cfg: DecoderConfig, layer_tensors: Callable[[int, str], Shapes]) -> Shapes:
    """Every tensor of an HF causal-LM checkpoint: embedding, per-layer norms + the family's layer
    tensors, final norm, and lm_head unless tied."""
    hidden = cfg.hidden_size
    t: Shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = (hidden,)
        t |= layer_tensors(i, p)
        t[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    t["model.norm.weight"] = (hidden,)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, hidden)
    return t


# Library parameter <- HF tensors: q/k/v fuse into qkv_proj, gate/up into gate_up_proj (axis 0).
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_weight_map(hf_names) -> dict[str, list[str]]:
    """Library parameter -> HF tensors concatenated along axis 0 (fused projections), else itself."""
    m: dict[str, list[str]] = {}
    for name in hf_names:
        target = name
        for into, parts in FUSED_PROJECTIONS.items():
            for part in parts:
                target = target.replace(f".{part}.", f".{into}.")
        m.setdefault(target, []).append(name)
    return m


# Tensor-parallel plan pieces over HF tensor names (declared, applied by later work): column-parallel
# projections split their output features, row-parallel ones their input features; one all-reduce
# after each row-parallel projection (o_proj ends attention, down_proj ends the MLP).
ATTENTION_TP_PLAN: dict[str, str] = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
}
DENSE_MLP_TP_PLAN: dict[str, str] = {
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def tokenizer_files(cfg: DecoderConfig) -> dict[str, dict[str, Any]]:
    """The tokenizer files init-weights writes for a decoder: Qwen's real tokenizer (tokenizer.json,
    tokenizer_config.json, generation_config.json) when the embedding covers Qwen's vocabulary, else none."""
    from ..run.qwen_vocab import checkpoint_files  # noqa: PLC0415 (built only when writing a checkpoint)

    return checkpoint_files(cfg.vocab_size, cfg.max_position_embeddings)


def parameter_count(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())

"""The Qwen2 family: dense decoder (Qwen-72B, Qwen2-*) with optional per-layer sliding-window attention.

Config fields are Hugging Face's `Qwen2Config` names. The reference is `transformers.Qwen2ForCausalLM`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..errors import UserError
from ..schema import hf_rope_theta, positive
from .layers import F32, CausalSelfAttention, Embedding, RMSNorm, SwiGLU

ATTENTION_KINDS = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = positive()
    hidden_size: int = positive()
    intermediate_size: int = positive()
    num_hidden_layers: int = positive()
    num_attention_heads: int = positive()
    num_key_value_heads: int = positive()
    max_position_embeddings: int = positive()
    rms_norm_eps: float = positive()
    rope_theta: float = positive()
    tie_word_embeddings: bool = dataclasses.field()
    hidden_act: str = dataclasses.field()
    use_sliding_window: bool = dataclasses.field()
    max_window_layers: int = dataclasses.field()
    sliding_window: int | None = positive(None)
    layer_types: list[str] | None = None
    head_dim: int | None = positive(None)  # absent in Qwen2 configs: hidden_size / num_attention_heads

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
        if self.max_window_layers < 0:
            raise UserError(f"{where}: field 'max_window_layers' must be >= 0, got {self.max_window_layers}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise UserError(f"{where}: field 'layer_types' has {len(self.layer_types)} entries, "
                                f"num_hidden_layers is {self.num_hidden_layers}")
            bad = [t for t in self.layer_types if t not in ATTENTION_KINDS]
            if bad:
                raise UserError(f"{where}: field 'layer_types' has {bad[0]!r}; "
                                f"allowed: {', '.join(ATTENTION_KINDS)}")
        if self.use_sliding_window and self.sliding_window is not None \
                and self.sliding_window > self.max_position_embeddings:
            raise UserError(f"{where}: field 'sliding_window' ({self.sliding_window}) is larger than the "
                            f"context max_position_embeddings ({self.max_position_embeddings})")
        if self.use_sliding_window and self.sliding_window is None \
                and "sliding_attention" in (self.layer_types or ()):
            raise UserError(f"{where}: field 'sliding_window' must be set when layer_types has "
                            f"sliding_attention")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def canonical(self) -> dict[str, Any]:
        """What decides the computation, one spelling per meaning: the sliding-window fields collapse
        into the per-layer windows they imply (HF writes derived layer_types; zoo entries do not)."""
        fields = dataclasses.asdict(self)
        for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "head_dim"):
            del fields[key]
        return {**fields, "head_dim": self.resolved_head_dim, "layer_windows": self.layer_windows()}

    def layer_windows(self) -> list[int | None]:
        """Per layer, the sliding window or None (full attention), derived exactly as HF derives it:
        without `use_sliding_window` every layer is full and `layer_types` is ignored; otherwise an explicit
        `layer_types` decides, else layers with index >= `max_window_layers` slide."""
        n = self.num_hidden_layers
        if not self.use_sliding_window or self.sliding_window is None:
            return [None] * n
        kinds = self.layer_types or [
            "sliding_attention" if i >= self.max_window_layers else "full_attention" for i in range(n)
        ]
        return [self.sliding_window if k == "sliding_attention" else None for k in kinds]


# Fields of HF's Qwen2Config that qcompile reads, with HF's own defaults for those a config.json may omit.
HF_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": 4096, "max_window_layers": 28,
}


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """HF config.json fields -> Qwen2Config fields (HF's defaults filled in; other HF keys dropped)."""
    names = {f.name for f in dataclasses.fields(Qwen2Config)} - {"rope_theta"}
    values = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k in names}}
    values["rope_theta"] = hf_rope_theta(hf, where, default=HF_DEFAULTS["rope_theta"])
    if values.get("num_key_value_heads") is None and "num_attention_heads" in values:
        values["num_key_value_heads"] = values["num_attention_heads"]
    return values


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, window: int | None, dtype: str):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = CausalSelfAttention(
            hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.resolved_head_dim, qkv_bias=True, rope_theta=cfg.rope_theta, window=window,
            dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor):
        attn, k, v = self.self_attn(self.input_layernorm(x), past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config, dtype: str):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(cfg, w, dtype) for w in cfg.layer_windows()])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Qwen2ForCausalLM(nn.Module):
    """Entry points `prefill` (n tokens) and `decode` (1 token); both extend the KV cache.

    kv_cache: 2 * num_layers tensors [p, kv_heads, head_dim] (k0, v0, k1, v1, ...), p positions so far.
    Returns float32 logits [n, vocab] for every new position and the extended cache ([p + n, ...]).
    """

    def __init__(self, cfg: Qwen2Config, dtype: str):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def _forward(self, input_ids: Tensor, kv_cache: list[Tensor]):
        x = self.model.embed_tokens(input_ids)  # [n, hidden]
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, kv_cache[2 * i], kv_cache[2 * i + 1])
            new_cache += [k, v]
        x = self.model.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = op.matmul(x, op.permute_dims(self.model.embed_tokens.weight))
        else:
            logits = self.lm_head(x)
        return logits.astype(F32), new_cache

    def prefill(self, input_ids: Tensor, kv_cache: list[Tensor]):
        return self._forward(input_ids, kv_cache)

    def decode(self, input_ids: Tensor, kv_cache: list[Tensor]):
        return self._forward(input_ids, kv_cache)

    def export_spec(self) -> dict[str, Any]:
        """The entry points' argument specs for `export_tvm` (n, p symbolic; weights packed last)."""
        cfg = self.cfg
        cache_entry = [cfg.num_key_value_heads, cfg.resolved_head_dim]
        modes = {"param_mode": "packed", "effect_mode": "none"}
        dtype = self.model.norm.weight.dtype
        cache = [nn.spec.Tensor(["p", *cache_entry], dtype) for _ in range(2 * cfg.num_hidden_layers)]
        return {
            "prefill": {"input_ids": nn.spec.Tensor(["n"], "int32"), "kv_cache": cache, "$": modes},
            "decode": {"input_ids": nn.spec.Tensor([1], "int32"), "kv_cache": list(cache), "$": modes},
        }


def build(cfg: Qwen2Config, dtype: str) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(cfg, dtype)


def hf_tensors(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Qwen2 checkpoint (`save_pretrained` names) and its shape."""
    hidden, ffn, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    t: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        t |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q, hidden), f"{p}.self_attn.q_proj.bias": (q,),
            f"{p}.self_attn.k_proj.weight": (kv, hidden), f"{p}.self_attn.k_proj.bias": (kv,),
            f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.v_proj.bias": (kv,),
            f"{p}.self_attn.o_proj.weight": (hidden, q),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (ffn, hidden), f"{p}.mlp.up_proj.weight": (ffn, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, ffn),
        }
    t["model.norm.weight"] = (hidden,)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, hidden)
    return t


def weight_map(cfg: Qwen2Config) -> dict[str, list[str]]:
    """Library parameter -> the HF tensors that fill it, concatenated along axis 0 (output features).

    q/k/v (weights and biases) fuse into qkv_proj and gate/up into gate_up_proj; every other parameter
    is the HF tensor of the same name.
    """
    fused = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    m: dict[str, list[str]] = {}
    for name in hf_tensors(cfg):
        target = name
        for into, parts in fused.items():
            for part in parts:
                target = target.replace(f".{part}.", f".{into}.")
        m.setdefault(target, []).append(name)
    return m


def config_to_hf(cfg: Qwen2Config) -> dict[str, Any]:
    """The config.json that `save_pretrained` would write for this model (transformers 5.x spelling)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and k != "rope_theta"}
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **fields,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}}


# Tensor-parallel plan over HF tensor names (declared here, applied by later work): column-parallel
# projections split their output features, row-parallel ones their input features; one all-reduce after
# each row-parallel projection (o_proj ends attention, down_proj ends the MLP).
TENSOR_PARALLEL_PLAN: dict[str, str] = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}
# Pipeline stages run embed -> layers -> norm (+ lm_head) in this order.
PIPELINE_PLAN: tuple[str, ...] = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")

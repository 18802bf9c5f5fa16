"""The Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B): sparse mixture-of-experts decoder.

Config fields are Hugging Face's `Qwen3MoeConfig` names. The reference is `transformers.Qwen3MoeForCausalLM`.
Delta over the shared decoder: attention without q/k/v bias (unless `attention_bias`) and with per-head
RMSNorm on q and k; layers i with (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers use the
sparse MoE block (`layers.SparseMoE`), the others a dense SwiGLU of `intermediate_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from ..spec.schema import positive
from . import decoder
from .decoder import DecoderConfig, Shapes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(DecoderConfig):
    attention_bias: bool
    num_experts: int = positive()
    num_experts_per_tok: int = positive()
    moe_intermediate_size: int = positive()
    norm_topk_prob: bool
    decoder_sparse_step: int = positive()
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)

    def check(self, where: str) -> None:
        super().check(where)
        if self.num_experts_per_tok > self.num_experts:
            raise UserError(f"{where}: field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be "
                            f"<= num_experts ({self.num_experts})")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise UserError(f"{where}: field 'mlp_only_layers' has layer {outside[0]}, outside "
                            f"0..{self.num_hidden_layers - 1}")

    def sparse_layers(self) -> list[bool]:
        """Per layer, whether its MLP is the sparse MoE block (HF's rule)."""
        return [i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                for i in range(self.num_hidden_layers)]


HF_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "use_sliding_window": False, "sliding_window": 4096, "decoder_sparse_step": 1,
    "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
    "mlp_only_layers": [],
}


def config_from_hf(hf: dict[str, Any], where: str, directory=None) -> dict[str, Any]:
    """transformers 5.x writes the expert count as `num_local_experts`, older files `num_experts`."""
    values = decoder.config_from_hf(Qwen3MoeConfig, hf, where, HF_DEFAULTS,
                                    aliases={"num_local_experts": "num_experts"})
    if values.get("mlp_only_layers") is None:  # HF reads null as []
        values["mlp_only_layers"] = []
    return values


def _attention_kwargs(cfg: Qwen3MoeConfig) -> dict[str, bool]:
    return {"qkv_bias": cfg.attention_bias, "o_bias": cfg.attention_bias, "qk_norm": True}


def build(cfg: Qwen3MoeConfig, dtype: str):
    """The Relax module (`decoder_graph.CausalLM`); TVM's compiler is imported only here."""
    from .decoder_graph import CausalLM, DecoderLayer, attention  # noqa: PLC0415
    from .layers import SparseMoE, SwiGLU  # noqa: PLC0415

    layers = []
    for window, sparse in zip(cfg.layer_windows(), cfg.sparse_layers(), strict=True):
        mlp = (SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                         cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype) if sparse
               else SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype))
        attn = attention(cfg, window, dtype, **_attention_kwargs(cfg))
        layers.append(DecoderLayer(cfg, attn, mlp, dtype))
    return CausalLM(cfg, layers, dtype)


def _expert_names(layer_prefix: str, expert: int) -> dict[str, str]:
    p = f"{layer_prefix}.mlp.experts.{expert}"
    return {x: f"{p}.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")}


def hf_tensors(cfg: Qwen3MoeConfig) -> Shapes:
    """Every tensor of an HF Qwen3-MoE checkpoint as `save_pretrained` writes it (one per expert)."""
    hidden, ffn = cfg.hidden_size, cfg.moe_intermediate_size
    sparse = cfg.sparse_layers()

    def layer(i: int, p: str) -> Shapes:
        t = decoder.attention_hf_tensors(cfg, f"{p}.self_attn", **_attention_kwargs(cfg))
        if not sparse[i]:
            return t | decoder.swiglu_hf_tensors(hidden, cfg.intermediate_size, f"{p}.mlp")
        t[f"{p}.mlp.gate.weight"] = (cfg.num_experts, hidden)
        for e in range(cfg.num_experts):
            names = _expert_names(p, e)
            t |= {names["gate_proj"]: (ffn, hidden), names["up_proj"]: (ffn, hidden),
                  names["down_proj"]: (hidden, ffn)}
        return t

    return decoder.decoder_hf_tensors(cfg, layer)


def weight_map(cfg: Qwen3MoeConfig) -> dict[str, list[str] | list[list[str]]]:
    """Library parameter -> HF tensors: a list is concatenated along axis 0; a list of lists is stacked
    along a new axis 0 (experts), each inner list concatenated (gate then up)."""
    tensors = hf_tensors(cfg)
    m: dict[str, Any] = decoder.fused_weight_map(n for n in tensors if ".mlp.experts." not in n)
    for i, sparse in enumerate(cfg.sparse_layers()):
        if sparse:
            p = f"model.layers.{i}"
            experts = [_expert_names(p, e) for e in range(cfg.num_experts)]
            m[f"{p}.mlp.experts.gate_up_proj"] = [[x["gate_proj"], x["up_proj"]] for x in experts]
            m[f"{p}.mlp.experts.down_proj"] = [[x["down_proj"]] for x in experts]
    return m


def checkpoint_views(cfg: Qwen3MoeConfig) -> dict[str, dict[str, tuple]]:
    """Fused expert tensors a checkpoint may hold instead (transformers' in-memory layout
    `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) -> the per-expert tensors they
    contain, as numpy index tuples."""
    ffn, views = cfg.moe_intermediate_size, {}
    for i, sparse in enumerate(cfg.sparse_layers()):
        if sparse:
            p = f"model.layers.{i}"
            experts = [_expert_names(p, e) for e in range(cfg.num_experts)]
            views[f"{p}.mlp.experts.gate_up_proj"] = {
                **{x["gate_proj"]: (e, slice(0, ffn)) for e, x in enumerate(experts)},
                **{x["up_proj"]: (e, slice(ffn, 2 * ffn)) for e, x in enumerate(experts)}}
            views[f"{p}.mlp.experts.down_proj"] = {x["down_proj"]: (e,) for e, x in enumerate(experts)}
    return views


def active_parameter_count(cfg: Qwen3MoeConfig) -> int:
    """Parameters one token uses: all but the (num_experts - top_k) unchosen experts of each sparse layer."""
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = (cfg.num_experts - cfg.num_experts_per_tok) * per_expert * sum(cfg.sparse_layers())
    return decoder.parameter_count(hf_tensors(cfg)) - idle


def config_to_hf(cfg: Qwen3MoeConfig) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if v is not None and k not in ("rope_theta", "num_experts")}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **fields,
            "num_local_experts": cfg.num_experts,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}}


# Tensor-parallel plan over HF tensor names (declared, not applied yet): attention as in qwen2; every
# expert is split along its FFN dimension (gate/up by output rows, down by input columns), so each
# device holds a slice of every expert and one all-reduce ends the MoE block; the router is replicated.
TENSOR_PARALLEL_PLAN: dict[str, str] = decoder.ATTENTION_TP_PLAN | decoder.DENSE_MLP_TP_PLAN | {
    "model.layers.*.self_attn.q_norm": "replicated",
    "model.layers.*.self_attn.k_norm": "replicated",
    "model.layers.*.mlp.gate": "replicated",
    "model.layers.*.mlp.experts.*.gate_proj": "colwise",
    "model.layers.*.mlp.experts.*.up_proj": "colwise",
    "model.layers.*.mlp.experts.*.down_proj": "rowwise",
}

"""The causal LM skeleton every decoder family builds, in `tvm.relax.frontend.nn`: embedding -> layers ->
norm -> LM head, with its prefill/decode entry points. The compiler side only: the families import it when
they build (`Family.build`), so the runtime never needs TVM's compiler to read a model's config.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from .decoder import DecoderConfig
from ..quant import kernels as packed
from .layers import F32, CausalSelfAttention, RMSNorm


def attention(cfg: DecoderConfig, window: int | None, dtype: str, *, qkv_bias: bool, o_bias: bool = False,
              qk_norm: bool = False) -> CausalSelfAttention:
    return CausalSelfAttention(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.resolved_head_dim, qkv_bias=qkv_bias, o_bias=o_bias, rope_theta=cfg.rope_theta,
        window=window, qk_norm_eps=cfg.rms_norm_eps if qk_norm else None, dtype=dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). The family chooses attn and mlp."""

    def __init__(self, cfg: DecoderConfig, self_attn: nn.Module, mlp: nn.Module, dtype: str):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor):
        attn, k, v = self.self_attn(self.input_layernorm(x), past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.embed_tokens = packed.embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """Entry points `prefill` (n tokens) and `decode` (1 token); both extend the KV cache.

    kv_cache: 2 * num_layers tensors [p, kv_heads, head_dim] (k0, v0, k1, v1, ...), p positions so far.
    Returns float32 logits [n, vocab] for every new position and the extended cache ([p + n, ...]).
    """

    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.model = DecoderModel(cfg, layers, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = packed.linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def _forward(self, input_ids: Tensor, kv_cache: list[Tensor]):
        x = self.model.embed_tokens(input_ids)  # [n, hidden]
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, kv_cache[2 * i], kv_cache[2 * i + 1])
            new_cache += [k, v]
        x = self.model.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = packed.tied_head(x, self.model.embed_tokens)
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
        entry = [cfg.num_key_value_heads, cfg.resolved_head_dim]
        modes = {"param_mode": "packed", "effect_mode": "none"}
        cache = [nn.spec.Tensor(["p", *entry], self.dtype) for _ in range(2 * cfg.num_hidden_layers)]
        return {
            "prefill": {"input_ids": nn.spec.Tensor(["n"], "int32"), "kv_cache": cache, "$": modes},
            "decode": {"input_ids": nn.spec.Tensor([1], "int32"), "kv_cache": list(cache), "$": modes},
        }

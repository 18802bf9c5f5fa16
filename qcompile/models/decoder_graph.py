"""The causal LM skeleton every decoder family builds, in `tvm.relax.frontend.nn`: embedding -> layers ->
norm -> LM head, with its prefill/decode entry points. The compiler side only: the families import it when
they build (`Family.build`), so the runtime never needs TVM's compiler to read a model's config.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .decoder import DecoderConfig
from .layers import F32, CausalSelfAttention, Embedding, RMSNorm


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

    def forward(self, x: Tensor, position: tir.PrimExpr, k_cache: Tensor, v_cache: Tensor):
        attn, k_cache, v_cache = self.self_attn(self.input_layernorm(x), position, k_cache, v_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """Entry points `prefill` (n tokens) and `decode` (1 token) at `position` (the tokens already in the
    sequence); both write the new tokens' keys and values into the KV cache in place.

    kv_cache: 2 * num_layers buffers [slots, kv_heads, head_dim] (k0, v0, k1, v1, ...), slots per layer
    from `DecoderConfig.kv_cache_layout` (max_seq_len on a full layer, the window on a sliding one;
    position q lives in slot q % slots). They hold garbage until written: attention reads only slots
    written in this sequence, so a new sequence starts by passing position 0.
    Returns float32 logits [n, vocab] for every new position, and the buffers (the same memory: Relax
    needs the in-place results used, or it would drop the writes).
    """

    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.model = DecoderModel(cfg, layers, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def _forward(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        x = self.model.embed_tokens(input_ids)  # [n, hidden]
        written = []
        for i, layer in enumerate(self.model.layers):
            x, k_cache, v_cache = layer(x, position, kv_cache[2 * i], kv_cache[2 * i + 1])
            written += [k_cache, v_cache]
        x = self.model.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = op.matmul(x, op.permute_dims(self.model.embed_tokens.weight))
        else:
            logits = self.lm_head(x)
        return logits.astype(F32), written

    def prefill(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(input_ids, position, kv_cache)

    def decode(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(input_ids, position, kv_cache)

    def export_spec(self, max_seq_len: int) -> dict[str, Any]:
        """The entry points' argument specs for `export_tvm` (n and position symbolic; the cache buffers
        static, sized for `max_seq_len`; weights packed last)."""
        cfg = self.cfg
        row = [cfg.num_key_value_heads, cfg.resolved_head_dim]
        modes = {"param_mode": "packed", "effect_mode": "none"}
        cache = [nn.spec.Tensor([layer["slots"], *row], self.dtype)
                 for layer in cfg.kv_cache_layout(max_seq_len) for _ in ("k", "v")]
        return {
            "prefill": {"input_ids": nn.spec.Tensor(["n"], "int32"), "position": nn.spec.Int(),
                        "kv_cache": cache, "$": modes},
            "decode": {"input_ids": nn.spec.Tensor([1], "int32"), "position": nn.spec.Int(),
                       "kv_cache": list(cache), "$": modes},
        }

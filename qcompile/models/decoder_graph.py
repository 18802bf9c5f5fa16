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
from ..quant import kernels as packed
from . import paged
from .layers import F32, CausalSelfAttention, RMSNorm, gather


def attention(cfg: DecoderConfig, window: int | None, dtype: str, *, qkv_bias: bool, o_bias: bool = False,
              qk_norm: bool = False) -> CausalSelfAttention:
    return CausalSelfAttention(
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.resolved_head_dim, qkv_bias=qkv_bias, o_bias=o_bias, rope_theta=cfg.rope_theta,
        window=window, qk_norm_eps=cfg.rms_norm_eps if qk_norm else None, dtype=dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). The family chooses attn and mlp.

    Tensor-parallel (`shards` > 1, set by `CausalLM.shard`): attention and the MLP / MoE block each end
    in a row-parallel projection (o_proj, down_proj), so each shard holds a partial sum of their output;
    one all-reduce after each makes it whole (Disco's `runtime.disco.allreduce`).
    """

    shards = 1

    def __init__(self, cfg: DecoderConfig, self_attn: nn.Module, mlp: nn.Module, dtype: str):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, x: Tensor, position: tir.PrimExpr, k_cache: Tensor, v_cache: Tensor):
        attn, k_cache, v_cache = self.self_attn(self.input_layernorm(x), position, k_cache, v_cache)
        x = x + self._whole(attn)
        return x + self._whole(self.mlp(self.post_attention_layernorm(x))), k_cache, v_cache

    def forward_paged(self, x: Tensor, step: paged.Step, k_pool: Tensor, v_pool: Tensor):
        """The same block for a batch step's tokens, attention over paged pools (`models.paged`)."""
        attn, k_pool, v_pool = paged.self_attention(self.self_attn, self.input_layernorm(x), step, k_pool, v_pool)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k_pool, v_pool

    def _whole(self, partial: Tensor) -> Tensor:
        return op.ccl_allreduce(partial, "sum") if self.shards > 1 else partial


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.embed_tokens = packed.embedding(cfg.vocab_size, cfg.hidden_size, dtype)
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

    `batch_step` runs several sequences in one call over a paged cache (`models.paged`; not on a
    tensor-parallel shard): see its docstring.
    """

    batched = True  # export batch_step (a tensor-parallel shard does not: its runtime runs one sequence)

    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.model = DecoderModel(cfg, layers, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = packed.linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def shard(self, shards: int) -> None:
        """Make this (built with one shard's config) one of `shards` tensor-parallel shards."""
        for layer in self.model.layers:
            layer.shards = shards
        self.batched = False

    def _forward(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        x, written = run_layers(self.model.layers, self.model.embed_tokens(input_ids), position, kv_cache)
        return logits(self.cfg, self.model, getattr(self, "lm_head", None), x), written

    def prefill(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(input_ids, position, kv_cache)

    def decode(self, input_ids: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(input_ids, position, kv_cache)

    def batch_step(self, input_ids: Tensor, positions: Tensor, token_seq: Tensor, logit_rows: Tensor,
                   page_table: Tensor, window_table: Tensor, first_position: tir.PrimExpr,
                   columns: tir.PrimExpr, kv_pages: list[Tensor]):
        """n tokens of b sequences: input_ids, positions, token_seq [n] int32 (token i: its sequence's
        page-table row and its position there), logit_rows [b] int32 (the row whose logits each sequence
        wants: its last token's), page tables [b, max_pages] int32 (full layers', sliding layers'),
        first_position / columns (the step's lowest position, highest + 1), kv_pages: per layer K and V
        pools [pages, PAGE_TOKENS, kv, d] (pages: `full_pages` on a full layer, `window_pages` on a
        sliding one). Writes the tokens' keys and values into their pages; returns float32 logits
        [b, vocab] and the pools (the same memory)."""
        step = paged.Step(positions, token_seq, page_table, window_table, first_position, columns)
        x = self.model.embed_tokens(input_ids)
        written = []
        for i, layer in enumerate(self.model.layers):
            x, k_pool, v_pool = layer.forward_paged(x, step, kv_pages[2 * i], kv_pages[2 * i + 1])
            written += [k_pool, v_pool]
        return logits(self.cfg, self.model, getattr(self, "lm_head", None), gather(x, logit_rows)), written

    def export_spec(self, max_seq_len: int) -> dict[str, Any]:
        """The entry points' argument specs for `export_tvm` (n and position symbolic; the cache buffers
        static, sized for `max_seq_len`; weights packed last)."""
        specs = entry_specs(self.cfg, self.dtype, self.cfg.kv_cache_layout(max_seq_len), hidden_in=False,
                            name="input_ids")
        return {**specs, "batch_step": batch_step_spec(self.cfg, self.dtype, max_seq_len)} if self.batched else specs

    def pipeline_stage(self, first_layer: int, end_layer: int, is_first: bool, is_last: bool) -> PipelineStage:
        """Layers first_layer..end_layer-1 as one pipeline stage (with the embedding if first, the final
        norm and LM head if last)."""
        return PipelineStage(self, first_layer, end_layer, is_first, is_last)


def run_layers(layers, x: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """x [n, hidden] at `position` through `layers`, each writing its pair of the cache buffers (k0, v0,
    k1, v1, ...) in place; returns the buffers as written (Relax keeps a write only if it is used)."""
    written = []
    for i, layer in enumerate(layers):
        x, k_cache, v_cache = layer(x, position, kv_cache[2 * i], kv_cache[2 * i + 1])
        written += [k_cache, v_cache]
    return x, written


def logits(cfg: DecoderConfig, model: nn.Module, lm_head: nn.Module | None, x: Tensor) -> Tensor:
    """Final norm and LM head (the embedding when tied): hidden [n, hidden] -> float32 logits [n, vocab]."""
    x = model.norm(x)
    out = model.embed_tokens.lm_head(x) if lm_head is None else lm_head(x)
    return out.astype(F32)


def entry_specs(cfg: DecoderConfig, dtype: str, layers: list[dict[str, Any]], hidden_in: bool,
                name: str) -> dict[str, Any]:
    """prefill / decode specs: token ids [n] (or, for a later pipeline stage, the hidden state
    [n, hidden]), the position (symbolic) and the given layers' KV buffers ([slots, kv, head_dim] per
    `DecoderConfig.kv_cache_layout` entry, K and V); weights packed last."""
    row = [cfg.num_key_value_heads, cfg.resolved_head_dim]
    modes = {"param_mode": "packed", "effect_mode": "none"}
    cache = [nn.spec.Tensor([layer["slots"], *row], dtype) for layer in layers for _ in ("k", "v")]

    def first(n):  # the entry point's first argument, `name`
        return {name: nn.spec.Tensor([n, cfg.hidden_size], dtype) if hidden_in else nn.spec.Tensor([n], "int32")}

    return {"prefill": {**first("n"), "position": nn.spec.Int(), "kv_cache": cache, "$": modes},
            "decode": {**first(1), "position": nn.spec.Int(), "kv_cache": list(cache), "$": modes}}


def max_pages(max_seq_len: int) -> int:
    """Pages a page-table row holds: enough for max_seq_len positions."""
    return -(-max_seq_len // paged.PAGE_TOKENS)


def batch_step_spec(cfg: DecoderConfig, dtype: str, max_seq_len: int) -> dict[str, Any]:
    """`CausalLM.batch_step`'s argument specs: n tokens, b sequences and the pools' page counts symbolic
    (the runtime sizes the pools for its batch and memory budget)."""
    tokens = {name: nn.spec.Tensor(["n"], "int32") for name in ("input_ids", "positions", "token_seq")}
    table = nn.spec.Tensor(["b", max_pages(max_seq_len)], "int32")
    page = [paged.PAGE_TOKENS, cfg.num_key_value_heads, cfg.resolved_head_dim]
    pools = [nn.spec.Tensor(["full_pages" if window is None else "window_pages", *page], dtype)
             for window in cfg.layer_windows() for _ in ("k", "v")]
    return {**tokens, "logit_rows": nn.spec.Tensor(["b"], "int32"), "page_table": table, "window_table": table,
            "first_position": nn.spec.Int(), "columns": nn.spec.Int(), "kv_pages": pools,
            "$": {"param_mode": "packed", "effect_mode": "none"}}


class StageModel(nn.Module):
    """The parameters one pipeline stage holds, under the whole model's names (its layers numbered from 0:
    the builder renames them)."""

    def __init__(self, model: DecoderModel, first_layer: int, end_layer: int, embed: bool, norm: bool):
        if embed:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList([model.layers[i] for i in range(first_layer, end_layer)])
        if norm:
            self.norm = model.norm


class PipelineStage(nn.Module):
    """One pipeline stage of a CausalLM: the first takes token ids, the others the previous stage's hidden
    state [n, hidden]; the last returns float32 logits, the others the hidden state. The KV cache is its
    own layers'."""

    def __init__(self, lm: CausalLM, first_layer: int, end_layer: int, is_first: bool, is_last: bool):
        self.cfg, self.dtype, self.is_first, self.is_last = lm.cfg, lm.dtype, is_first, is_last
        self.first_layer, self.end_layer = first_layer, end_layer
        tied = lm.cfg.tie_word_embeddings
        self.model = StageModel(lm.model, first_layer, end_layer, embed=is_first or (is_last and tied),
                                norm=is_last)
        if is_last and not tied:
            self.lm_head = lm.lm_head

    def _forward(self, inputs: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        x = self.model.embed_tokens(inputs) if self.is_first else inputs
        x, written = run_layers(self.model.layers, x, position, kv_cache)
        if self.is_last:
            return logits(self.cfg, self.model, getattr(self, "lm_head", None), x), written
        return x, written

    def prefill(self, inputs: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(inputs, position, kv_cache)

    def decode(self, inputs: Tensor, position: tir.PrimExpr, kv_cache: list[Tensor]):
        return self._forward(inputs, position, kv_cache)

    def export_spec(self, max_seq_len: int) -> dict[str, Any]:
        layers = self.cfg.kv_cache_layout(max_seq_len)[self.first_layer:self.end_layer]
        return entry_specs(self.cfg, self.dtype, layers, hidden_in=not self.is_first, name="inputs")

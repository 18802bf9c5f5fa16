"""Blocks shared by the decoder families, written in `tvm.relax.frontend.nn`.

Shapes: the decoders run one sequence (batch 1), so activations are [n, hidden] for n new tokens, and a
layer's KV cache is a pair of tensors [p, n_kv_heads, head_dim] for p cached positions. Every block matches
the Hugging Face module it is named after (the reference in tests).
"""

from __future__ import annotations

import math

from tvm import relax, te
from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..quant import kernels as packed

F32 = "float32"


def gather(x: Tensor, indices: Tensor, axis: int = 0) -> Tensor:
    """`take` along `axis` with indices clipped into range: TVM's default "fast" gather reads out of
    bounds on a bad index (and warns at every build). Our indices are in range by construction or
    checked by the runtime, so clipping never changes a result."""
    return op.wrap_nested(relax.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name="gather")


class Embedding(nn.Module):
    """Token embedding: weight [vocab, hidden]; ids [n] -> [n, hidden].

    The runtime rejects out-of-range ids before any call; `gather` clips them anyway.
    """

    def __init__(self, vocab: int, hidden: int, dtype: str):
        self.weight = nn.Parameter((vocab, hidden), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return gather(self.weight, ids)


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32, result in x's dtype."""

    def __init__(self, size: int, eps: float, dtype: str):
        self.weight = nn.Parameter((size,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = op.rms_norm(x.astype(F32), self.weight.astype(F32), axes=[-1], epsilon=self.eps)
        return y.astype(x.dtype)


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one matmul ([2*ffn, hidden] weight)."""

    def __init__(self, hidden: int, ffn: int, dtype: str):
        self.ffn = ffn
        self.gate_up_proj = packed.linear(hidden, 2 * ffn, bias=False, dtype=dtype)
        self.down_proj = packed.linear(ffn, hidden, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


def apply_rope(x: Tensor, offset: tir.PrimExpr, theta: float) -> Tensor:
    """Rotary position embedding, HF's default type in rotate_half form.

    x: [n, heads, head_dim]; row i is at position offset + i. As HF computes it, in float32:
    inv_freq[k] = 1 / theta^(2k / head_dim), angle = position * inv_freq[k mod head_dim/2],
    out = x * cos(angle) + rotate_half(x) * sin(angle), rotate_half(x) = [-x2, x1].
    """

    def compute(x: te.Tensor, offset: tir.PrimExpr):
        _, _, dim = x.shape
        half = dim // 2

        def element(i, h, d):
            k = tir.floormod(d, half)
            exponent = (2 * k).astype(F32) / tir.const(int(dim), F32)
            inv_freq = tir.const(1.0, F32) / tir.power(tir.const(theta, F32), exponent)
            angle = (offset + i).astype(F32) * inv_freq
            rotated = tir.if_then_else(d < half, -x[i, h, d + half], x[i, h, d - half])
            value = x[i, h, d].astype(F32) * tir.cos(angle) + rotated.astype(F32) * tir.sin(angle)
            return value.astype(x.dtype)

        return te.compute(x.shape, element, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, offset])


def attention_scores(q: Tensor, k: Tensor) -> Tensor:
    """q [n, h, d], keys [t, kv, d] -> float32 q.k [h, n, t]. Query head hh reads kv head hh // (h / kv), as
    HF's repeat_kv does, straight from the cache: no repeated or transposed copy of the keys."""

    def compute(q: te.Tensor, k: te.Tensor):
        n, heads, d = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        r = te.reduce_axis((0, d), name="r")
        return te.compute((heads, n, k.shape[0]), lambda hh, i, j: te.sum(
            q[i, hh, r].astype(F32) * k[j, hh // group, r].astype(F32), axis=r), name="attention_scores")

    return op.tensor_expr_op(compute, "attention_scores", [q, k])


def attention_values(probs: Tensor, v: Tensor) -> Tensor:
    """probs [h, n, t], values [t, kv, d] -> [n, h, d] in the values' dtype (accumulated in float32); query
    head hh reads kv head hh // (h / kv), straight from the cache."""

    def compute(p: te.Tensor, v: te.Tensor):
        heads, n, t = p.shape
        kv_heads, d = v.shape[1], v.shape[2]
        group = heads // kv_heads
        j = te.reduce_axis((0, t), name="j")
        acc = te.compute((n, heads, d), lambda i, hh, dd: te.sum(
            p[hh, i, j].astype(F32) * v[j, hh // group, dd].astype(F32), axis=j), name="attention_acc")
        return te.compute((n, heads, d), lambda i, hh, dd: acc[i, hh, dd].astype(v.dtype), name="attention_values")

    return op.tensor_expr_op(compute, "attention_values", [probs, v])


def masked_scores(scores: Tensor, window: int | None) -> Tensor:
    """Causal (and, for a sliding layer, windowed) mask on float32 scores [heads, n, t].

    The n queries are the last n of the t positions, so query i sits at position t - n + i. It sees key j
    when j <= t - n + i, and on a sliding layer only when also j > t - n + i - window: the window holds
    `window` keys including the query itself (HF's create_sliding_window_causal_mask). Masked entries get
    float32's lowest value, as HF does, so a softmax gives them exactly zero weight.
    """

    def compute(s: te.Tensor):
        _, n, t = s.shape
        lowest = tir.min_value(F32)

        def element(h, i, j):
            query_pos = t - n + i
            visible = j <= query_pos
            if window is not None:
                visible = tir.all(visible, j > query_pos - window)
            return tir.if_then_else(visible, s[h, i, j], lowest)

        return te.compute(s.shape, element, name="masked_scores")

    return op.tensor_expr_op(compute, "masked_scores", [scores])


class CausalSelfAttention(nn.Module):
    """Grouped-query self-attention with a KV cache, RoPE and an optional sliding window.

    Query head h reads kv head h // (heads / kv_heads), as HF's repeat_kv does. q/k/v are one fused
    projection ([ (heads + 2*kv_heads) * head_dim, hidden ] weight). With `qk_norm_eps` (Qwen3), q and k
    get a per-head RMSNorm over head_dim before RoPE.
    """

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool,
                 o_bias: bool, rope_theta: float, window: int | None, qk_norm_eps: float | None,
                 dtype: str):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_theta, self.window = rope_theta, window
        self.qkv_proj = packed.linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias, dtype=dtype)
        self.o_proj = packed.linear(heads * head_dim, hidden, bias=o_bias, dtype=dtype)
        self.qk_norm = qk_norm_eps is not None
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [n, hidden], past_k/v [p, kv, d] -> (out [n, hidden], k [p+n, kv, d], v [p+n, kv, d])."""
        n = x.shape[0]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (n, h + 2 * kv, d))
        q, k, v = op.split(qkv, [h, h + kv], axis=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = past_k.shape[0]
        q = apply_rope(q, offset, self.rope_theta)
        k = apply_rope(k, offset, self.rope_theta)
        k = op.concat([past_k, k], dim=0)  # [t, kv, d], t = p + n
        v = op.concat([past_v, v], dim=0)

        scores = attention_scores(q, k) * (1.0 / math.sqrt(d))  # [h, n, t] float32
        probs = op.softmax(masked_scores(scores, self.window), axis=-1).astype(x.dtype)
        out = attention_values(probs, v)  # [n, h, d]
        return self.o_proj(op.reshape(out, (n, h * d))), k, v


def gathered_matmul(x: Tensor, weights: Tensor | packed.PackedWeight, expert: Tensor) -> Tensor:
    """out[i] = weights[expert[i]] @ x[i]: x [m, k], weights [experts, r, k], expert [m] int32 -> [m, r].

    Each row reads only its own expert's matrix, so the cost follows the rows routed, not the number of
    experts. Products accumulate in float32. Packed (quantized) experts: `packed.gathered_matmul`.
    """
    if isinstance(weights, packed.PackedWeight):
        return packed.gathered_matmul(x, weights, expert)

    def compute(x: te.Tensor, w: te.Tensor, expert: te.Tensor):
        m, k = x.shape
        r = w.shape[1]
        reduce = te.reduce_axis((0, k), name="k")
        acc = te.compute((m, r), lambda i, j: te.sum(
            x[i, reduce].astype(F32) * w[expert[i], j, reduce].astype(F32), axis=reduce), name="acc")
        return te.compute((m, r), lambda i, j: acc[i, j].astype(x.dtype), name="gathered_matmul")

    return op.tensor_expr_op(compute, "gathered_matmul", [x, weights, expert])


class SparseMoE(nn.Module):
    """HF Qwen3MoeSparseMoeBlock: router -> softmax (float32) -> top-k -> optional renormalisation ->
    weighted sum of the chosen experts' SwiGLU MLPs. Executed sparsely:

    the n*k (token, slot) pairs are sorted by expert, so rows of one expert are contiguous; each row is
    multiplied by its own expert's weights only (`gathered_matmul`), then weighted, put back in
    (token, slot) order and summed over the k slots. Decode (n = 1) touches k experts, not all of them.
    Weights: gate [experts, hidden] (router), experts.gate_up_proj [experts, 2*ffn, hidden] (gate rows
    first), experts.down_proj [experts, hidden, ffn] (HF's in-memory layout).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 dtype: str):
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        # The router runs in float32 whatever the dtype (a bfloat16 product flips close experts).
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=F32)
        self.experts = MoEExperts(hidden, ffn, num_experts, dtype)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [n, hidden] -> (weights [n, k] in x's dtype, experts [n, k] int32), as HF's router."""
        probs = op.softmax(self.gate(x.astype(F32)), axis=-1)  # [n, experts]
        weights, experts = op.topk(probs, self.top_k, axis=-1, ret_type="both", largest=True, dtype="int32")
        if self.norm_topk_prob:
            weights = weights / op.sum(weights, axis=-1, keepdims=True)
        return weights.astype(x.dtype), experts

    def forward(self, x: Tensor) -> Tensor:
        n, hidden = x.shape
        k = self.top_k
        weights, experts = self.route(x)

        flat_experts = op.reshape(experts, (n * k,))  # row t*k + s: token t, slot s
        order = op.argsort(flat_experts, dtype="int32")  # rows grouped by expert
        sorted_experts = gather(flat_experts, order)
        rows = gather(x, order_to_token(order, k))  # [n*k, hidden]
        out = self.experts(rows, sorted_experts)  # [n*k, hidden]
        out = out * op.unsqueeze(gather(op.reshape(weights, (n * k,)), order), -1)
        unsorted = gather(out, op.argsort(order, dtype="int32"))  # back to (token, slot) order
        return op.sum(op.reshape(unsorted, (n, k, hidden)), axis=1)


def order_to_token(order: Tensor, k: int) -> Tensor:
    """Row index t*k + s of the flattened (token, slot) pairs -> token t."""
    return op.tensor_expr_op(lambda o: te.compute(o.shape, lambda i: tir.floordiv(o[i], k), name="token"),
                             "row_token", [order])


class MoEExperts(nn.Module):
    def __init__(self, hidden: int, ffn: int, num_experts: int, dtype: str):
        self.gate_up_proj = packed.expert_weight((num_experts, 2 * ffn, hidden), dtype)
        self.down_proj = packed.expert_weight((num_experts, hidden, ffn), dtype)

    def forward(self, rows: Tensor, expert: Tensor) -> Tensor:
        """rows [m, hidden], expert [m] -> SwiGLU of each row through its expert, [m, hidden]."""
        gate, up = op.split(gathered_matmul(rows, self.gate_up_proj, expert), 2, axis=-1)
        return gathered_matmul(op.silu(gate) * up, self.down_proj, expert)

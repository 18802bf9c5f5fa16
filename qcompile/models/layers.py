"""Blocks shared by the decoder families, written in `tvm.relax.frontend.nn`.

Shapes: the decoders run one sequence (batch 1), so activations are [n, hidden] for n new tokens, and a
layer's KV cache is a pair of preallocated buffers [slots, n_kv_heads, head_dim] written in place (see
"attention over a KV cache" below). Every block matches
the Hugging Face module it is named after (the reference in tests).
"""

from __future__ import annotations

import math

from tvm import relax, te
from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from ..quant import kernels as packed

F32 = "float32"
SMALLEST_NORMAL = 1.1754943508222875e-38  # float32's smallest normal number (numpy: finfo.tiny)
EXP_SMALLEST_NORMAL = -87.33654475055310  # ln(SMALLEST_NORMAL): exp below it is subnormal or 0
OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind kOutEWiseFusable (AnnotateTIROpPattern keeps a given one)


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

    def lm_head(self, x: Tensor) -> Tensor:
        """The tied LM head: x [n, hidden] -> [n, vocab] = x . weight^T."""
        return op.matmul(x, op.permute_dims(self.weight))


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


def apply_rope(x: Tensor, offset: tir.PrimExpr | Tensor, theta: float) -> Tensor:
    """Rotary position embedding, HF's default type in rotate_half form.

    x: [n, heads, head_dim]; row i is at position offset + i, or, given a tensor of positions [n] int32
    (a batch of sequences, `models.paged`), at positions[i]. As HF computes it, in float32:
    inv_freq[k] = 1 / theta^(2k / head_dim), angle = position * inv_freq[k mod head_dim/2],
    out = x * cos(angle) + rotate_half(x) * sin(angle), rotate_half(x) = [-x2, x1].
    """

    def compute(x: te.Tensor, offset):
        _, _, dim = x.shape
        half = dim // 2
        position = (lambda i: offset[i]) if isinstance(offset, te.Tensor) else (lambda i: offset + i)

        def element(i, h, d):
            k = tir.floormod(d, half)
            exponent = (2 * k).astype(F32) / tir.const(int(dim), F32)
            inv_freq = tir.const(1.0, F32) / tir.power(tir.const(theta, F32), exponent)
            angle = position(i).astype(F32) * inv_freq
            rotated = tir.if_then_else(d < half, -x[i, h, d + half], x[i, h, d - half])
            value = x[i, h, d].astype(F32) * tir.cos(angle) + rotated.astype(F32) * tir.sin(angle)
            return value.astype(x.dtype)

        return te.compute(x.shape, element, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, offset])


# --- attention over a KV cache in preallocated buffers -------------------------------------------------
#
# A layer keeps its keys and values in two buffers of `slots` rows [slots, kv_heads, head_dim], written in
# place. The key of position q lives in slot q % slots: a full-attention layer has slots = max_seq_len (a
# ring that never wraps), a sliding layer slots = its window (a ring: it keeps only the keys a query can
# still see). Before a chunk of n new tokens at positions p .. p + n - 1, the buffers hold the
# min(p, slots) most recent positions: slot s holds the latest position < p congruent to s mod slots.
#
# A chunk attends over "key columns": first the min(p, slots) filled slots (in slot order), then the
# chunk's own n keys; masks are by position, so the order of the columns does not matter, and a ring
# never overwrites a key a query of the same chunk still needs (the chunk is written after attention).


def cached_columns(position: tir.PrimExpr, slots: int | tir.PrimExpr) -> tir.PrimExpr:
    """How many key columns come from the buffers: the filled slots, min(position, slots)."""
    return tir.min(position, slots)


def key_position(j: tir.PrimExpr, position: tir.PrimExpr, slots: int | tir.PrimExpr) -> tir.PrimExpr:
    """The sequence position of key column j before a chunk starting at `position`: a filled slot j holds
    the latest position < `position` congruent to j (mod slots); column m + r is the chunk's row r."""
    m = cached_columns(position, slots)
    return tir.if_then_else(j < m, j + slots * tir.floordiv(position - 1 - j, slots), position + j - m)


def attention_scores(q: Tensor, k_cache: Tensor | None, k_new: Tensor, position: tir.PrimExpr | None) -> Tensor:
    """q [n, h, d], key columns (k_cache [slots, kv, d] filled slots, then k_new [n, kv, d]) -> float32 q.k
    [h, n, min(position, slots) + n]. Query head hh reads kv head hh // (h / kv), as HF's repeat_kv does,
    straight from the buffers: no repeated, transposed or concatenated copy of the keys. Without a cache
    (k_cache None: an encoder's attention within its tokens) the columns are k_new's alone.

    Two products, one per source (each reads its rows contiguously: one loop over `d` per score, which
    the CPU rule vectorises), then the columns side by side."""

    def compute(q: te.Tensor, k_new: te.Tensor, *cache):  # cache: (k_cache, position), or none
        n, heads, d = q.shape
        group = heads // k_new.shape[1]

        def product(keys: te.Tensor, columns: tir.PrimExpr, name: str) -> te.Tensor:
            r = te.reduce_axis((0, d), name="r")
            return te.compute((heads, n, columns), lambda hh, i, j: te.sum(
                q[i, hh, r].astype(F32) * keys[j, hh // group, r].astype(F32), axis=r), name=name)

        if not cache:
            return product(k_new, k_new.shape[0], "attention_scores")
        k_cache, position = cache
        m = cached_columns(position, k_cache.shape[0])
        cached = product(k_cache, m, "attention_scores")
        chunk = product(k_new, n, "attention_scores_chunk")
        return te.compute((heads, n, m + n), lambda hh, i, j: tir.if_then_else(
            j < m, cached[hh, i, j], chunk[hh, i, j - m]), name="attention_columns")

    # Declared "output-elementwise fusable" (TVM's pattern for a matmul-like kernel), so the scale and
    # the mask fuse into this kernel; TVM's own analysis cannot tell with two products.
    cache = [] if k_cache is None else [k_cache, position]
    return op.tensor_expr_op(compute, "attention_scores", [q, k_new, *cache],
                             attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})


def attention_values(probs: Tensor, v_cache: Tensor | None, v_new: Tensor, position: tir.PrimExpr | None) -> Tensor:
    """probs [h, n, columns] over the key columns, values (v_cache [slots, kv, d] filled slots, then v_new
    [n, kv, d]) -> [n, h, d] in the values' dtype (accumulated in float32); query head hh reads kv head
    hh // (h / kv), straight from the buffers. One weighted sum per source, then their sum. Without a
    cache (v_cache None: an encoder) the values are v_new's rows alone."""

    def compute(p: te.Tensor, v_new: te.Tensor, *cache):  # cache: (v_cache, position), or none
        heads, n, _ = p.shape
        kv_heads, d = v_new.shape[1], v_new.shape[2]
        group = heads // kv_heads

        def weight(hh, i, column):
            # A probability below float32's smallest normal number (a subnormal: a far, low-scoring key)
            # counts as 0: its share of the sum is below 1e-38 of it, and every multiplication by a
            # subnormal costs a microcode assist on x86 (at 2048 cached tokens, 7x this kernel's time).
            w = p[hh, i, column].astype(F32)
            return tir.if_then_else(w < tir.const(SMALLEST_NORMAL, F32), tir.const(0.0, F32), w)

        def weighted_sum(values: te.Tensor, rows: tir.PrimExpr, first_column: tir.PrimExpr, name: str):
            j = te.reduce_axis((0, rows), name="j")
            return te.compute((n, heads, d), lambda i, hh, dd: te.sum(
                weight(hh, i, first_column + j) * values[j, hh // group, dd].astype(F32), axis=j), name=name)

        if not cache:
            acc = weighted_sum(v_new, v_new.shape[0], 0, "attention_acc")
            return te.compute((n, heads, d), lambda i, hh, dd: acc[i, hh, dd].astype(v_new.dtype),
                              name="attention_values")
        v_cache, position = cache
        m = cached_columns(position, v_cache.shape[0])
        cached = weighted_sum(v_cache, m, 0, "attention_acc")
        chunk = weighted_sum(v_new, n, m, "attention_acc_chunk")
        # With no filled slot (a sequence's first chunk) the cached sum is over no rows; TVM's lowering may
        # then skip its initialisation (it runs inside the empty loop), so it is not read at all.
        return te.compute((n, heads, d), lambda i, hh, dd: tir.if_then_else(
            m > 0, cached[i, hh, dd] + chunk[i, hh, dd], chunk[i, hh, dd]).astype(v_cache.dtype),
            name="attention_values")

    cache = [] if v_cache is None else [v_cache, position]
    return op.tensor_expr_op(compute, "attention_values", [probs, v_new, *cache])


def masked_scores(scores: Tensor, position: tir.PrimExpr, slots: int, window: int | None) -> Tensor:
    """Causal (and, for a sliding layer, windowed) mask on float32 scores [heads, n, columns] over the key
    columns of a chunk at `position` (filled slots of a `slots`-row buffer, then the chunk).

    Query i sits at position + i. It sees the key at position j when j <= position + i, and on a sliding
    layer only when also j > position + i - window: the window holds `window` keys including the query
    itself (HF's create_sliding_window_causal_mask). Masked entries get float32's lowest value, as HF
    does, so a softmax gives them exactly zero weight.
    """

    def compute(s: te.Tensor, position: tir.PrimExpr):
        lowest = tir.min_value(F32)

        def element(h, i, j):
            query_pos, key_pos = position + i, key_position(j, position, slots)
            visible = key_pos <= query_pos
            if window is not None:
                visible = tir.all(visible, key_pos > query_pos - window)
            return tir.if_then_else(visible, s[h, i, j], lowest)

        return te.compute(s.shape, element, name="masked_scores")

    return op.tensor_expr_op(compute, "masked_scores", [scores, position])


def attention_probs(scores: Tensor) -> Tensor:
    """Softmax over the key columns of float32 scores [heads, n, columns], as HF computes it (exp(s - max)
    / sum, float32), except that an exp below float32's smallest normal number counts as 0 (its share
    is below 1e-38; a subnormal result costs the exp and the division a slow path each)."""

    def compute(s: te.Tensor):
        heads, n, columns = s.shape
        k = te.reduce_axis((0, columns), name="k")
        top = te.compute((heads, n), lambda h, i: te.max(s[h, i, k], axis=k), name="attention_probs_max")

        def exp(h, i, j):
            x = s[h, i, j] - top[h, i]
            return tir.if_then_else(x < tir.const(EXP_SMALLEST_NORMAL, F32), tir.const(0.0, F32), tir.exp(x))

        e = te.compute(s.shape, exp, name="attention_probs_exp")
        k = te.reduce_axis((0, columns), name="k")
        total = te.compute((heads, n), lambda h, i: te.sum(e[h, i, k], axis=k), name="attention_probs_sum")
        return te.compute(s.shape, lambda h, i, j: e[h, i, j] / total[h, i], name="attention_probs")

    return op.tensor_expr_op(compute, "attention_probs", [scores])


def write_chunk(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
                position: tir.PrimExpr) -> tuple[Tensor, Tensor]:
    """Write the chunk's keys and values (k_new, v_new [n, kv, d], positions position ..) into their slots
    of the buffers [slots, kv, d], in place: position q into slot q % slots. Only the chunk's last
    min(n, slots) rows are written (on a ring, earlier ones would be overwritten within the chunk), so
    every slot is written at most once, whatever the threads' order.
    Returns the buffers (the same memory)."""
    slots, kv_heads, head_dim = (int(x) for x in k_cache.shape)
    dtype = k_cache.dtype

    @T.prim_func(private=True, s_tir=True)
    def kv_write(var_k: T.handle, var_v: T.handle, var_k_new: T.handle, var_v_new: T.handle,
                 position: T.int64):
        n = T.int64()
        k = T.match_buffer(var_k, (slots, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (slots, kv_heads, head_dim), dtype)
        k_new = T.match_buffer(var_k_new, (n, kv_heads, head_dim), dtype)
        v_new = T.match_buffer(var_v_new, (n, kv_heads, head_dim), dtype)
        for row, head, e in T.grid(n, kv_heads, head_dim):
            with T.sblock("kv_write"):
                r, h, x = T.axis.remap("SSS", [row, head, e])
                if r + slots >= n:  # the chunk's last `slots` rows: each slot is written once
                    k[T.floormod(position + r, slots), h, x] = k_new[r, h, x]
                    v[T.floormod(position + r, slots), h, x] = v_new[r, h, x]

    return op.tensor_ir_inplace_op(kv_write, "kv_write", [k_cache, v_cache, k_new, v_new, position],
                                   inplace_indices=[0, 1], out=[k_cache, v_cache])


class CausalSelfAttention(nn.Module):
    """Grouped-query self-attention over a KV cache in place, with RoPE and an optional sliding window.

    Query head h reads kv head h // (heads / kv_heads), as HF's repeat_kv does. q/k/v are one fused
    projection ([ (heads + 2*kv_heads) * head_dim, hidden ] weight). With `qk_norm_eps` (Qwen3), q and k
    get a per-head RMSNorm over head_dim before RoPE. The KV buffers' row count (slots) comes from their
    shape: max_seq_len on a full layer, the window on a sliding one (see above).
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

    def project(self, x: Tensor, position: tir.PrimExpr | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [n, hidden] -> q [n, h, d], k and v [n, kv, d]: the fused projection, the Qwen3 q/k norms, and
        RoPE at positions position .. (or at positions[i] per row, `apply_rope`)."""
        n = x.shape[0]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (n, h + 2 * kv, d))
        q, k, v = op.split(qkv, [h, h + kv], axis=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, position, self.rope_theta), apply_rope(k, position, self.rope_theta), v

    def forward(self, x: Tensor, position: tir.PrimExpr, k_cache: Tensor,
                v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [n, hidden] at positions position .., k_cache/v_cache [slots, kv, d] -> (out [n, hidden], the
        buffers with the chunk written in)."""
        n, h, d = x.shape[0], self.heads, self.head_dim
        q, k, v = self.project(x, position)
        slots = int(k_cache.shape[0])
        scores = attention_scores(q, k_cache, k, position) * (1.0 / math.sqrt(d))  # [h, n, columns] float32
        probs = attention_probs(masked_scores(scores, position, slots, self.window)).astype(x.dtype)
        out = attention_values(probs, v_cache, v, position)  # [n, h, d]
        # Written after attention has read the buffers (a ring's chunk may overwrite keys it needs).
        k_cache, v_cache = write_chunk(k_cache, v_cache, k, v, position)
        return self.o_proj(op.reshape(out, (n, h * d))), k_cache, v_cache


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
            x[i, reduce].astype(F32) * w[expert[i], j, reduce].astype(F32), axis=reduce), name="gathered_acc")
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

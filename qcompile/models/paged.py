"""Attention over a paged KV cache, for a batch of sequences in one call (`CausalLM.batch_step`).

A step runs n tokens of b sequences at once, concatenated: token i belongs to sequence token_seq[i]
(a row of the page tables, 0 .. b-1) and sits at position positions[i] of it. A decode feeds 1 token of a
sequence, a chunked prefill several consecutive ones; the rows of the projections are all n tokens.

The cache of one layer is a pool of pages [pages, PAGE_TOKENS, kv_heads, head_dim] (K and V each). A
sequence's position q lives in page table[s, q // PAGE_TOKENS], row q % PAGE_TOKENS; the runtime hands out
pages as a sequence grows and takes them back when it leaves (`run.batch`), so sequences join, grow and
leave without moving anyone else's keys. Full-attention layers share one page table; sliding layers have
their own pools and table, in which the runtime frees the pages that slid out of every query's window.

The step first writes every token's key and value into its page, then attends over the pages: a query at
position p sees its own sequence's keys at positions <= p (and, sliding, > p - window), all of them in
the pages by then (written this step or before). Every query reads the same key columns: positions
start .. columns - 1 (columns: the step's highest position + 1; start: 0 on a full layer, the window's
start for the step's lowest position on a sliding one); a column holding another sequence's key, an
unwritten one or one past the query is masked by position, as HF masks, so it contributes exactly 0.
"""

from __future__ import annotations

import dataclasses
import math

from tvm import te
from tvm import tirx as tir
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from .layers import F32, SMALLEST_NORMAL, CausalSelfAttention, attention_probs

PAGE_TOKENS = 16  # tokens per page (vLLM's default block size)


def window_start(first_position: tir.PrimExpr, window: int | None) -> tir.PrimExpr:
    """The first key column a layer reads: 0 on a full layer; on a sliding one the oldest position the
    step's lowest query (at `first_position`) still sees."""
    return tir.const(0, "int64") if window is None else tir.max(first_position - (window - 1), 0)


def _key(pool: te.Tensor, table: te.Tensor, seq: tir.PrimExpr, position: tir.PrimExpr, head, e):
    """The pool's entry for sequence row `seq`'s key at `position` (head, element e)."""
    page = table[seq, tir.floordiv(position, PAGE_TOKENS)]
    return pool[page, tir.floormod(position, PAGE_TOKENS), head, e]


def paged_scores(q: Tensor, k_pool: Tensor, token_seq: Tensor, table: Tensor, start: tir.PrimExpr,
                 columns: tir.PrimExpr) -> Tensor:
    """q [n, h, d] . keys of each query's own sequence at positions start .. columns - 1 -> float32
    [h, n, columns - start]. Query head hh reads kv head hh // (h / kv), as HF's repeat_kv does. Named and
    shaped as `layers.attention_scores` (loops head, query, column, d), so the CPU `attention` rule
    schedules it the same way."""

    def compute(q: te.Tensor, pool: te.Tensor, token_seq: te.Tensor, table: te.Tensor, start, columns):
        n, heads, d = q.shape
        group = heads // pool.shape[2]
        r = te.reduce_axis((0, d), name="r")
        return te.compute((heads, n, columns - start), lambda hh, i, j: te.sum(
            q[i, hh, r].astype(F32) * _key(pool, table, token_seq[i], start + j, hh // group, r).astype(F32),
            axis=r), name="attention_scores")

    return op.tensor_expr_op(compute, "attention_scores", [q, k_pool, token_seq, table, start, columns])


def paged_mask(scores: Tensor, positions: Tensor, start: tir.PrimExpr, window: int | None) -> Tensor:
    """Causal (and sliding-window) mask on float32 scores [h, n, columns - start]: query i at positions[i]
    sees column j (position start + j) when start + j <= positions[i], and on a sliding layer also
    start + j > positions[i] - window; masked entries get float32's lowest value, as HF does."""

    def compute(s: te.Tensor, positions: te.Tensor, start):
        def element(h, i, j):
            query, key = positions[i].astype("int64"), start + j
            visible = key <= query
            if window is not None:
                visible = tir.all(visible, key > query - window)
            return tir.if_then_else(visible, s[h, i, j], tir.min_value(F32))

        return te.compute(s.shape, element, name="masked_scores")

    return op.tensor_expr_op(compute, "masked_scores", [scores, positions, start])


def paged_values(probs: Tensor, v_pool: Tensor, token_seq: Tensor, table: Tensor, start: tir.PrimExpr) -> Tensor:
    """probs [h, n, columns - start] x values of each query's own sequence at positions start .. ->
    [n, h, d] in the pool's dtype (accumulated in float32). As `layers.attention_values`: a probability
    below float32's smallest normal number counts as 0. Masked columns have probability exactly 0, and
    the pools hold finite numbers only (zeroed when allocated), so they add exactly 0."""

    def compute(p: te.Tensor, pool: te.Tensor, token_seq: te.Tensor, table: te.Tensor, start):
        heads, n, columns = p.shape
        d = pool.shape[3]
        group = heads // pool.shape[2]
        j = te.reduce_axis((0, columns), name="j")

        def weight(hh, i, column):
            w = p[hh, i, column].astype(F32)
            return tir.if_then_else(w < tir.const(SMALLEST_NORMAL, F32), tir.const(0.0, F32), w)

        acc = te.compute((n, heads, d), lambda i, hh, dd: te.sum(
            weight(hh, i, j) * _key(pool, table, token_seq[i], start + j, hh // group, dd).astype(F32),
            axis=j), name="attention_acc")
        return te.compute((n, heads, d), lambda i, hh, dd: acc[i, hh, dd].astype(pool.dtype),
                          name="attention_values")

    return op.tensor_expr_op(compute, "attention_values", [probs, v_pool, token_seq, table, start])


def paged_write(k_pool: Tensor, v_pool: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor,
                token_seq: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Write each token's key and value (k_new, v_new [n, kv, d]) into its page of the pools
    [pages, PAGE_TOKENS, kv, d], in place. Every token has its own (sequence, position), so every entry is
    written at most once whatever the threads' order. Returns the pools (the same memory)."""
    page_tokens, kv_heads, head_dim = (int(x) for x in k_pool.shape[1:])  # the page count is symbolic
    dtype = k_pool.dtype

    @T.prim_func(private=True, s_tir=True)
    def paged_kv_write(var_k: T.handle, var_v: T.handle, var_k_new: T.handle, var_v_new: T.handle,
                       var_positions: T.handle, var_token_seq: T.handle, var_table: T.handle):
        pages, n, rows, row_pages = T.int64(), T.int64(), T.int64(), T.int64()
        k = T.match_buffer(var_k, (pages, page_tokens, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (pages, page_tokens, kv_heads, head_dim), dtype)
        k_new = T.match_buffer(var_k_new, (n, kv_heads, head_dim), dtype)
        v_new = T.match_buffer(var_v_new, (n, kv_heads, head_dim), dtype)
        positions = T.match_buffer(var_positions, (n,), "int32")
        token_seq = T.match_buffer(var_token_seq, (n,), "int32")
        table = T.match_buffer(var_table, (rows, row_pages), "int32")
        for token, head, e in T.grid(n, kv_heads, head_dim):
            with T.sblock("paged_kv_write"):
                t, h, x = T.axis.remap("SSS", [token, head, e])
                k[table[token_seq[t], positions[t] // page_tokens], positions[t] % page_tokens, h, x] = \
                    k_new[t, h, x]
                v[table[token_seq[t], positions[t] // page_tokens], positions[t] % page_tokens, h, x] = \
                    v_new[t, h, x]

    return op.tensor_ir_inplace_op(paged_kv_write, "paged_kv_write",
                                   [k_pool, v_pool, k_new, v_new, positions, token_seq, table],
                                   inplace_indices=[0, 1], out=[k_pool, v_pool])


@dataclasses.dataclass
class Step:
    """What a batch step tells every layer: per token its position and page-table row ([n] int32), the
    page tables ([b, pages per sequence] int32: full layers', sliding layers'), the lowest position in
    the step and the key columns (highest position + 1)."""

    positions: Tensor
    token_seq: Tensor
    page_table: Tensor
    window_table: Tensor
    first_position: tir.PrimExpr
    columns: tir.PrimExpr


def self_attention(attn: CausalSelfAttention, x: Tensor, step: Step, k_pool: Tensor,
                   v_pool: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`layers.CausalSelfAttention` over paged pools: x [n, hidden] (the step's tokens) -> (out [n, hidden],
    the pools with the step's keys and values written in). The keys are written first (see above)."""
    n, h, d = x.shape[0], attn.heads, attn.head_dim
    q, k, v = attn.project(x, step.positions)
    table = step.page_table if attn.window is None else step.window_table
    k_pool, v_pool = paged_write(k_pool, v_pool, k, v, step.positions, step.token_seq, table)
    start = window_start(step.first_position, attn.window)
    scores = paged_scores(q, k_pool, step.token_seq, table, start, step.columns) * (1.0 / math.sqrt(d))
    probs = attention_probs(paged_mask(scores, step.positions, start, attn.window)).astype(x.dtype)
    out = paged_values(probs, v_pool, step.token_seq, table, start)  # [n, h, d]
    return attn.o_proj(op.reshape(out, (n, h * d))), k_pool, v_pool

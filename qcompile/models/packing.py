"""Packed weights for CPU builds: linear layers and embeddings rewritten to read `rows16` weights.

`pack_weights(module)` walks a built family module and replaces each `nn.Linear` and `Embedding`
whose output rows 16 divides by a module whose weight parameter is stored packed ([N / 16, K, 16],
`run.layouts`), read by one `rows16_matmul` kernel (scheduled by `build.cpu_rules.packed`). The family
code stays layout-free; the builder applies this to float32 CPU builds, the loader packs each weight
as it reads it (the manifest records every parameter's layout), and the numbers are unchanged: each
output is the same sum over K in the same order.
"""

from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..run.layouts import PACK_LANES, ROWS16
from .layers import Embedding, gather

LAYOUT_ATTR = "layout"  # nn.Parameter.attrs key the builder copies into the manifest


def rows16_matmul(x: Tensor, packed: Tensor) -> Tensor:
    """x [..., K] . W^T with W [N, K] stored packed as [N / 16, K, 16] -> [..., N] in x's dtype."""

    def compute(x: te.Tensor, w: te.Tensor):
        *lead, k = x.shape
        blocks, _, lanes = w.shape
        r = te.reduce_axis((0, k), name="k")
        return te.compute((*lead, blocks * lanes), lambda *i: te.sum(
            x[(*i[:-1], r)] * w[i[-1] // lanes, r, i[-1] % lanes], axis=r), name="rows16_matmul")

    return op.tensor_expr_op(compute, "rows16_matmul", [x, packed])


def _packed_parameter(rows: int, cols: int, dtype: str) -> nn.Parameter:
    weight = nn.Parameter((rows // PACK_LANES, cols, PACK_LANES), dtype)
    weight.attrs[LAYOUT_ATTR] = ROWS16
    return weight


class Rows16Linear(nn.Module):
    """nn.Linear (y = x W^T + b) with W stored `rows16`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str):
        self.weight = _packed_parameter(out_features, in_features, dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = rows16_matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


class Rows16Embedding(nn.Module):
    """`layers.Embedding` with its [vocab, hidden] weight stored `rows16`: a token's row is gathered
    from its block (16 tokens interleaved), and the tied LM head reads it as a packed linear."""

    def __init__(self, vocab: int, hidden: int, dtype: str):
        self.weight = _packed_parameter(vocab, hidden, dtype)

    def forward(self, ids: Tensor) -> Tensor:
        blocks = gather(self.weight, _block_of(ids))  # [n, hidden, 16]: each token's block
        return _lane_of(blocks, ids)

    def lm_head(self, x: Tensor) -> Tensor:
        return rows16_matmul(x, self.weight)


def _block_of(ids: Tensor) -> Tensor:
    return op.tensor_expr_op(lambda t: te.compute(t.shape, lambda i: t[i] // PACK_LANES, name="block"),
                             "embedding_block", [ids])


def _lane_of(blocks: Tensor, ids: Tensor) -> Tensor:
    """blocks [n, hidden, 16] (each token's block), ids [n] -> rows [n, hidden] (each token's lane)."""
    return op.tensor_expr_op(lambda b, t: te.compute(
        b.shape[:2], lambda i, h: b[i, h, t[i] % PACK_LANES], name="embedding_lane"), "embedding_lane",
        [blocks, ids])


def pack_weights(module: nn.Module) -> nn.Module:
    """Replace, in place, every packable nn.Linear / Embedding under `module` (rows divisible by 16,
    float32) by its packed form; returns `module`."""
    for name, child in list(vars(module).items()):
        replacement = _packed(child)
        if replacement is not None:
            setattr(module, name, replacement)
        elif isinstance(child, nn.ModuleList):
            for i, item in enumerate(child):
                packed = _packed(item)
                if packed is not None:
                    child[i] = packed
                else:
                    pack_weights(item)
        elif isinstance(child, nn.Module):
            pack_weights(child)
    return module


def _packed(child) -> nn.Module | None:
    if isinstance(child, nn.Linear) and child.weight.dtype == "float32" and child.out_features % PACK_LANES == 0:
        return Rows16Linear(child.in_features, child.out_features, child.bias is not None, "float32")
    if isinstance(child, Embedding) and child.weight.dtype == "float32" and child.weight.shape[0] % PACK_LANES == 0:
        vocab, hidden = child.weight.shape
        return Rows16Embedding(vocab, hidden, "float32")
    return None

"""Quantized weights in the Relax graph: modules that hold a weight as its scheme stores it, and the
kernels that read it, dequantizing while reading (never a dequantized copy of a weight in memory).

A weight W [..., N, K] (schemes.py) is held as library parameters `<prefix>.qweight` + `<prefix>.scales`
(q8, q4) or `<prefix>.weight` in bfloat16/float16 (bf16, f16). Each product that consumes it is ONE kernel
whose weight element is `(q - offset) * scale` in float32 (exactly `schemes.dequantize`), computed where
the product reads it (on GPU, q8/16-bit: a dequantize stage dlight inlines; see `quantized`):

  linear            y[i, n] = sum_k x[i, k] * W[n, k]          (+ bias; decode GEMV, prefill GEMM)
  embedding         y[i, k] = W[clip(ids[i]), k]               (the gathered rows, dequantized)
  tied LM head      the linear product over the embedding's stored tensors
  gathered_matmul   y[i, n] = sum_k x[i, k] * W[expert[i], n, k] (MoE experts [E, r, K])

The reduction walks K as the layout stores it (`reduce_axes`): (group, element) for q8, (group, nibble,
byte) for q4, so a group's scale is indexed by an axis (no division per element) and the innermost axis
reads consecutive bytes (the CPU rules split it into vector lanes). Products accumulate in float32;
activations and results are in --dtype.

Families build their modules through `linear`, `embedding` and `expert_weight`: under `quantized(q)`
(entered by the builder while it constructs the model) they return the packed modules below, otherwise
the float ones, unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from tvm import te
from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .choice import Quantization

F32 = "float32"


def reduce_axes(q: Quantization, depth: int) -> list[te.IterVar]:
    """The reduction over K as the layout walks it, innermost axis contiguous in memory: (k,) for 16-bit
    weights; (group, element) for q8; (group, nibble, byte) for q4, so the scale index is a group axis
    (one scale per group, broadcast) and a q4 byte is read at (group, byte) for both its nibbles."""
    s, g = q.scheme, q.group_size
    if not s.grouped:
        return [te.reduce_axis((0, depth), name="k")]
    group = te.reduce_axis((0, depth // g), name="group")
    if s.name == "q8":
        return [group, te.reduce_axis((0, g), name="element")]
    return [group, te.reduce_axis((0, 2), name="nibble"), te.reduce_axis((0, g // 2), name="byte")]


def k_index(q: Quantization, axes: list) -> tir.PrimExpr:
    """The input feature k that `reduce_axes` point at."""
    if len(axes) == 1:
        return axes[0]
    if len(axes) == 2:
        return axes[0] * q.group_size + axes[1]
    return axes[0] * q.group_size + axes[1] * (q.group_size // 2) + axes[2]


def element(q: Quantization, stored: list[te.Tensor], index: tuple, axes: list) -> tir.PrimExpr:
    """W[*index, k] as float32 (exactly `schemes.dequantize`) at the position `axes` name (as
    `reduce_axes` splits K), read from the stored tensors [qweight, scales] or [weight]."""
    s, g = q.scheme, q.group_size
    if not s.grouped:
        return stored[0][(*index, axes[0])].astype(F32)
    qweight, scales = stored
    scale = scales[(*index, axes[0])].astype(F32)
    if s.name == "q8":
        return qweight[(*index, k_index(q, axes))].astype(F32) * scale
    group, nibble, byte = axes  # q4: byte j of a group holds element j (low nibble) and j + g/2 (high)
    value = qweight[(*index, group * (g // 2) + byte)].astype("int32")
    # A select, not a shift by 4 * nibble: the loop variables are int64, and an int64 shift count would
    # widen every lane to 64 bits.
    nibble_value = tir.Select(nibble == 0, value & 15, tir.shift_right(value, 4))
    return (nibble_value - 8).astype(F32) * scale


def element_at_k(q: Quantization, stored: list[te.Tensor], index: tuple, k: tir.PrimExpr) -> tir.PrimExpr:
    """`element` at input feature k (a spatial index: the embedding gather)."""
    s, g = q.scheme, q.group_size
    if not s.grouped:
        return element(q, stored, index, [k])
    if s.name == "q8":
        return element(q, stored, index, [tir.floordiv(k, g), tir.floormod(k, g)])
    within = tir.floormod(k, g)
    return element(q, stored, index, [tir.floordiv(k, g), tir.floordiv(within, g // 2), tir.floormod(within, g // 2)])


_ACTIVE: contextvars.ContextVar[tuple[Quantization, bool] | None] = contextvars.ContextVar(
    "quantization", default=None)


@contextlib.contextmanager
def quantized(quantization: Quantization | None, *, dequantize_stage: bool = False) -> Iterator[None]:
    """Modules built inside hold their weights as `quantization` stores them (None: float).

    `dequantize_stage` (GPU builds): a linear product is written as a dequantize stage W[n, k] feeding a
    one-axis reduction, the shape dlight's Matmul rule recognises; it inlines the stage into the tile
    loads, so the dequantized weight never exists as a whole. The CPU rules want the fused form, and so
    does q4 on GPU (TVM 0.27's Matmul rule emits CUDA that nvcc rejects for its nibble index; the fused
    form gets dlight's GeneralReduction)."""
    token = _ACTIVE.set(None if quantization is None else (quantization, dequantize_stage))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class PackedWeight(nn.Module):
    """One weight [..., N, K] as its scheme stores it: parameters `qweight`, `scales` (q8, q4) or
    `weight` (bf16, f16)."""

    def __init__(self, shape: tuple[int, ...], quantization: Quantization, dequantize_stage: bool = False):
        self.quantization, self.shape, self.dequantize_stage = quantization, tuple(shape), dequantize_stage
        for suffix, (stored_shape, dtype) in quantization.stored_shapes(self.shape).items():
            setattr(self, suffix, nn.Parameter(stored_shape, dtype))

    def stored(self) -> list[Tensor]:
        return [getattr(self, suffix) for suffix in self.quantization.stored_shapes(self.shape)]


class PackedLinear(PackedWeight):
    """nn.Linear over a packed weight [out, in]: x [..., in] -> [..., out] in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, quantization: Quantization,
                 dequantize_stage: bool = False):
        super().__init__((out_features, in_features), quantization, dequantize_stage)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return matmul(x, self, self.bias)


class PackedEmbedding(PackedWeight):
    """Token embedding over a packed weight [vocab, hidden]: ids [n] -> [n, hidden] in `dtype`."""

    def __init__(self, vocab: int, hidden: int, dtype: str, quantization: Quantization,
                 dequantize_stage: bool = False):
        super().__init__((vocab, hidden), quantization, dequantize_stage)  # the stage: a tied LM head's
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        q, dtype = self.quantization, self.dtype

        def compute(ids: te.Tensor, *stored: te.Tensor):
            vocab, hidden = self.shape
            row = lambda i: tir.max(tir.min(ids[i], vocab - 1), 0)  # noqa: E731 (in range; clipped as layers.gather)
            return te.compute((ids.shape[0], hidden), lambda i, k: element_at_k(q, list(stored), (row(i),), k)
                              .astype(dtype), name="dequantize_take")

        return op.tensor_expr_op(compute, "dequantize_take", [ids, *self.stored()])

    def lm_head(self, x: Tensor) -> Tensor:
        """The tied LM head: x [n, hidden] -> [n, vocab], this weight dequantized as it is read."""
        return matmul(x, self)


def matmul(x: Tensor, weight: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] . W[N, K]^T (+ bias) -> [..., N] in x's dtype, W dequantized as it is read."""
    *lead, k = x.shape
    q = weight.quantization
    rows = op.reshape(x, (-1, k)) if len(lead) != 1 else x

    def compute(x: te.Tensor, *tensors: te.Tensor):
        stored, b = (tensors[:-1], tensors[-1]) if bias is not None else (tensors, None)
        m, depth = x.shape
        n = weight.shape[0]
        if weight.dequantize_stage and q.scheme.name != "q4":  # q4's nibble index: see `quantized`
            w = te.compute((n, depth), lambda j, k: element_at_k(q, list(stored), (j,), k), name="dequantize")
            r = te.reduce_axis((0, depth), name="k")
            acc = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype(F32) * w[j, r], axis=r),
                             name="dequantize_matmul")
        else:
            r = reduce_axes(q, int(depth))
            acc = te.compute((m, n), lambda i, j: te.sum(
                x[i, k_index(q, r)].astype(F32) * element(q, list(stored), (j,), r), axis=r),
                name="dequantize_matmul")
        if b is None:
            return te.compute((m, n), lambda i, j: acc[i, j].astype(x.dtype), name="dequantize_matmul_out")
        return te.compute((m, n), lambda i, j: (acc[i, j] + b[j].astype(F32)).astype(x.dtype),
                          name="dequantize_matmul_out")

    args = [rows, *weight.stored(), *([bias] if bias is not None else [])]
    y = op.tensor_expr_op(compute, "dequantize_matmul", args)
    return op.reshape(y, (*lead, weight.shape[0])) if len(lead) != 1 else y


def gathered_matmul(x: Tensor, weight: PackedWeight, expert: Tensor) -> Tensor:
    """out[i] = W[expert[i]] @ x[i]: x [m, k], packed W [experts, r, k], expert [m] int32 -> [m, r]
    (layers.gathered_matmul over packed experts; float32 accumulation)."""
    q = weight.quantization

    def compute(x: te.Tensor, expert: te.Tensor, *stored: te.Tensor):
        m, k = x.shape
        r = weight.shape[1]
        reduce = reduce_axes(q, int(k))
        acc = te.compute((m, r), lambda i, j: te.sum(
            x[i, k_index(q, reduce)].astype(F32) * element(q, list(stored), (expert[i], j), reduce),
            axis=reduce), name="acc")
        return te.compute((m, r), lambda i, j: acc[i, j].astype(x.dtype), name="gathered_matmul")

    return op.tensor_expr_op(compute, "gathered_matmul", [x, expert, *weight.stored()])


# --- the hooks the families build through --------------------------------------------------------------

def active() -> Quantization | None:
    found = _ACTIVE.get()
    return None if found is None else found[0]


def linear(in_features: int, out_features: int, *, bias: bool, dtype: str) -> nn.Module:
    """nn.Linear, or its packed form under `quantized`."""
    found = _ACTIVE.get()
    if found is None:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return PackedLinear(in_features, out_features, bias, dtype, *found)


def embedding(vocab: int, hidden: int, dtype: str) -> nn.Module:
    """layers.Embedding, or its packed form under `quantized`."""
    from ..models.layers import Embedding  # noqa: PLC0415

    found = _ACTIVE.get()
    return Embedding(vocab, hidden, dtype) if found is None else PackedEmbedding(vocab, hidden, dtype, *found)


def expert_weight(shape: tuple[int, ...], dtype: str) -> nn.Parameter | PackedWeight:
    """Stacked expert matrices [experts, r, K]: a float parameter, or packed under `quantized`."""
    q = active()
    return nn.Parameter(shape, dtype) if q is None else PackedWeight(shape, q)


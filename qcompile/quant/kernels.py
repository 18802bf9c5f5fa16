"""Quantized weights in the Relax graph: modules that hold a weight as its scheme stores it, and the
kernels that read it, dequantizing while reading (never a dequantized copy of a weight in memory).

A weight W [..., N, K] (schemes.py) is held as library parameters `<prefix>.qweight` + `<prefix>.scales`
(q8, q4) or `<prefix>.weight` in bfloat16/float16 (bf16, f16). Each product that consumes it is ONE TE
compute whose weight element is `(q - offset) * scale` in float32 (exactly `schemes.dequantize`):

  linear            y[i, n] = sum_k x[i, k] * W[n, k]          (+ bias; decode GEMV, prefill GEMM)
  embedding         y[i, k] = W[clip(ids[i]), k]               (the gathered rows, dequantized)
  tied LM head      the linear product over the embedding's stored tensors
  gathered_matmul   y[i, n] = sum_k x[i, k] * W[expert[i], n, k] (MoE experts [E, r, K])

The reduction is one axis k; a q4 element's byte and nibble come from index arithmetic on k (byte
(k // g) * g/2 + k % (g/2), high nibble when k % g >= g/2), which TVM's simplifier resolves once the CPU
rule splits k into lanes inside a half-group, so LLVM sees contiguous byte loads. Products accumulate in
float32; activations and results are in --dtype.

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


def element(q: Quantization, stored: list[te.Tensor], index: tuple, k: tir.PrimExpr) -> tir.PrimExpr:
    """W[*index, k] as float32 (exactly `schemes.dequantize`), read from the stored tensors
    [qweight, scales] or [weight]."""
    s, g = q.scheme, q.group_size
    if not s.grouped:
        return stored[0][(*index, k)].astype(F32)
    qweight, scales = stored
    scale = scales[(*index, tir.floordiv(k, g))].astype(F32)
    if s.name == "q8":
        return qweight[(*index, k)].astype(F32) * scale
    half = g // 2  # q4: byte j of a group holds element j (low nibble) and j + g/2 (high nibble)
    byte = qweight[(*index, tir.floordiv(k, g) * half + tir.floormod(k, half))].astype("int32")
    shift = tir.floordiv(tir.floormod(k, g), half) * 4
    return ((tir.shift_right(byte, shift) & 15) - 8).astype(F32) * scale


_ACTIVE: contextvars.ContextVar[Quantization | None] = contextvars.ContextVar("quantization", default=None)


@contextlib.contextmanager
def quantized(quantization: Quantization | None) -> Iterator[None]:
    """Modules built inside hold their weights as `quantization` stores them (None: float)."""
    token = _ACTIVE.set(quantization)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class PackedWeight(nn.Module):
    """One weight [..., N, K] as its scheme stores it: parameters `qweight`, `scales` (q8, q4) or
    `weight` (bf16, f16)."""

    def __init__(self, shape: tuple[int, ...], quantization: Quantization):
        self.quantization, self.shape = quantization, tuple(shape)
        for suffix, (stored_shape, dtype) in quantization.stored_shapes(self.shape).items():
            setattr(self, suffix, nn.Parameter(stored_shape, dtype))

    def stored(self) -> list[Tensor]:
        return [getattr(self, suffix) for suffix in self.quantization.stored_shapes(self.shape)]


class PackedLinear(PackedWeight):
    """nn.Linear over a packed weight [out, in]: x [..., in] -> [..., out] in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, quantization: Quantization):
        super().__init__((out_features, in_features), quantization)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return matmul(x, self, self.bias)


class PackedEmbedding(PackedWeight):
    """Token embedding over a packed weight [vocab, hidden]: ids [n] -> [n, hidden] in `dtype`."""

    def __init__(self, vocab: int, hidden: int, dtype: str, quantization: Quantization):
        super().__init__((vocab, hidden), quantization)
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        q, dtype = self.quantization, self.dtype

        def compute(ids: te.Tensor, *stored: te.Tensor):
            vocab, hidden = self.shape
            row = lambda i: tir.max(tir.min(ids[i], vocab - 1), 0)  # noqa: E731 (in range; clipped as layers.gather)
            return te.compute((ids.shape[0], hidden), lambda i, k: element(q, list(stored), (row(i),), k)
                              .astype(dtype), name="dequantize_take")

        return op.tensor_expr_op(compute, "dequantize_take", [ids, *self.stored()])


def matmul(x: Tensor, weight: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] . W[N, K]^T (+ bias) -> [..., N] in x's dtype, W dequantized as it is read."""
    *lead, k = x.shape
    q = weight.quantization
    rows = op.reshape(x, (-1, k)) if len(lead) != 1 else x

    def compute(x: te.Tensor, *tensors: te.Tensor):
        stored, b = (tensors[:-1], tensors[-1]) if bias is not None else (tensors, None)
        m, depth = x.shape
        n = weight.shape[0]
        r = te.reduce_axis((0, depth), name="k")
        acc = te.compute((m, n), lambda i, j: te.sum(
            x[i, r].astype(F32) * element(q, list(stored), (j,), r), axis=r), name="dequantize_matmul")
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
        reduce = te.reduce_axis((0, k), name="k")
        acc = te.compute((m, r), lambda i, j: te.sum(
            x[i, reduce].astype(F32) * element(q, list(stored), (expert[i], j), reduce), axis=reduce),
            name="acc")
        return te.compute((m, r), lambda i, j: acc[i, j].astype(x.dtype), name="gathered_matmul")

    return op.tensor_expr_op(compute, "gathered_matmul", [x, expert, *weight.stored()])


# --- the hooks the families build through --------------------------------------------------------------

def active() -> Quantization | None:
    return _ACTIVE.get()


def linear(in_features: int, out_features: int, *, bias: bool, dtype: str) -> nn.Module:
    """nn.Linear, or its packed form under `quantized`."""
    q = active()
    if q is None:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return PackedLinear(in_features, out_features, bias, dtype, q)


def embedding(vocab: int, hidden: int, dtype: str) -> nn.Module:
    """layers.Embedding, or its packed form under `quantized`."""
    from ..models.layers import Embedding  # noqa: PLC0415

    q = active()
    return Embedding(vocab, hidden, dtype) if q is None else PackedEmbedding(vocab, hidden, dtype, q)


def expert_weight(shape: tuple[int, ...], dtype: str) -> nn.Parameter | PackedWeight:
    """Stacked expert matrices [experts, r, K]: a float parameter, or packed under `quantized`."""
    q = active()
    return nn.Parameter(shape, dtype) if q is None else PackedWeight(shape, q)


def tied_head(x: Tensor, embed: nn.Module) -> Tensor:
    """Logits x [n, hidden] . E[vocab, hidden]^T over the embedding's own weight (tied LM head)."""
    if isinstance(embed, PackedWeight):
        return matmul(x, embed)
    return op.matmul(x, op.permute_dims(embed.weight))

"""Weight quantization schemes: their names, their packed layouts, and numpy quantize / dequantize.

The numpy functions here are the exact reference: a quantized library must compute with the weights
`dequantize` returns (checked against transformers loaded with those weights), so every other part of
qcompile (checkpoint writer, loader, kernels) packs and unpacks through this module's definitions.

A weight W [..., N, K] (N output features, K input features, the contracted axis last, as HF stores
linear and embedding weights) becomes, under a grouped scheme with group size g (g divides K):

  q8   qweight int8  [..., N, K]      q = clip(rint(W / s), -127, 127)
       scales float16 [..., N, K / g] s = max|W| over the group / 127 (rounded to float16 first)
  q4   qweight uint8 [..., N, K / 2]  q = clip(rint(W / s), -7, 7) + 8, two per byte: byte j of a
                                      group (g / 2 bytes) holds element j in its low nibble and
                                      element j + g/2 in its high nibble (llama.cpp's Q4_0 order: a
                                      vector of consecutive bytes unpacks into two runs of consecutive
                                      elements with one shift and one mask, no shuffles)
       scales float16 [..., N, K / g] s = max|W| over the group / 7
  bf16, f16: the weight itself, stored in that dtype (same tensor name).

W ~ dequantize = (q - offset) * s, computed in float32 (float16 -> float32 is exact). Symmetric, so a
group of zeros has s = 0 and dequantizes to zeros. Scales are float16 as in llama.cpp's Q8_0 / Q4_0
(bytes per weight: q8 1.0625, q4 0.5625 at g = 32).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from ..errors import UserError

DEFAULT_GROUP_SIZE = 32
QWEIGHT, SCALES = "qweight", "scales"  # the packed tensors' suffixes: "<prefix>.qweight", "<prefix>.scales"


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    grouped: bool  # integer weights with one scale per group (q8, q4); else a plain 16-bit cast
    bits: int  # bits per stored weight (scales not counted)
    qmax: int = 0  # grouped: |q| <= qmax
    storage: str = ""  # numpy dtype name of the stored weight

    def bytes_per_weight(self, group_size: int = DEFAULT_GROUP_SIZE) -> float:
        """Stored bytes per weight, scales included."""
        return self.bits / 8 + (2 / group_size if self.grouped else 0)

    def packed_k(self, k: int) -> int:
        """The stored last-axis length of a weight with K input features."""
        return k * self.bits // 8 if self.grouped else k


SCHEMES: dict[str, Scheme] = {
    "q8": Scheme("q8", grouped=True, bits=8, qmax=127, storage="int8"),
    "q4": Scheme("q4", grouped=True, bits=4, qmax=7, storage="uint8"),
    "bf16": Scheme("bf16", grouped=False, bits=16, storage="bfloat16"),
    "f16": Scheme("f16", grouped=False, bits=16, storage="float16"),
}


def get(name: str) -> Scheme:
    """The scheme called `name` (UserError naming the valid ones)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(f"--quantization must be one of {', '.join(SCHEMES)}, got {name!r}") from None


def check_group_size(scheme: Scheme, group_size: int, tensor: str, k: int) -> None:
    """A grouped scheme needs g even (q4 packs half-groups) and g | K; the error names the tensor."""
    if not scheme.grouped:
        return
    if group_size < 2 or group_size % 2:
        raise UserError(f"--group-size must be an even number >= 2, got {group_size}")
    if k % group_size:
        raise UserError(f"{tensor}: input dimension {k} is not divisible by --group-size {group_size}")


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def quantize(tensor: str, w: np.ndarray, scheme: Scheme, group_size: int = DEFAULT_GROUP_SIZE
             ) -> dict[str, np.ndarray]:
    """A float weight [..., N, K] -> its stored tensors: {"qweight", "scales"} (grouped) or
    {"weight"} (16-bit). `tensor` names the weight in errors."""
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise UserError(f"{tensor}: holds non-finite values; cannot quantize")
    if not scheme.grouped:
        return {"weight": w.astype(_dtype(scheme.storage))}
    if w.ndim < 2:
        raise UserError(f"{tensor}: a {w.ndim}-D tensor cannot be group-quantized (needs [..., N, K])")
    k = w.shape[-1]
    check_group_size(scheme, group_size, tensor, k)
    groups = w.reshape(*w.shape[:-1], k // group_size, group_size)  # [..., N, G, g]
    absmax = np.max(np.abs(groups), axis=-1)  # [..., N, G]
    scales = (absmax / scheme.qmax).astype(np.float16)
    if not np.all(np.isfinite(scales)):
        raise UserError(f"{tensor}: a group's scale overflows float16 (|w| up to {float(absmax.max()):.3g})")
    s = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(groups / np.where(s > 0, s, 1)), 0)
    q = np.clip(q, -scheme.qmax, scheme.qmax).astype(np.int8)  # [..., N, G, g]
    if scheme.name == "q8":
        qweight = q.reshape(w.shape)
    else:  # q4: element j and j + g/2 of a group share byte j (low, high nibble), stored as q + 8
        u = (q + 8).astype(np.uint8)
        half = group_size // 2
        qweight = (u[..., :half] | (u[..., half:] << 4)).reshape(*w.shape[:-1], k // 2)
    return {QWEIGHT: qweight, SCALES: scales}


def unpack(qweight: np.ndarray, scheme: Scheme, group_size: int) -> np.ndarray:
    """The signed integers q [..., N, K] (int8) a grouped scheme's qweight holds."""
    if scheme.name == "q8":
        return qweight.astype(np.int8)
    half = group_size // 2
    nibbles = qweight.reshape(*qweight.shape[:-1], -1, half)  # [..., N, G, g/2]
    low, high = nibbles & 0x0F, nibbles >> 4
    q = np.concatenate([low, high], axis=-1).astype(np.int8) - 8  # [..., N, G, g]
    return q.reshape(*qweight.shape[:-1], -1)


def dequantize(tensor: str, stored: dict[str, np.ndarray], scheme: Scheme,
               group_size: int = DEFAULT_GROUP_SIZE) -> np.ndarray:
    """The float32 weight [..., N, K] that a weight's stored tensors stand for (what the kernels
    compute with). Shapes are checked against each other; a mismatch names `tensor`."""
    if not scheme.grouped:
        return np.asarray(stored["weight"]).astype(np.float32)
    qweight, scales = stored[QWEIGHT], stored[SCALES]
    if qweight.dtype != _dtype(scheme.storage) or scales.dtype != np.float16:
        raise UserError(f"{tensor}: stored as {qweight.dtype}/{scales.dtype}, scheme {scheme.name} "
                        f"stores {scheme.storage}/float16")
    k = scales.shape[-1] * group_size
    if qweight.shape[:-1] != scales.shape[:-1] or qweight.shape[-1] != scheme.packed_k(k):
        raise UserError(f"{tensor}: packed weight {list(qweight.shape)} does not match scales "
                        f"{list(scales.shape)} at group size {group_size} ({scheme.name})")
    q = unpack(qweight, scheme, group_size).astype(np.float32)
    q = q.reshape(*q.shape[:-1], k // group_size, group_size)
    return (q * scales.astype(np.float32)[..., None]).reshape(*qweight.shape[:-1], k)

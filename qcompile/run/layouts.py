"""Weight layouts a library's parameters may have, and the numpy packing the loader applies.

A parameter is stored in the layout its kernel reads best (the manifest names it per parameter):

  (none)    as in the HF checkpoint (after the family's fusing), e.g. a linear weight W [N, K].
  rows16    W [N, K] packed as [N / 16, K, 16]: row n of W is [n // 16, :, n % 16]. A matrix product
            then loads 16 consecutive output features' weights for one input feature with one
            contiguous vector load (AVX-512: one register; AVX2: two), and register tiles of rows x
            output vectors accumulate with broadcast-FMAs (`build.cpu_rules.packed`). CPU float32 builds
            use it for every linear weight and the embedding whose row count 16 divides.

Numpy only: the runtime (and a runtime-only bundle) packs while loading, one tensor at a time.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

ROWS16 = "rows16"
PACK_LANES = 16  # output features per packed vector (the layout is the same for every CPU)
LAYOUTS = (ROWS16,)


def unpacked_shape(shape: list[int] | tuple[int, ...], layout: str | None) -> tuple[int, ...]:
    """The HF-layout shape of a parameter stored as `shape` in `layout`."""
    if layout is None:
        return tuple(shape)
    blocks, k, lanes = shape
    return (blocks * lanes, k)


def pack(array: np.ndarray, layout: str | None, name: str) -> np.ndarray:
    """`array` (HF layout) in `layout`, contiguous. `name` names the parameter in errors."""
    if layout is None:
        return np.ascontiguousarray(array)
    if layout not in LAYOUTS:
        raise UserError(f"parameter '{name}': unknown layout {layout!r} in the manifest (known: {', '.join(LAYOUTS)})")
    n, k = array.shape
    return np.ascontiguousarray(array.reshape(n // PACK_LANES, PACK_LANES, k).transpose(0, 2, 1))


def unpack(array: np.ndarray, layout: str | None) -> np.ndarray:
    """The HF-layout weight a packed parameter holds (tests, inspection)."""
    if layout is None:
        return array
    blocks, k, lanes = array.shape
    return array.transpose(0, 2, 1).reshape(blocks * lanes, k)

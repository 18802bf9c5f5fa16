"""A library's weight quantization: the scheme and group size chosen at compile time (--quantization,
--group-size), as the build plan, the manifest and the loader share it. No TVM here (the runtime reads it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from . import schemes
from .schemes import QWEIGHT, SCALES, Scheme


@dataclasses.dataclass(frozen=True)
class Quantization:
    scheme: Scheme
    group_size: int | None  # grouped schemes only

    def as_json(self) -> dict[str, Any]:
        """The manifest's and the build identity's "quantization": {"scheme", "group_size"}."""
        return {"scheme": self.scheme.name, "group_size": self.group_size}

    def describe(self) -> str:
        return self.scheme.name + (f" (group size {self.group_size})" if self.scheme.grouped else "")

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """A weight [..., N, K] -> its stored tensors {suffix: (shape, dtype)}."""
        s = self.scheme
        if not s.grouped:
            return {"weight": (tuple(shape), s.storage)}
        *lead, k = shape
        return {QWEIGHT: ((*lead, s.packed_k(k)), s.storage),
                SCALES: ((*lead, k // self.group_size), "float16")}


def resolve(scheme: str | None, group_size: int | None) -> Quantization | None:
    """--quantization / --group-size -> a Quantization (None: float weights). UserError on bad input."""
    if scheme is None:
        if group_size is not None:
            raise UserError("--group-size applies with --quantization q8 or q4")
        return None
    s = schemes.get(scheme)
    if not s.grouped:
        if group_size is not None:
            raise UserError(f"--group-size applies with --quantization q8 or q4, not {s.name}")
        return Quantization(s, None)
    g = schemes.DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g < 2 or g % 2:
        raise UserError(f"--group-size must be an even number >= 2, got {g}")
    return Quantization(s, g)


def from_manifest(manifest: dict[str, Any]) -> Quantization | None:
    """A library's quantization (None: float weights, also for libraries built before quantization)."""
    q = manifest.get("quantization")
    return None if q is None else resolve(q["scheme"], q["group_size"])

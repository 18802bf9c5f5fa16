"""Sizes written by people: '141GB', '80GiB', '512MiB', '4096' (bytes). Used by the compiler's memory plan
(--device-memory) and by the server (--kv-budget); here, outside build/, so the runtime-only bundle has it."""

from __future__ import annotations

import re

from .errors import UserError

_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory_size(text: str, option: str = "--device-memory") -> int:
    """'141GB' -> 141e9 bytes, '80GiB' -> 80 * 2^30, '1000' -> bytes (GB = 1e9, GiB = 2^30; a bare 'G'
    is refused as ambiguous)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in ("", *_UNITS):
        raise UserError(f"{option}: {text!r} is not a size (e.g. 141GB = 141e9 bytes, 80GiB = 80 x 2^30 bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "b"])

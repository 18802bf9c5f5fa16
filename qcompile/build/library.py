"""The library format: a directory holding the built shared object and its manifest.

  model.so        the TVM Relax VM executable (kernels + VM bytecode), no weights
  manifest.json   what was built, for whom, and how to call it (format `MANIFEST_FORMAT`)

This module only reads and checks; it imports no TVM, so the runtime and the registry can use it without
the compiler. `builder.write_library` writes libraries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..spec.schema import read_json_object

MANIFEST = "manifest.json"
LIBRARY = "model.so"
MANIFEST_FORMAT = "qcompile-library/1"
# What the runtime and the registry read from a manifest.
MANIFEST_KEYS = ("model", "target", "dtype", "max_seq_len", "prefill_chunk", "buckets", "parameters",
                 "library", "versions", "identity", "build")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """A library directory's manifest, checked for its format and the keys readers need."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: library directory not found")
    path = directory / MANIFEST
    manifest = read_json_object(path, missing=f"{directory}: not a qcompile library (no {MANIFEST})")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format is not {MANIFEST_FORMAT}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UserError(f"{path}: incomplete manifest (no '{missing[0]}')")
    return manifest


def is_library_dir(path: Path) -> bool:
    """A directory qcompile wrote as a library (so `compile -o` may replace it)."""
    try:
        return read_manifest(path).get("format") == MANIFEST_FORMAT
    except UserError:
        return False

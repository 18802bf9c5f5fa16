"""`qcompile inspect LIBRARY`."""

from __future__ import annotations

import math
from pathlib import Path

from .. import api
from .common import emit_json, listing

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def add(sub) -> None:
    p = listing(sub, "inspect", "what a library was built for and the device code it carries", inspect)
    p.add_argument("library", type=Path, help="library directory")


def inspect(args) -> None:
    summary = api.inspect(args.library)
    if args.json:
        return emit_json(summary)
    library, found = summary["library"], summary["device_modules_in_library"]
    print(f"{summary['model']} for {summary['target']} ({summary['device']} {summary['arch']}, {summary['dtype']})")
    print(f"  library   {library['file']} sha256 {library['sha256'][:16]}…")
    for m in found:
        what = (f"cubin {', '.join(m['cubin'])} + PTX {', '.join(m['ptx'])}" if m["code"] == "fatbin"
                else f"{m['arch']}, code object v{m['code_object_version']}" if m["code"] == "hsaco"
                else m["code"])
        print(f"  device    {m['kind']} module: {m['format']}, {m['bytes']:,} bytes ({what})")
    if not found:
        print("  device    none (host code only)")
    tools = ", ".join(f"{k} {v}" for k, v in summary["toolchain"].items())
    print(f"  built by  TVM {summary['versions']['tvm']} (tvm-ffi {summary['versions']['tvm_ffi']}); {tools}")
    if summary["kv_cache"]:
        print(f"  kv cache  {kv_cache_line(summary['kv_cache'])}")
    tuning = summary["tuning_database"]
    print("  schedules " + (f"{len(tuning['kernels']['tuned'])} tuned kernels from {tuning['sha256']}"
                            if tuning else "default only"))


def kv_cache_line(cache: dict) -> str:
    """The manifest's KV cache layout in a line, e.g. "full_attention x1: 256 slots, sliding_attention
    (window 8) x2: 8 slots; K and V [slots, 2, 16] float32 each, 0.1 MiB in all"."""
    groups: dict[tuple[str, int], int] = {}  # (kind, slots) -> layers
    for layer in cache["layers"]:
        key = (layer["kind"] + (f" (window {layer['window']})" if "window" in layer else ""), layer["slots"])
        groups[key] = groups.get(key, 0) + 1
    row = math.prod(cache["row"]) * DTYPE_BYTES[cache["dtype"]]
    total = 2 * sum(layer["slots"] for layer in cache["layers"]) * row
    kinds = ", ".join(f"{kind} x{count}: {slots} slots" for (kind, slots), count in groups.items())
    return (f"{kinds}; K and V [slots, {', '.join(map(str, cache['row']))}] {cache['dtype']} each, "
            f"{total / 2**20:.1f} MiB in all")

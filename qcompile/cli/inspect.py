"""`qcompile inspect LIBRARY|MODEL`: what a library was built for; or a MODEL's memory plan for a target."""

from __future__ import annotations

import math
from pathlib import Path

from .. import api
from ..quant.schemes import DEFAULT_GROUP_SIZE
from .common import add_build_options, add_target, emit_json, listing, non_negative_int

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def add(sub) -> None:
    p = listing(sub, "inspect", "what a library was built for, the device code it carries and its memory "
                                "plan; or, for a MODEL, the memory plan of building it", inspect)
    p.add_argument("library", metavar="LIBRARY|MODEL",
                   help="a library directory, or a MODEL (zoo name or HF checkpoint directory) whose memory "
                        "plan for the options below is printed (nothing is built)")
    add_target(p, help="with a MODEL: the target (default: cpu)")
    add_build_options(p, dtype_help="with a MODEL: compute dtype (default: the target's)",
                      seq_help="with a MODEL: context the KV cache holds (default: max_position_embeddings)")
    p.add_argument("--tensor-parallel", type=non_negative_int, default=1, metavar="N",
                   help="with a MODEL: devices each layer is split over (default 1)")
    p.add_argument("--pipeline-stages", type=non_negative_int, default=1, metavar="S",
                   help="with a MODEL: contiguous groups of layers on their own devices (default 1)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="say whether every device's share fits SIZE, e.g. 141GB (1e9) or 80GiB (2^30)")


def inspect(args) -> None:
    if not api.is_library(args.library):
        return inspect_model(args)
    summary = api.inspect(Path(args.library))
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
    split = summary["parallel"]
    if split:
        print(f"  split     tensor-parallel {split['tensor_parallel']} by the family's plan; one shard: "
              + ", ".join(f"{k} {v}" for k, v in split["shard_config"].items()))
    for stage in summary["pipeline"] or ():
        print(f"  stage {stage['stage']}   layers {stage['layers'][0]}..{stage['layers'][1] - 1}: {stage['library']['file']}")
    if summary["kv_cache"]:
        print(f"  kv cache  {kv_cache_line(summary['kv_cache'])}")
    tuning = summary["tuning_database"]
    print("  schedules " + (f"{len(tuning['kernels']['tuned'])} tuned kernels from {tuning['sha256']}"
                            if tuning else "default only"))
    plan = summary["memory_plan"]
    if plan:  # libraries built before the memory plan have none
        print("  memory")
        for line in api.memory_lines(plan):
            print(f"    {line}")


def inspect_model(args) -> None:
    plan = api.memory_plan(args.library, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           quantization=args.quantization, group_size=args.group_size or DEFAULT_GROUP_SIZE,
                           tensor_parallel=args.tensor_parallel, pipeline_stages=args.pipeline_stages)
    fit = api.memory_fit(plan, args.device_memory) if args.device_memory else None
    if args.json:
        return emit_json({"model": str(args.library), "target": args.target, "memory_plan": plan,
                          **({"fits": fit[0], "fit": fit[1]} if fit else {})})
    print(f"{args.library} for {args.target}: memory plan (nothing built)")
    for line in [*api.memory_lines(plan), *([fit[1]] if fit else [])]:
        print(f"  {line}")


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

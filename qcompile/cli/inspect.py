"""`qcompile inspect LIBRARY`."""

from __future__ import annotations

from pathlib import Path

from .. import api
from .common import emit_json, listing


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
    split = summary["parallel"]
    if split:
        print(f"  split     tensor-parallel {split['tensor_parallel']} by the family's plan; one shard: "
              + ", ".join(f"{k} {v}" for k, v in split["shard_config"].items()))
    for stage in summary["pipeline"] or ():
        print(f"  stage {stage['stage']}   layers {stage['layers'][0]}..{stage['layers'][1] - 1}: {stage['library']['file']}")
    tuning = summary["tuning_database"]
    print("  schedules " + (f"{len(tuning['kernels']['tuned'])} tuned kernels from {tuning['sha256']}"
                            if tuning else "default only"))

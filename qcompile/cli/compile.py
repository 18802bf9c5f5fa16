"""`qcompile compile MODEL --target T -o DIR [--register]`."""

from __future__ import annotations

from pathlib import Path

from .. import api
from ..errors import UserError
from .common import MODEL_HELP, add_build_options, add_json, add_target, emit_json, progress


def add(sub) -> None:
    p = sub.add_parser("compile", help="build MODEL for a target into a library directory")
    p.add_argument("model", help=MODEL_HELP)
    add_target(p)
    p.add_argument("-o", "--output", type=Path,
                   help="library directory to write (replaced atomically if it is a previous library)")
    p.add_argument("--register", action="store_true",
                   help="store the library in the registry ($QCOMPILE_HOME, default ~/.cache/qcompile); "
                        "an identical build already there is reused")
    add_build_options(p)
    p.add_argument("--schedules", type=Path, metavar="DIR",
                   help="tuning database directory to apply (default: every one committed for TARGET, "
                        "and those under $QCOMPILE_SCHEDULES/TARGET/)")
    p.add_argument("--no-schedules", action="store_true", help="default schedules only (no tuning database)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="check before building that the memory plan (weights + KV cache at --max-seq-len + "
                        "workspace) fits a device of SIZE, e.g. 141GB (GB = 1e9 bytes) or 80GiB (2^30)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N devices by its family's plan (q/k/v, gate/up column-wise; "
                        "o, down row-wise with an all-reduce after each); heads, kv heads and intermediate "
                        "sizes must divide by N")
    p.add_argument("--pipeline-stages", type=int, default=1, metavar="S",
                   help="cut the layers into S stages balanced by parameter bytes (embedding with the first, "
                        "norm and LM head with the last), each its own shared object; combines with "
                        "--tensor-parallel (S x N workers)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> None:
    if args.output is None and not args.register:
        raise UserError("compile: give -o DIR, --register, or both")
    if args.device_memory is not None:
        check_fit(args)
    options = dict(target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len, log=progress(args),
                   schedules=args.schedules, use_schedules=not args.no_schedules,
                   tensor_parallel=args.tensor_parallel, pipeline_stages=args.pipeline_stages,
                   quantization=args.quantization, group_size=args.group_size)
    if args.register:
        entry, built = api.register_model(args.model, copy_to=args.output, **options)
        manifest = entry.manifest
        where = f"{'new' if built else 'existing'} registry entry {entry.key[:12]} ({entry.path})"
    else:
        manifest, where = api.compile_model(args.model, out=args.output, **options), str(args.output)
    if args.json:
        return emit_json({"output": str(args.output) if args.output else None,
                          "registry_key": entry.key if args.register else None,
                          **{k: manifest[k] for k in ("model", "target", "dtype", "quantization", "max_seq_len",
                                                      "parameter_count", "library", "build")},
                          "parallel": manifest.get("parallel"), "pipeline": manifest.get("pipeline")})
    built_note = f"built in {manifest['build']['seconds']} s" if not args.register or built else "reused"
    print(f"{manifest['model']['name']} for {args.target} ({manifest['parameter_count']:,} parameters, "
          f"{manifest['dtype']}, {built_note}): {where}"
          + (f", copied to {args.output}" if args.register and args.output else ""))


def check_fit(args) -> None:
    """The memory plan against --device-memory, before any building: one line either way."""
    plan = api.memory_plan(args.model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           quantization=getattr(args, "quantization", None),
                           group_size=args.group_size or 32, tensor_parallel=args.tensor_parallel,
                           pipeline_stages=args.pipeline_stages)
    ok, line = api.memory_fit(plan, args.device_memory)
    if not ok:
        raise UserError(f"{args.model} for {args.target}: {line}")
    progress(args)(line)

"""`qcompile tune MODEL --target T --trials N`."""

from __future__ import annotations

import time
from pathlib import Path

from .. import api
from .common import MODEL_HELP, add_target, emit_json, non_negative_int, print_table, progress


def add(sub) -> None:
    p = sub.add_parser("tune", help="auto-tune MODEL's kernels with MetaSchedule (resumable)",
                       description="Tune the static-shape kernels of MODEL (decode step, prefill bucket, "
                       "image batch 1) with MetaSchedule's XGBoost cost model. Each measured candidate is "
                       "appended to the database at once: Ctrl-C or a kill loses no finished record, and "
                       "a rerun tunes only what is missing. Ends with a per-kernel table, report.json and "
                       "curve.png beside the database.")
    p.add_argument("model", help=MODEL_HELP)
    add_target(p)
    p.add_argument("--trials", type=non_negative_int, default=64,
                   help="measured candidates per kernel, the default schedule included (64)")
    p.add_argument("--schedules", type=Path, metavar="DIR",
                   help="database directory (default: TARGET/MODEL under the first $QCOMPILE_SCHEDULES "
                        "directory, else beside the committed schedules, which compile applies)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY",
                   help="measure on a device registered with a TVM RPC tracker under KEY")
    p.add_argument("--functions", metavar="NAMES",
                   help="only kernels of these entry points, comma-separated (e.g. decode,prefill_128)")
    p.add_argument("--kernels", metavar="GLOB", help="tune only kernels whose name matches, e.g. '*NT_matmul*'")
    p.add_argument("--dtype", help="compute dtype (default: the target's)")
    p.add_argument("--json", action="store_true", help="machine-readable report (no progress bar)")
    p.set_defaults(func=run)


def run(args) -> None:
    start = time.perf_counter()
    report = api.tune(args.model, target=args.target, trials=args.trials, schedules=args.schedules,
                      rpc=args.rpc, kernels=args.kernels, log=progress(args), show_progress=not args.json,
                      functions=args.functions.split(",") if args.functions else None)
    seconds = time.perf_counter() - start
    if args.json:
        return emit_json({**report, "seconds": round(seconds, 1)})
    print_table(api.format_tuning_report(report),
                ["KERNEL (INPUT SHAPES)", "CALLS", "TRIALS", "DEFAULT ms", "TUNED ms", "SPEEDUP"])
    print(f"tuned in {seconds:.0f} s; database, report.json and curve.png in {report['directory']}")

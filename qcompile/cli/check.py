"""`qcompile check [--models ...] [--targets ...]`: the cross-backend regression harness."""

from __future__ import annotations

from pathlib import Path

from .. import api
from ..errors import UserError
from .common import emit_json, print_table, progress


def add(sub) -> None:
    p = sub.add_parser("check", help="cross-backend regression: build, run where possible, compare",
                       description="For every MODEL x TARGET: build the library (device code checked), "
                       "run it if this machine can, and compare with transformers and with the float32 "
                       "CPU library against the target's tier. Exit 2 if any pair fails.")
    p.add_argument("--models", default="qwen2-debug,qwen2-sw-debug,qwen3-moe-debug,vit-debug",
                   help="comma-separated zoo models (default: the debug models)")
    p.add_argument("--targets", default="cpu,cpu-x86-64-v3,cuda-sm80,cuda-sm90,rocm-gfx90a,rocm-gfx942",
                   help="comma-separated targets (default: all)")
    p.add_argument("--dtype", help="override every target's default dtype")
    p.add_argument("--workdir", type=Path, default=Path("build/check"), help="libraries go here (build/check)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _metrics(metrics) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()) if metrics else "-"


def run(args) -> None:
    rows = api.check(args.models.split(","), args.targets.split(","), workdir=args.workdir,
                     dtype=args.dtype, log=progress(args))
    if args.json:
        emit_json(rows)
    else:
        print_table([[r["model"], r["target"], r["dtype"], f"yes, {r['built']['seconds']} s",
                      "yes" if r["ran"]["ok"] else f"no: {r['ran']['why']}",
                      _metrics(r.get("vs_transformers")), _metrics(r.get("vs_cpu_float32")),
                      ("FAIL: " + "; ".join(r["failed"])) if r.get("failed") else
                      ("pass" if "failed" in r else "-")] for r in rows],
                    ["MODEL", "TARGET", "DTYPE", "BUILT", "RAN", "VS TRANSFORMERS", "VS CPU FLOAT32", "TIER"])
    failed = [r for r in rows if r.get("failed")]
    if failed:
        raise UserError(f"check: {len(failed)} of {len(rows)} pairs outside their tier "
                        f"(first: {failed[0]['model']} on {failed[0]['target']}: {failed[0]['failed'][0]})")

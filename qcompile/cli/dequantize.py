"""`qcompile dequantize QCKPT -o CKPT`: the float32 HF checkpoint a quantized one stands for."""

from __future__ import annotations

from pathlib import Path

from .. import api
from .common import add_json, emit_json, progress


def add(sub) -> None:
    p = sub.add_parser(
        "dequantize", help="write the float32 HF checkpoint a quantized checkpoint's weights stand for",
        description="Unpack every weight of a checkpoint `qcompile quantize` wrote into float32 "
                    "((q - offset) * scale, exactly what a quantized library computes with) and write an "
                    "HF checkpoint that transformers loads: to compare a quantized model with its float "
                    "original, or to check a quantized library exactly.")
    p.add_argument("checkpoint", type=Path, metavar="QCKPT", help="quantized checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="CKPT",
                   help="float checkpoint directory to write (replaces only an earlier dequantize output)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> None:
    summary = api.dequantize_checkpoint(args.checkpoint, out=args.output, log=progress(args))
    if args.json:
        return emit_json(summary)
    print(f"wrote the float32 weights of {args.checkpoint} ({summary['scheme']}) to {summary['output']}: "
          f"{summary['tensors']} tensors, {summary['bytes']:,} bytes")

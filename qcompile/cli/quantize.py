"""`qcompile quantize CKPT --quantization q4 -o QCKPT`: a quantized checkpoint of a float one."""

from __future__ import annotations

from pathlib import Path

from .. import api
from ..quant.schemes import DEFAULT_GROUP_SIZE, SCHEMES
from .common import add_json, emit_json, non_negative_int, progress


def add(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write a quantized checkpoint (q8/q4 packed weights + scales, or bf16/f16) of a "
                         "float HF checkpoint",
        description="Quantize the weights of linear layers, embeddings and the LM head of a float HF "
                    "checkpoint (config.json + safetensors), tensor by tensor, into a new checkpoint "
                    "directory: <name>.qweight + <name>.scales per weight (q8: int8; q4: two 4-bit values "
                    "per byte, llama.cpp Q4_0 order), one float16 scale per group along the input "
                    "dimension; bf16/f16 store those weights in 16 bits. Norms, biases and the MoE router "
                    "stay float32. config.json and tokenizer files are copied; quantization.json records "
                    "the scheme.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="float HF checkpoint directory")
    p.add_argument("--quantization", required=True, metavar="SCHEME",
                   help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--group-size", type=non_negative_int, default=DEFAULT_GROUP_SIZE,
                   help=f"weights per scale along the input dimension (q8, q4; default {DEFAULT_GROUP_SIZE}); "
                        "must divide every quantized weight's input dimension")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="QCKPT",
                   help="quantized checkpoint directory to write (replaces only an earlier one)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> None:
    summary = api.quantize_checkpoint(args.checkpoint, scheme=args.quantization, group_size=args.group_size,
                                      out=args.output, log=progress(args))
    if args.json:
        return emit_json(summary)
    grouping = f", group size {summary['group_size']}" if SCHEMES[summary["scheme"]].grouped else ""
    print(f"wrote {summary['scheme']}{grouping} checkpoint of {args.checkpoint} to {summary['output']}: "
          f"{summary['quantized']} of {summary['tensors']} tensors quantized, {summary['bytes']:,} bytes")

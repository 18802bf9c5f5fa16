"""Quantization error: how far each scheme's weights move a model's logits from the float32 model's.

    PYTHONPATH=. .venv/bin/python bench/quant_error.py [--models qwen2-debug,qwen2-0.5b]
        [--schemes q8,q4,bf16,f16] [--prompt-len 64] [--std 0.15,0.02] [--workdir /tmp/quant_error]
        [--out bench/quant_error.txt]

Per model and weight std: random float32 weights as `qcompile init-weights` writes them (seed 0; std
0.15 is its default, 0.02 HF's initialisation: how far the logits move depends on it), one random
prompt; per scheme: `quantize` -> `dequantize` -> transformers loads the float32 checkpoint those packed
weights stand for (exactly what a quantized library computes with) -> its logits over the prompt vs the
float model's: top-1 agreement and mean KL(float || quantized), the metrics and tiers of `qcompile check`
(data/tolerance.yaml). No TVM. Writes the table, with the command and the tiers, to --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qcompile import api
from qcompile.measure import reference
from qcompile.measure.check import compare
from qcompile.spec.target import load_target


def scheme_logits(checkpoint: Path, scheme: str, workdir: Path, prompt: np.ndarray) -> np.ndarray:
    """transformers' logits with the weights `scheme` stores (quantize -> dequantize -> load)."""
    quiet = dict(log=lambda _m: None)
    api.quantize_checkpoint(checkpoint, scheme=scheme, out=workdir / scheme, **quiet)
    api.dequantize_checkpoint(workdir / scheme, out=workdir / f"{scheme}-float", **quiet)
    logits = reference.logits(reference.load_causal_lm(workdir / f"{scheme}-float"), prompt)
    for path in (workdir / scheme, workdir / f"{scheme}-float"):  # a 0.5b float copy is 2 GB
        shutil.rmtree(path)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen2-debug,qwen2-0.5b")
    parser.add_argument("--schemes", default="q8,q4,bf16,f16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--std", default="0.15,0.02", help="init-weights' weight stds (default 0.15,0.02)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/quant_error"))
    parser.add_argument("--out", type=Path, default=Path("bench/quant_error.txt"))
    args = parser.parse_args()

    rows = []
    for model, std in ((m, float(s)) for m in args.models.split(",") for s in args.std.split(",")):
        workdir = args.workdir / model
        checkpoint = api.init_weights(model, out=workdir / "float32", std=std)
        spec = api.describe_runnable(model)[0]
        prompt = np.random.default_rng(0).integers(0, spec.config.vocab_size, args.prompt_len)
        float_logits = reference.logits(reference.load_causal_lm(checkpoint), prompt)
        for scheme in args.schemes.split(","):
            start = time.perf_counter()
            metrics = compare(scheme_logits(checkpoint, scheme, workdir, prompt), float_logits, logits=True)
            rows.append([model, f"{std:g}", scheme, f"{metrics['top1_agreement']:.3f}", f"{metrics['kl']:.3g}",
                         f"{metrics['max_rel_diff']:.3g}", f"{time.perf_counter() - start:.0f}"])
            print("  ".join(rows[-1]), flush=True)
        shutil.rmtree(workdir)

    tiers = load_target("cpu").tolerance
    header = ["model", "std", "scheme", "top1_agreement", "mean_kl", "max_rel_diff", "seconds"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines = [f"$ PYTHONPATH=. .venv/bin/python {' '.join(sys.argv)}",
             f"random weights (init-weights, seed 0, std as listed), one random {args.prompt_len}-token prompt; "
             "logits of transformers with the dequantized weights vs the float32 model",
             *table, "",
             "tiers of data/tolerance.yaml (16-bit compute dtypes vs transformers float32): "
             + "; ".join(f"{dtype}: top1_agreement >= {t['top1_agreement']}, kl <= {t['kl']}"
                         for dtype, t in tiers.items() if "kl" in t)]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

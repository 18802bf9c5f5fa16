"""Encode throughput (images/s) of a ViT: the qcompile library beside transformers eager, one process.

Random weights (HF layout, written by `init-weights`), float32, CPU; the same pixel batch for both;
median of several runs. Also the arithmetic limit: FLOPs per image / a measured float32 matmul peak.

    .venv/bin/python bench/vit_encode.py [--model vit-b16] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import qcompile
from qcompile import reference  # noqa: F401  (sets the offline environment for transformers)
from qcompile.zoo import resolve_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(n: int = 2048) -> float:
    """Measured float32 GEMM throughput of this machine through torch (its best BLAS here)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_seconds(lambda: a @ b, 5)
    return 2 * n ** 3 / seconds / 1e9


def flops_per_image(c) -> float:
    tokens = (c.image_size // c.patch_size) ** 2 + int(c.use_cls_token)
    width, ffn = c.hidden_size, c.intermediate_size
    patch = 2 * (tokens - 1) * width * c.num_channels * c.patch_size ** 2
    per_block = 2 * tokens * (4 * width * width + 2 * width * ffn) + 4 * tokens * tokens * width
    return patch + c.num_hidden_layers * per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModel

    cfg = resolve_model(args.model).config
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = qcompile.init_weights(args.model, out=Path(tmp) / "ckpt", std=0.02)
        start = time.perf_counter()
        qcompile.compile_model(args.model, out=Path(tmp) / "lib", log=lambda _m: None)
        compile_seconds = time.perf_counter() - start
        ours = qcompile.load(Path(tmp) / "lib", weights=ckpt)
        hf = AutoModel.from_pretrained(str(ckpt), dtype=torch.float32).eval()

        pixels = np.random.default_rng(0).standard_normal(
            (args.batch, cfg.num_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
        with torch.no_grad():
            expected = hf(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
        diff = float(np.abs(ours.encode(pixels) - expected).max() / np.abs(expected).max())
        ours_s = median_seconds(lambda: ours.encode(pixels), args.repeats)
        with torch.no_grad():
            hf_s = median_seconds(lambda: hf(pixel_values=torch.tensor(pixels)), args.repeats)
    peak = matmul_peak_gflops()
    limit_s = flops_per_image(cfg) * args.batch / (peak * 1e9)
    result = {"model": args.model, "batch": args.batch, "compile_seconds": compile_seconds,
              "qcompile_images_per_s": args.batch / ours_s, "transformers_images_per_s": args.batch / hf_s,
              "qcompile_vs_transformers": hf_s / ours_s, "matmul_peak_gflops": peak,
              "arithmetic_limit_images_per_s": args.batch / limit_s,
              "qcompile_fraction_of_limit": limit_s / ours_s, "max_rel_diff": diff}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} encode, batch {args.batch}, float32, median of {args.repeats} (untuned CPU kernels)")
    print(f"  qcompile      {result['qcompile_images_per_s']:8.3g} images/s   "
          f"({result['qcompile_fraction_of_limit']:.1%} of the arithmetic limit)")
    print(f"  transformers  {result['transformers_images_per_s']:8.3g} images/s")
    print(f"  limit         {result['arithmetic_limit_images_per_s']:8.3g} images/s   "
          f"({flops_per_image(cfg) / 1e9:.1f} GFLOP/image at a measured {peak:.0f} GFLOP/s matmul peak)")
    print(f"  qcompile / transformers speed: x{result['qcompile_vs_transformers']:.3g}; "
          f"max |diff| / scale {diff:.1e}; compile {compile_seconds:.1f} s")


if __name__ == "__main__":
    main()

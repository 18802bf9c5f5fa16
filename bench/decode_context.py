"""Decode step time against the number of cached tokens, for one library (the CPU-speed issue's target:
a step at 2048 cached tokens within 1.3x of a step at 128), with where the step's time goes.

    .venv/bin/python bench/decode_context.py LIB --weights CKPT [--contexts 128,2048] [--steps 8]

Prints, per context length, the median step time over `--steps` decode steps and the kernels that take
most of one step (`run.profile`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import qcompile
from qcompile.run.profile import kernel_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("library")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = qcompile.load(args.library, weights=args.weights)
    medians = {}
    for context in map(int, args.contexts.split(",")):
        model.prefill(np.arange(context) % model.vocab_size)
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            model.decode(step)
            times.append(time.perf_counter() - start)
        medians[context] = statistics.median(times)
        _, kernels = kernel_times(model, lambda: model.decode(1))
        top = ", ".join(f"{k['kernel']} {k['seconds'] * 1e3:.1f}" for k in kernels[:5])
        print(f"{context:6d} cached tokens: step {medians[context] * 1e3:.1f} ms (median of {args.steps}); "
              f"costliest kernels, ms: {top}")
    first = min(medians)
    for context, seconds in medians.items():
        print(f"{context:6d}: {seconds / medians[first]:.2f}x the step at {first}")


if __name__ == "__main__":
    main()

"""`qcompile demo`: the whole path on one small model, beside the transformers reference.

compile MODEL for the CPU -> random-weight HF checkpoint -> greedy generation with the compiled library
and with transformers from the same checkpoint -> tokens side by side, the largest logit difference
(over the prompt and every generated step) and decode tokens/s of both.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import api
from . import reference


def run_demo(model: str, *, workdir: Path, prompt_len: int, max_new_tokens: int, seed: int,
             target: str = "cpu") -> dict:
    library, checkpoint = Path(workdir) / "library", Path(workdir) / "checkpoint"

    def step(text: str) -> None:
        print(text, flush=True)

    start = time.perf_counter()
    step(f"[1/4] compiling {model} for {target} -> {library}")
    manifest = api.compile_model(model, target=target, out=library, log=lambda _m: None)
    step(f"      {manifest['build']['seconds']} s, {manifest['parameter_count']:,} parameters, "
         f"CPU {manifest['target']['target'].get('mcpu')}")
    step(f"[2/4] random weights (seed {seed}) -> {checkpoint}")
    api.init_weights(model, out=checkpoint, seed=seed)
    vocab = manifest["model"]["config"]["vocab_size"]
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_len)

    step("[3/4] generating with the qcompile library")
    ours = api.load(library, weights=checkpoint)
    new = ours.generate(prompt, max_new_tokens)
    ours_logits = np.concatenate([ours.last_prompt_logits[:-1], ours.last_step_logits])

    step("[4/4] generating with transformers (same checkpoint)")
    hf = reference.load_causal_lm(checkpoint)
    ref = reference.greedy_generate(hf, prompt, max_new_tokens)
    # Reference logits at the same positions: prompt positions, then each generated step.
    ref_logits = reference.logits(hf, np.concatenate([prompt, new[:-1]]))

    diff = float(np.abs(ours_logits - ref_logits).max())
    scale = float(np.abs(ref_logits).max())
    windows = manifest["model"]["config"]
    rate = ours.last_stats.decode_tokens_per_s
    print()
    print(f"model          {model}  (sliding_window {windows.get('sliding_window')}, "
          f"use_sliding_window {windows.get('use_sliding_window')}, context here "
          f"{prompt_len + max_new_tokens} tokens)")
    print(f"prompt ids     {' '.join(map(str, prompt))}")
    print(f"qcompile       {' '.join(map(str, new))}")
    print(f"transformers   {' '.join(map(str, ref.new_ids))}")
    same = bool(np.array_equal(new, ref.new_ids))
    print(f"tokens identical: {'yes' if same else 'NO'}")
    print(f"max |logit diff| over {len(ref_logits)} positions: {diff:.3g} "
          f"(logit scale {scale:.3g}; relative {diff / scale:.2g})")
    tuning = manifest["tuning_database"]
    tuned = f"{len(tuning['kernels']['tuned'])} tuned kernels" if tuning else "default schedules"
    print(f"decode tokens/s: qcompile {rate:.1f}, transformers eager {ref.decode_tokens_per_s:.1f} "
          f"({tuned}; batch 1)")
    print(f"total {time.perf_counter() - start:.1f} s")
    return {"tokens_identical": same, "max_logit_diff": diff, "logit_scale": scale,
            "qcompile_decode_tokens_per_s": rate,
            "transformers_decode_tokens_per_s": ref.decode_tokens_per_s}

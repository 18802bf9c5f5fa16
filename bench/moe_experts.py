"""Decode cost follows the active experts: qwen3_moe decode time per token with 8 vs 64 experts.

Same hidden size, heads, layers and top-k; only `num_experts` changes. A sparse implementation reads
k experts per token either way, so its time should barely move (the router grows with E, but it is a
[hidden -> E] GEMV); a dense-over-all-experts one would read E experts, 8x more at 64. transformers
eager runs beside it in the same process as the reference.

    .venv/bin/python bench/moe_experts.py [--tokens 32] [--repeats 5]
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
from qcompile.measure import reference
from qcompile.models.qwen3_moe import Qwen3MoeConfig
from qcompile.run.weights import write_random_checkpoint
from qcompile.spec.model import ModelSpec
from qcompile.models import FAMILIES

BASE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu",
            attention_bias=False, use_sliding_window=False, num_experts_per_tok=2,
            moe_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1)


def decode_seconds_per_token(step, tokens: int, repeats: int) -> float:
    """Median over `repeats` runs of the mean time of `tokens` decode steps."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(tokens):
            step(i)
        runs.append((time.perf_counter() - start) / tokens)
    return statistics.median(runs)


def measure(num_experts: int, workdir: Path, tokens: int, repeats: int) -> dict:
    import torch

    family = FAMILIES["qwen3_moe"]
    cfg = Qwen3MoeConfig(**BASE, num_experts=num_experts)
    spec = ModelSpec(f"moe-{num_experts}e", family, cfg, source="bench")
    ckpt = write_random_checkpoint(spec, workdir / f"ckpt{num_experts}", seed=0, std=0.1)
    library = workdir / f"lib{num_experts}"
    qcompile.compile_model(ckpt, out=library, max_seq_len=256, log=lambda _m: None)
    ours = qcompile.load(library, weights=ckpt)
    prompt = np.arange(1, 17)

    ours.prefill(prompt)
    ours_s = decode_seconds_per_token(lambda i: ours.decode(100 + i), tokens, repeats)

    hf = reference.load_causal_lm(ckpt)
    with torch.no_grad():
        cache = hf(torch.tensor(prompt[None]), use_cache=True).past_key_values
        state = {"cache": cache}

        def hf_step(i):
            out = hf(torch.tensor([[100 + i]]), past_key_values=state["cache"], use_cache=True)
            state["cache"] = out.past_key_values

        hf_s = decode_seconds_per_token(hf_step, tokens, repeats)
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4 * cfg.num_hidden_layers
    return {"num_experts": num_experts, "qcompile_ms_per_token": ours_s * 1e3,
            "transformers_ms_per_token": hf_s * 1e3,
            "sparse_expert_mb_per_token": cfg.num_experts_per_tok * expert_bytes / 1e6,
            "dense_expert_mb_per_token": num_experts * expert_bytes / 1e6,
            "parameters": ours.manifest["parameter_count"],
            "active_parameters": ours.manifest["active_parameter_count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per run (32)")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the median is reported (5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(e, Path(tmp), args.tokens, args.repeats) for e in (8, 64)]
    small, large = rows
    ratio = large["qcompile_ms_per_token"] / small["qcompile_ms_per_token"]
    hf_ratio = large["transformers_ms_per_token"] / small["transformers_ms_per_token"]
    dense_ratio = large["dense_expert_mb_per_token"] / small["dense_expert_mb_per_token"]
    if args.json:
        print(json.dumps({"rows": rows, "qcompile_ratio": ratio, "transformers_ratio": hf_ratio,
                          "dense_expert_bytes_ratio": dense_ratio}, indent=2))
        return
    print(f"qwen3_moe decode, batch 1, float32, {BASE['num_hidden_layers']} sparse layers, hidden "
          f"{BASE['hidden_size']}, top-{BASE['num_experts_per_tok']}; median of {args.repeats} runs x "
          f"{args.tokens} tokens (untuned CPU kernels)")
    print(f"{'experts':>8} {'params':>12} {'active':>12} {'qcompile ms/tok':>16} {'transformers ms/tok':>20} "
          f"{'expert MB/tok sparse':>21} {'dense':>8}")
    for r in rows:
        print(f"{r['num_experts']:>8} {r['parameters']:>12,} {r['active_parameters']:>12,} "
              f"{r['qcompile_ms_per_token']:>16.2f} {r['transformers_ms_per_token']:>20.2f} "
              f"{r['sparse_expert_mb_per_token']:>21.1f} {r['dense_expert_mb_per_token']:>8.1f}")
    print(f"64 vs 8 experts: qcompile x{ratio:.2f}, transformers eager x{hf_ratio:.2f}; a dense "
          f"over-all-experts block would read x{dense_ratio:.0f} the expert bytes")


if __name__ == "__main__":
    main()

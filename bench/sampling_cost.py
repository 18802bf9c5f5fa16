"""What choosing a token costs next to a decode step, on Qwen's 151,936 logits.

Two figures per sampling setting, medians over many tokens:
- sampler: penalties, temperature, top-k, top-p, min-p and the draw (`run.sampling.Sampler`);
- per token in generate(): everything `run.generation.generate` does per token except the model call
  (the sampler, streaming detokenisation with Qwen's real tokenizer, stop-string checks), measured with
  a stand-in model that returns ready logits.
Each is set against a qwen2-0.5b decode step on this machine, from the committed bench output
(`qcompile/data/schedules/cpu/qwen2-0.5b/bench.txt`: qcompile tuned, and transformers eager, the faster).
The budget is 5% of a step. Logits: "peaked" (a trained model's shape: a few tokens stand out; a real
model's usual case) and "flat" (a random-weight model's: top-p must keep most of the vocabulary).

    .venv/bin/python bench/sampling_cost.py [--tokens 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from qcompile.atomic import write_json
from qcompile.run import qwen_vocab
from qcompile.run.generation import SamplingParams, generate
from qcompile.run.sampling import Sampler
from qcompile.run.tokenizer import Tokenizer

VOCAB = 151936
SETTINGS = {
    "greedy": dict(),
    "greedy + repetition/presence/frequency penalties": dict(repetition_penalty=1.1, presence_penalty=0.5,
                                                             frequency_penalty=0.5),
    "T 0.7, top-k 20, top-p 0.8, rep 1.05 (Qwen2's defaults)": dict(temperature=0.7, top_k=20, top_p=0.8,
                                                                     repetition_penalty=1.05),
    "T 1.0, top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "T 1.0, min-p 0.05": dict(temperature=1.0, min_p=0.05),
    "T 1.0, no filter (draw over all 151,936)": dict(temperature=1.0),
}


def logits_rows(kind: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    rows = []
    for _ in range(count):
        x = rng.standard_normal(VOCAB) * (2.0 if kind == "peaked" else 0.3)
        if kind == "peaked":
            x[rng.choice(VOCAB, 40, replace=False)] += rng.uniform(6, 14, 40)
        rows.append(x.astype(np.float32))
    return rows


def decode_step_ms() -> dict[str, float]:
    """ms per decode step of qwen2-0.5b per engine, from the committed bench output."""
    text = (resources.files("qcompile.data") / "schedules" / "cpu" / "qwen2-0.5b" / "bench.txt").read_text()
    report = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
    return {name: 1e3 / engine["decode_tokens_per_s"] for name, engine in report["engines"].items()
            if name in ("qcompile-tuned", "torch-eager")}


class ReadyLogits:
    """A stand-in decoder: prefill and decode return logits already in memory (no model work)."""

    def __init__(self, rows: list[np.ndarray]):
        self.rows, self.step = rows, 0
        self.max_seq_len, self.vocab_size = 1 << 20, VOCAB
        self.spec = type("Spec", (), {"name": "ready-logits"})()

    def prefill(self, ids):
        return self.rows[0][None]

    def decode(self, token):
        self.step += 1
        return self.rows[self.step % len(self.rows)]


def sampler_us(params: SamplingParams, rows: list[np.ndarray], history: list[int]) -> float:
    sampler = Sampler(params, history, VOCAB)
    for token in history[-256:]:
        sampler._record(token)  # a generation already under way: the penalties have work to do
    times = []
    for row in rows:
        start = time.perf_counter()
        sampler(row)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def generate_us(params: SamplingParams, rows: list[np.ndarray], tokenizer: Tokenizer, tokens: int) -> float:
    """Per token, everything generate() does besides the model (its chunks timed as they come)."""
    model = ReadyLogits(rows)
    chunks = generate(model, tokenizer, [9707, 11, 1879], SamplingParams(**{
        **params.__dict__, "max_tokens": tokens, "stop": ["\n\nUser:", "###"]}))
    times, start = [], time.perf_counter()
    for _ in chunks:
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="tokens per measurement (300)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps = decode_step_ms()
    budget_ms = 0.05 * min(steps.values())
    with tempfile.TemporaryDirectory(prefix="sampling-cost-") as files:
        for name, content in qwen_vocab.checkpoint_files(VOCAB, 32768).items():
            write_json(Path(files) / name, content)
        tokenizer = Tokenizer.from_directory(Path(files))
    tokenizer.eos_token_ids = []  # run to max_tokens
    history = rng.integers(0, VOCAB, 512).tolist()
    print("qwen2-0.5b decode step here: " + ", ".join(f"{k} {v:.1f} ms" for k, v in steps.items())
          + f"; 5% of the faster = {budget_ms * 1e3:.0f} us")
    print(f"{'setting':58} {'logits':7} {'sampler us':>11} {'per token us':>13} {'of step':>8}")
    worst = 0.0
    for kind in ("peaked", "flat"):
        rows = logits_rows(kind, 64, rng)
        rows = [rows[i % len(rows)] for i in range(args.tokens)]
        for setting, fields in SETTINGS.items():
            params = SamplingParams(seed=0, **fields)
            sampler = sampler_us(params, rows, history)
            per_token = generate_us(params, rows, tokenizer, args.tokens)
            share = per_token / (min(steps.values()) * 1e3)
            worst = max(worst, share)
            print(f"{setting:58} {kind:7} {sampler:11.0f} {per_token:13.0f} {share:8.2%}")
    print(f"worst case: {worst:.2%} of a decode step (budget 5%)")


if __name__ == "__main__":
    main()

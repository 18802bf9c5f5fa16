"""Several streams at once: qcompile's continuous batching (`run.batching.Scheduler` over the library's
batch engine) beside llama.cpp's `llama-batched-bench`, on one machine, in one run.

A stream is a client that sends a request, waits for its answer, and sends the next: S streams keep up to
S requests in the batch, joining and leaving it as they start and end. Each request: a PROMPT_LEN-token
prompt (random ids, seeded), NEW_TOKENS greedy new tokens. Per stream count S:
- aggregate decode tok/s: tokens of the engine steps that only decoded / those steps' time (what the
  weights-once-per-step batching buys), and end-to-end tok/s (all new tokens / wall time, prompts included);
- per request: time to first token and latency (from its submission), p50 and p99;
- llama.cpp: `llama-batched-bench -npp PROMPT_LEN -ntg NEW_TOKENS -npl S` on a float32 GGUF of the same
  weights (its aggregate decode `S_TG t/s`; its prompts run as one batch before decoding);
- the limit: a decode step reads every weight once, so S x (read bandwidth / weight bytes) tok/s at most
  (`measure.bench.measure_machine`'s probe), ignoring compute.

    .venv/bin/python bench/concurrency.py LIBRARY --weights CKPT [--streams 1,4,8] [--requests 3]
        [--prompt-len 128] [--new-tokens 32] [--skip-llama-cpp] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import qcompile
from qcompile.atomic import atomic_file
from qcompile.errors import UserError
from qcompile.run.batching import Scheduler, engine_for
from qcompile.run.generation import Generation, SamplingParams
from qcompile.run.tokenizer import Tokenizer


class TimedEngine:
    """The engine, with each step's time and whether it only decoded (1 token per sequence) recorded."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.decode_steps: list[tuple[int, float]] = []  # (sequences, seconds) of decode-only steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def step(self, work: dict[int, list[int]]) -> dict[int, np.ndarray]:
        start = time.perf_counter()
        out = self.engine.step(work)
        if all(len(tokens) == 1 for tokens in work.values()):
            self.decode_steps.append((len(work), time.perf_counter() - start))
        return out


def run_streams(model: Any, tokenizer: Tokenizer, streams: int, requests: int, prompt_len: int,
                new_tokens: int, seed: int) -> dict[str, Any]:
    """`streams` clients x `requests` requests each through one Scheduler; the figures above."""
    engine = TimedEngine(engine_for(model, max_batch=streams))
    scheduler = Scheduler(engine)
    rng = np.random.default_rng(seed)
    params = SamplingParams.from_fields(max_tokens=new_tokens, temperature=0.0)
    done: list[dict[str, float]] = []
    left = {s: requests for s in range(streams)}

    def send(stream: int) -> None:
        left[stream] -= 1
        prompt = rng.integers(0, model.vocab_size, prompt_len).tolist()
        record = {"submitted": time.perf_counter(), "tokens": 0}

        def deliver(chunk) -> None:
            if isinstance(chunk, Exception):
                raise chunk
            if chunk.token_ids and "first" not in record:
                record["first"] = time.perf_counter()
            record["tokens"] += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                record["ended"] = time.perf_counter()
                done.append(record)
                if left[stream]:
                    send(stream)  # the client's next request, at once

        scheduler.submit(Generation(model, tokenizer, prompt, params), deliver)

    start = time.perf_counter()
    for stream in range(streams):
        send(stream)
    while not scheduler.idle():
        scheduler.step()
    wall = time.perf_counter() - start
    decode_tokens = sum(n for n, _ in engine.decode_steps)
    decode_seconds = sum(s for _, s in engine.decode_steps)
    ttft = [r["first"] - r["submitted"] for r in done]
    latency = [r["ended"] - r["submitted"] for r in done]
    return {"streams": streams, "requests": len(done), "new_tokens": sum(r["tokens"] for r in done),
            "decode_tokens_per_s": decode_tokens / decode_seconds,
            "end_to_end_tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "latency_p50": float(np.percentile(latency, 50)), "latency_p99": float(np.percentile(latency, 99))}


def llama_cpp_rows(model: Any, weights: Path, streams: list[int], prompt_len: int, new_tokens: int,
                   threads: int) -> dict[int, dict[str, Any]]:
    from qcompile.measure import llamacpp  # noqa: PLC0415

    tools = llamacpp.tools(log=lambda m: print(m, file=sys.stderr))
    if tools.batched_bench is None:
        raise UserError(f"llama.cpp at {tools.origin} has no {llamacpp.BATCHED_BENCH}; rebuild it (remove "
                        f"that directory) or pass --skip-llama-cpp")
    gguf = llamacpp.model_files(model.spec, weights, (), tools)[f"{llamacpp.ENGINE_PREFIX}f32"]
    rows = llamacpp.run_batched_bench(tool=tools.batched_bench, gguf=gguf, prompt_len=prompt_len,
                                      decode_tokens=new_tokens, streams=streams, threads=threads)
    return {row["streams"]: row for row in rows}


def table(rows: list[dict[str, Any]], peers: dict[int, dict[str, Any]], limit: float) -> str:
    one = rows[0]["decode_tokens_per_s"]
    head = ("| streams | decode tok/s (aggregate) | × 1 stream | llama.cpp decode tok/s | qcompile / llama.cpp "
            "| limit tok/s | end-to-end tok/s | TTFT p50 / p99 s | latency p50 / p99 s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peer = peers.get(r["streams"])
        lines.append("| " + " | ".join([
            str(r["streams"]), f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_tokens_per_s'] / one:.2f}×",
            f"{peer['decode_tokens_per_s']:.2f}" if peer else "-",
            f"{r['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}×" if peer else "-",
            f"{limit * r['streams']:.1f}", f"{r['end_to_end_tokens_per_s']:.2f}",
            f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}", f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("library", type=Path, help="a decoder library directory (qcompile compile -o)")
    p.add_argument("--weights", type=Path, required=True, help="its HF checkpoint (with tokenizer files)")
    p.add_argument("--streams", default="1,4,8", help="stream counts, comma-separated (1,4,8)")
    p.add_argument("--requests", type=int, default=3, help="requests per stream, one after another (3)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (128)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (32)")
    p.add_argument("--skip-llama-cpp", action="store_true", help="qcompile only")
    p.add_argument("--out", type=Path, help="also write the table (and the command) to this file, atomically")
    args = p.parse_args(argv)
    for name in ("requests", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        streams = [int(s) for s in args.streams.split(",")]
        if not streams or min(streams) < 1:
            raise ValueError
    except ValueError:
        print(f"--streams: expected positive integers separated by commas, got {args.streams!r}", file=sys.stderr)
        return 2
    try:
        from qcompile.measure.bench import measure_machine  # noqa: PLC0415
        from qcompile.run.threads import configure  # noqa: PLC0415

        threads = configure(None)
        model = qcompile.load(args.library, weights=args.weights)
        tokenizer = Tokenizer.from_directory(args.weights)
        machine = measure_machine(threads)
        weight_bytes = model.spec.kind.costs(model.spec, args.prompt_len)["decode_weight_bytes"]  # float32
        limit = machine["read_bytes_per_s"] / weight_bytes  # decode steps/s when reading bounds them
        run_streams(model, tokenizer, 1, 1, args.prompt_len, 4, seed=99)  # warm-up
        rows = [run_streams(model, tokenizer, s, args.requests, args.prompt_len, args.new_tokens, seed=s)
                for s in streams]
        peers = {} if args.skip_llama_cpp else llama_cpp_rows(model, args.weights, streams, args.prompt_len,
                                                               args.new_tokens, threads)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = (f"{model.spec.name} ({model.manifest['dtype']}), {threads} threads, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, {args.requests} requests per stream\n\n{table(rows, peers, limit)}\n")
    print(text)
    if args.out:
        command = "$ .venv/bin/python bench/concurrency.py " + " ".join(sys.argv[1:] if argv is None else argv)
        atomic_file(args.out, lambda f: f.write(f"{command}\n\n{text}".encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

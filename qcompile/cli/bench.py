"""`qcompile bench MODEL [--vs torch,llama.cpp] [--llama-quant q8_0,q4_0]`."""

from __future__ import annotations

import json
from pathlib import Path

from .. import api
from .common import MODEL_HELP, add_threads, emit_json, non_negative_int, print_table, progress


def add(sub) -> None:
    p = sub.add_parser("bench", help="speed side by side: qcompile (tuned, default schedules), transformers, llama.cpp",
                       description="One run on this machine: qcompile with the committed schedules, "
                       "qcompile with default schedules (qcompile's CPU rules only), (--vs torch) transformers eager and "
                       "torch.compile, (--vs llama.cpp) llama.cpp's llama-bench, each in its own process "
                       "on the same checkpoint (MODEL's own weights when it is a checkpoint directory, else "
                       "random weights). "
                       "Decoders: prefill latency and decode tokens/s; encoders: encode latency. Each "
                       "beside its physical limit (bytes / measured read bandwidth for decode, FLOPs / "
                       "measured matmul peak for prefill). Prints a table, then the JSON.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--target", default="cpu", help="a CPU target this machine runs (default: cpu)")
    p.add_argument("--vs", action="append", default=[], metavar="ENGINES",
                   help="also run: torch (transformers eager and torch.compile), llama.cpp (its llama-bench "
                        "on a float32 GGUF of the same weights; built once from the llama-cpp-python sdist, "
                        "or QCOMPILE_LLAMA_CPP=DIR); repeatable or comma-separated")
    p.add_argument("--llama-quant", metavar="TYPES",
                   help="with --vs llama.cpp, also these llama-quantize types, comma-separated (e.g. q8_0,q4_0)")
    p.add_argument("--quantization", metavar="SCHEME",
                   help="qcompile's weight scheme (q8, q4, bf16, f16); with --vs llama.cpp, q8 also runs "
                        "llama.cpp Q8_0 and q4 Q4_0 on the same weights")
    p.add_argument("--prompt-len", type=non_negative_int, default=128, help="prefill tokens (128)")
    p.add_argument("--decode-tokens", type=non_negative_int, default=32, help="decode steps per run (32)")
    p.add_argument("--repeats", type=non_negative_int, default=5, help="runs per figure; median (5)")
    p.add_argument("--skip", metavar="ENGINES",
                   help="engines to leave out, comma-separated (e.g. qcompile-default: minutes per run)")
    p.add_argument("--workdir", type=Path, default=Path("build/bench"),
                   help="random-weight checkpoints are kept here (build/bench)")
    p.add_argument("--profile", action="store_true",
                   help="also time one prefill, one decode step (or one encode) of each qcompile engine "
                        "kernel by kernel and print the costliest")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="JSON only")
    p.set_defaults(func=run)


def run(args) -> None:
    api.set_threads(args.threads)  # the engines' child processes inherit it
    report, header, rows, profiles = api.bench(args.model, target=args.target, vs=_names(args.vs),
                                               llama_quant=_names([args.llama_quant or ""]),
                                               prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                               repeats=args.repeats, workdir=args.workdir, log=progress(args),
                                               skip=_names([args.skip or ""]), profile=args.profile,
                                               quantization=args.quantization)
    if args.json:
        return emit_json(report)
    machine = report["machine"]
    weights = f", {report['quantization']['scheme']} weights" if report["quantization"] else ""
    print(f"{report['model']} on {report['target']}{weights}, batch 1, {machine['threads']} threads, median of "
          f"{report['repeats']} runs; "
          f"{report['tuned_kernels']} tuned kernels (database {report['tuning_database'] or 'none'})")
    probes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in machine["read_probes_bytes_per_s"].items())
    print(f"measured here: read bandwidth {machine['read_bytes_per_s'] / 1e9:.1f} GB/s (best of {probes}), "
          f"float32 matmul peak {machine['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s")
    print_table(rows, header)
    for title, profile_header, profile_rows in profiles:
        print(f"\n{title}")
        print_table(profile_rows, profile_header)
    print(json.dumps(report))


def _names(values: list[str]) -> tuple[str, ...]:
    """Repeated and comma-separated option values, in order, without repeats or blanks."""
    return tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))

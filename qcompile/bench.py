"""`qcompile bench`: one run, side by side on this machine, with the physical limit beside each result.

Engines (each measured in its own child process, one after another, so each peak RSS is its own and no
two share the cores): qcompile with the committed tuning database, qcompile with default schedules,
and with `--vs torch` transformers eager and torch.compile (when it compiles). All run the same random-
weight HF checkpoint, batch 1.

Decoders: prefill latency for a prompt of `--prompt-len` tokens, and decode tokens/s (median over
`--repeats` runs of `--decode-tokens` steps). Encoders: images/s at batch 1.
Limits, measured here: decode reads every weight a token uses once, so tokens/s <= read bandwidth /
weight bytes per token; prefill and encode do 2 FLOPs per weight per token (+ attention), so
seconds >= FLOPs / matmul peak. Each result is reported as a fraction of its limit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import api, zoo
from .errors import UserError

ENGINES = ("qcompile-tuned", "qcompile-default")
TORCH_ENGINES = ("torch-eager", "torch-compile")
ENGINE_TIMEOUT = 900  # seconds per engine (torch.compile's first compile is the slow one)


# --- physical limits ---------------------------------------------------------------------------------

def measure_machine() -> dict[str, float]:
    """Read bandwidth (bytes/s, summing a 1 GiB float32 array on all cores) and float32 matmul peak
    (FLOP/s, 2048^3), each the best of 5, with torch (multithreaded, MKL)."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    big = torch.ones(1 << 28, dtype=torch.float32)
    big.sum()
    reads = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        reads.append(big.numel() * 4 / (time.perf_counter() - start))
    a = torch.randn(2048, 2048)
    a @ a
    flops = []
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        flops.append(2 * 2048 ** 3 / (time.perf_counter() - start))
    return {"read_bytes_per_s": max(reads), "matmul_flop_per_s": max(flops)}


def decoder_costs(spec: zoo.ModelSpec, prompt_len: int, dtype_bytes: int = 4) -> dict[str, float]:
    """Weight bytes one decode step reads, and the FLOPs of a prefill of `prompt_len` tokens."""
    c = spec.config
    active = spec.family.active_parameter_count(c)
    embedding = c.vocab_size * c.hidden_size
    # The embedding table is gathered (one row a token) unless it is also the LM head (tied).
    matmul_params = active - (0 if c.tie_word_embeddings else embedding)
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim * prompt_len ** 2 / 2
    return {"decode_weight_bytes": matmul_params * dtype_bytes,
            "prefill_flops": 2 * matmul_params * prompt_len + attention}


def encoder_flops(spec: zoo.ModelSpec) -> float:
    c = spec.config
    tokens = (c.image_size // c.patch_size) ** 2 + (1 if getattr(c, "use_cls_token", True) else 0)
    params = spec.family.active_parameter_count(c)
    attention = 4 * c.num_hidden_layers * c.hidden_size * tokens ** 2
    return 2 * params * tokens + attention


# --- one engine, in a child process ---------------------------------------------------------------

def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_engine(engine: str, *, library: str | None, checkpoint: str, kind: str, prompt_len: int,
               decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Measure one engine in this process; returns its figures."""
    rng = np.random.default_rng(0)
    if engine.startswith("qcompile"):
        model = api.load(library, weights=checkpoint)
        if kind == "encoder":
            pixels = rng.standard_normal((1, *_image_shape(model.spec))).astype(np.float32)
            model.encode(pixels)
            return {"encode_seconds": _median_seconds(lambda: model.encode(pixels), repeats)}
        prompt = rng.integers(0, model.vocab_size, prompt_len)
        model.prefill(prompt)
        prefill = _median_seconds(lambda: model.prefill(prompt), repeats)

        def decode_run() -> float:
            model.prefill(prompt[:8])  # not timed: only the decode steps are
            start = time.perf_counter()
            for token in range(decode_tokens):
                model.decode(token)
            return time.perf_counter() - start
        return {"prefill_seconds": prefill,
                "decode_tokens_per_s": decode_tokens / statistics.median(decode_run() for _ in range(repeats))}
    return _run_torch(engine, checkpoint, kind, prompt_len, decode_tokens, repeats, rng)


def _image_shape(spec: zoo.ModelSpec) -> tuple[int, int, int]:
    c = spec.config
    return (c.num_channels, c.image_size, c.image_size)


def _run_torch(engine, checkpoint, kind, prompt_len, decode_tokens, repeats, rng) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from . import reference  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    if kind == "encoder":
        model = reference.load_vision_model(Path(checkpoint))
    else:
        model = reference.load_causal_lm(Path(checkpoint))
    if engine == "torch-compile":
        model.forward = torch.compile(model.forward, dynamic=True)
    with torch.no_grad():
        if kind == "encoder":
            spec = zoo.resolve_model(checkpoint)
            pixels = torch.tensor(rng.standard_normal((1, *_image_shape(spec))).astype(np.float32))
            model(pixel_values=pixels)
            return {"encode_seconds": _median_seconds(lambda: model(pixel_values=pixels), repeats)}
        prompt = torch.tensor(rng.integers(0, model.config.vocab_size, prompt_len)[None])
        model(prompt)
        prefill = _median_seconds(lambda: model(prompt), repeats)

        def decode_run() -> float:
            past = model(prompt[:, :8], use_cache=True).past_key_values  # not timed
            token, start = torch.tensor([[1]]), time.perf_counter()
            for _ in range(decode_tokens):
                past = model(token, past_key_values=past, use_cache=True).past_key_values
            return time.perf_counter() - start
        decode_run()  # warm (torch.compile specialises on the first decode shapes)
        return {"prefill_seconds": prefill,
                "decode_tokens_per_s": decode_tokens / statistics.median(decode_run() for _ in range(repeats))}


def _child(engine: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh Python: its figures (with its own peak RSS), or its error."""
    command = [sys.executable, "-m", "qcompile.bench", engine, json.dumps(args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {ENGINE_TIMEOUT} s"}
    if done.returncode != 0:
        return {"error": ((done.stderr.strip().splitlines() or ["no output"])[-1])[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the whole comparison ---------------------------------------------------------------------------

def bench(model: str, *, target: str = "cpu", vs_torch: bool = False, prompt_len: int = 128,
          decode_tokens: int = 32, repeats: int = 5, workdir: Path = Path("build/bench"),
          skip: tuple[str, ...] = (), log=print) -> dict[str, Any]:
    """Build both libraries (registry: reused when unchanged), write random weights once, measure."""
    spec = zoo.resolve_model(model)
    if repeats < 1 or decode_tokens < 1:
        raise UserError("--repeats and --decode-tokens must be >= 1")
    if spec.family.kind == "decoder" and not 8 <= prompt_len <= spec.config.max_position_embeddings - decode_tokens - 8:
        raise UserError(f"--prompt-len must be in 8..{spec.config.max_position_embeddings - decode_tokens - 8} "
                        f"for {spec.name}")
    if target != "cpu":
        raise UserError(f"bench runs on this machine's CPU; target '{target}' needs its device")
    kind = spec.family.kind
    checkpoint = Path(workdir) / spec.name / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        log(f"writing random weights for {spec.name} to {checkpoint}")
        api.init_weights(model, out=checkpoint)
    libraries = {}
    for engine, use in (("qcompile-tuned", True), ("qcompile-default", False)):
        log(f"building {engine} (registry; reused when unchanged)")
        entry, _ = api.register_model(model, target=target, use_schedules=use, log=lambda _m: None)
        libraries[engine] = entry
    tuned_db = libraries["qcompile-tuned"].manifest.get("tuning_database")
    log("measuring read bandwidth and matmul peak")
    machine = measure_machine()
    args = {"checkpoint": str(checkpoint), "kind": kind, "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "repeats": repeats}
    results = {}
    engines = [e for e in ENGINES + (TORCH_ENGINES if vs_torch else ()) if e not in skip]
    if set(skip) - set(ENGINES + TORCH_ENGINES):
        raise UserError(f"--skip: unknown engine(s) {sorted(set(skip) - set(ENGINES + TORCH_ENGINES))}")
    for engine in engines:
        log(f"running {engine}")
        library = str(libraries[engine].path) if engine in libraries else None
        results[engine] = _child(engine, {**args, "library": library})
    limits = _limits(spec, kind, prompt_len, machine)
    for figures in results.values():
        _add_fractions(figures, limits)
    return {"model": spec.name, "target": target, "kind": kind, "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "repeats": repeats, "machine": machine, "limits": limits,
            "tuning_database": tuned_db["sha256"] if tuned_db else None,
            "tuned_kernels": len(tuned_db["kernels"]["tuned"]) if tuned_db else 0, "engines": results}


def _limits(spec, kind, prompt_len, machine) -> dict[str, float]:
    if kind == "encoder":
        return {"encode_seconds": encoder_flops(spec) / machine["matmul_flop_per_s"]}
    costs = decoder_costs(spec, prompt_len)
    return {"decode_tokens_per_s": machine["read_bytes_per_s"] / costs["decode_weight_bytes"],
            "prefill_seconds": costs["prefill_flops"] / machine["matmul_flop_per_s"], **costs}


def _add_fractions(figures: dict[str, Any], limits: dict[str, float]) -> None:
    if "decode_tokens_per_s" in figures:
        figures["decode_fraction_of_limit"] = figures["decode_tokens_per_s"] / limits["decode_tokens_per_s"]
    for key in ("prefill_seconds", "encode_seconds"):
        if key in figures:
            figures[key.replace("seconds", "fraction_of_limit")] = limits[key] / figures[key]


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    limits = report["limits"]
    if report["kind"] == "encoder":
        header = ["ENGINE", "ENCODE ms", "OF LIMIT", "PEAK RSS MB"]
        rows = [[e, f"{f['encode_seconds'] * 1e3:.1f}", f"{f['encode_fraction_of_limit']:.0%}",
                 _mb(f)] if "error" not in f else [e, f["error"], "", ""] for e, f in report["engines"].items()]
        rows.append(["limit (FLOPs / matmul peak)", f"{limits['encode_seconds'] * 1e3:.1f}", "100%", ""])
        return header, rows
    header = ["ENGINE", f"PREFILL {report['prompt_len']} ms", "OF LIMIT", "DECODE tok/s", "OF LIMIT",
              "PEAK RSS MB"]
    rows = []
    for engine, f in report["engines"].items():
        if "error" in f:
            rows.append([engine, f"failed: {f['error']}", "", "", "", ""])
            continue
        rows.append([engine, f"{f['prefill_seconds'] * 1e3:.0f}", f"{f['prefill_fraction_of_limit']:.0%}",
                     f"{f['decode_tokens_per_s']:.2f}", f"{f['decode_fraction_of_limit']:.0%}", _mb(f)])
    rows.append(["limit", f"{limits['prefill_seconds'] * 1e3:.0f}", "FLOPs/peak",
                 f"{limits['decode_tokens_per_s']:.2f}", "bytes/bandwidth", ""])
    return header, rows


def _mb(figures: dict[str, Any]) -> str:
    return f"{figures['peak_rss_bytes'] / 2 ** 20:.0f}" if figures.get("peak_rss_bytes") else "-"


if __name__ == "__main__":  # the child process of `_child`
    engine_name, engine_args = sys.argv[1], json.loads(sys.argv[2])
    figures = run_engine(engine_name, **engine_args)
    # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over execve)
    status = Path("/proc/self/status").read_text()
    figures["peak_rss_bytes"] = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps(figures))

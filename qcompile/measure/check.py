"""`qcompile check`: the cross-backend regression harness over (model, target) pairs.

Per pair: build the library (device code checked at build time), run it where this machine can (the
target's `availability`), and compare its outputs on a random prompt (decoders: the prompt's logits;
encoders: last_hidden_state of one random image) against transformers and against the float32 CPU
library of the same model. The target file's tier for the dtype decides pass/fail:
  max_rel_diff    max |ours - reference| / max |reference|      (every dtype)
  top1_agreement  fraction of positions whose argmax agrees      (16-bit dtypes, decoders)
  kl              mean KL(softmax(reference) || softmax(ours))   (16-bit dtypes, decoders)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import api
from ..spec.model import resolve_model
from ..spec.target import DEFAULT_TARGET, availability, load_target

PROMPT_LEN = 24  # decoders: random prompt tokens; encoders: one random image


def compare(ours: np.ndarray, ref: np.ndarray, *, logits: bool) -> dict[str, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    metrics = {"max_rel_diff": float(np.abs(ours - ref).max() / np.abs(ref).max())}
    if logits:
        metrics["top1_agreement"] = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
        log_p, log_q = _log_softmax(ref), _log_softmax(ours)
        metrics["kl"] = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return metrics


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def within(metrics: dict[str, float], tier: dict[str, float]) -> list[str]:
    """The metrics outside the tier (empty: pass)."""
    failed = []
    for name, value in metrics.items():
        limit = tier.get(name)
        if limit is not None and (value < limit if name == "top1_agreement" else value > limit):
            failed.append(f"{name} {value:.3g} (tier {limit:g})")
    return failed


def _run_ours(library: Path, checkpoint: Path, inputs: np.ndarray) -> np.ndarray:
    model = api.load(library, weights=checkpoint)
    return model.spec.kind.outputs(model, inputs)


def check_pair(model: str, target: str, *, workdir: Path, dtype: str | None = None,
               log=print) -> dict[str, Any]:
    """Build MODEL for TARGET, run and compare where possible; a dict of what happened."""
    spec, target_spec = resolve_model(model), load_target(target)
    dtype = dtype or target_spec.dtype
    row: dict[str, Any] = {"model": spec.name, "target": target, "dtype": dtype}
    library = Path(workdir) / f"{spec.name}--{target}--{dtype}"
    start = time.perf_counter()
    manifest = api.compile_model(model, target=target, out=library, dtype=dtype, log=lambda _m: None)
    row["built"] = {"seconds": round(time.perf_counter() - start, 1), "device_code": manifest["device_code"]}
    log(f"{spec.name} / {target} / {dtype}: built in {row['built']['seconds']} s")
    runnable, why = availability(target_spec)["run"]
    if not runnable:
        row["ran"] = {"ok": False, "why": why}
        return row
    checkpoint = Path(workdir) / f"{spec.name}--weights"
    if not (checkpoint / "config.json").is_file():
        api.init_weights(model, out=checkpoint)
    kind = spec.kind
    inputs = kind.random_inputs(spec, np.random.default_rng(0), PROMPT_LEN if kind.has_sequence else 1)
    ours = _run_ours(library, checkpoint, inputs)
    row["ran"] = {"ok": True}
    logits = kind.outputs_logits
    tier = target_spec.tolerance.get(dtype)
    row["vs_transformers"] = compare(ours, kind.reference_outputs(checkpoint, inputs), logits=logits)
    if not (target_spec.device == "cpu" and dtype == "float32"):  # else it is a CPU float32 library itself
        cpu_library = Path(workdir) / f"{spec.name}--{DEFAULT_TARGET}--float32"
        if not (cpu_library / "manifest.json").is_file():
            api.compile_model(model, target=DEFAULT_TARGET, out=cpu_library, dtype="float32",
                              log=lambda _m: None)
        row["vs_cpu_float32"] = compare(ours, _run_ours(cpu_library, checkpoint, inputs), logits=logits)
    row["tier"] = tier
    row["failed"] = within(row["vs_transformers"], tier) if tier else [f"no tier for {dtype} in {target}"]
    return row


def run(models: list[str], target_names: list[str], *, workdir: Path, dtype: str | None = None,
        log=print) -> list[dict[str, Any]]:
    os.makedirs(workdir, exist_ok=True)
    return [check_pair(m, t, workdir=workdir, dtype=dtype, log=log) for m in models for t in target_names]

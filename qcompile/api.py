"""The Python entry points; the CLI is a thin front over these. MODEL is a zoo name or an HF directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import pipeline, runtime, targets, weights, zoo


def compile_model(model: str | os.PathLike, *, target: str = "cpu", out: str | os.PathLike,
                  dtype: str | None = None, max_seq_len: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build MODEL for TARGET into library directory OUT (atomic); returns the manifest."""
    spec = zoo.resolve_model(model)
    return pipeline.compile_model(spec, targets.load_target(target), Path(out), dtype=dtype,
                                  max_seq_len=max_seq_len, log=log)


def init_weights(model: str | os.PathLike, *, out: str | os.PathLike, seed: int = 0, std: float = 0.15,
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight HF checkpoint (config.json + safetensors) for MODEL to OUT (atomic)."""
    return weights.write_random_checkpoint(zoo.resolve_model(model), Path(out), seed=seed, std=std,
                                           max_shard_bytes=max_shard_bytes)


def load(directory: str | os.PathLike, *, weights: str | os.PathLike) -> runtime.Decoder:
    """Open a verified library directory with an HF checkpoint's weights."""
    return runtime.load(directory, weights=weights)


def list_models() -> dict[str, zoo.ModelSpec]:
    return zoo.load_zoo()


def show_model(model: str | os.PathLike) -> dict[str, Any]:
    return zoo.model_summary(zoo.resolve_model(model))


def list_targets() -> dict[str, targets.TargetSpec]:
    return targets.list_targets()

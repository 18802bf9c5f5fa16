"""The Python entry points; the CLI is a thin front over these. MODEL is a zoo name or an HF directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import pipeline, registry, runtime, targets, weights, zoo
from .atomic import atomic_dir
from .errors import UserError


def _plan(model, target: str, dtype: str | None, max_seq_len: int | None,
          schedules: str | os.PathLike | None = None, use_schedules: bool = True) -> pipeline.BuildPlan:
    return pipeline.plan_build(zoo.resolve_model(model), targets.load_target(target), dtype=dtype,
                               max_seq_len=max_seq_len, use_schedules=use_schedules,
                               schedules=Path(schedules) if schedules is not None else None)


def compile_model(model: str | os.PathLike, *, target: str = "cpu", out: str | os.PathLike,
                  dtype: str | None = None, max_seq_len: int | None = None,
                  schedules: str | os.PathLike | None = None, use_schedules: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build MODEL for TARGET into library directory OUT (atomic); returns the manifest. Kernels come
    from the tuning database SCHEDULES (default: the target's committed ones) unless use_schedules is
    False; kernels without a record get default schedules."""
    plan = _plan(model, target, dtype, max_seq_len, schedules, use_schedules)
    with atomic_dir(Path(out), replaceable=pipeline.is_library_dir) as tmp:
        return pipeline.write_library(plan, tmp, log=log)


def register_model(model: str | os.PathLike, *, target: str = "cpu", dtype: str | None = None,
                   max_seq_len: int | None = None, copy_to: str | os.PathLike | None = None,
                   schedules: str | os.PathLike | None = None, use_schedules: bool = True,
                   log: Callable[[str], None] = print) -> tuple[registry.Entry, bool]:
    """Build MODEL for TARGET into the registry unless an identical build is there; optionally copy the
    entry to a library directory COPY_TO (atomic). Returns (the entry, whether it was built now)."""
    plan = _plan(model, target, dtype, max_seq_len, schedules, use_schedules)
    store = registry.Registry()
    key, built, lock_fd = store.publish(plan, log=log)
    try:  # the shared lock keeps gc away while we read and copy
        entry = store.entry(key)
        if copy_to is not None:
            with atomic_dir(Path(copy_to), replaceable=pipeline.is_library_dir) as tmp:
                for name in (pipeline.LIBRARY, pipeline.MANIFEST):
                    shutil.copy2(entry.path / name, tmp / name)
    finally:
        os.close(lock_fd)
    return entry, built


def tune(model: str | os.PathLike, *, target: str = "cpu", trials: int = 64,
         schedules: str | os.PathLike | None = None, rpc: str | None = None, dtype: str | None = None,
         kernels: str | None = None, functions: list[str] | None = None,
         log: Callable[[str], None] = print, show_progress: bool = True) -> dict[str, Any]:
    """MetaSchedule-tune MODEL's static-shape kernels for TARGET to TRIALS records each (resuming what
    SCHEDULES, default schedules/<target>/<model>/, holds). Returns the per-kernel report."""
    from . import tuning  # noqa: PLC0415

    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    plan = _plan(model, target, dtype, None, use_schedules=False)
    return tuning.tune(plan, trials=trials, directory=Path(schedules) if schedules else None, rpc=rpc,
                       kernels=kernels, functions=functions, log=log, show_progress=show_progress)


def init_weights(model: str | os.PathLike, *, out: str | os.PathLike, seed: int = 0, std: float = 0.15,
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight HF checkpoint (config.json + safetensors) for MODEL to OUT (atomic)."""
    return weights.write_random_checkpoint(zoo.resolve_model(model), Path(out), seed=seed, std=std,
                                           max_shard_bytes=max_shard_bytes)


def load(directory: str | os.PathLike | None = None, *, weights: str | os.PathLike,
         model: str | os.PathLike | None = None, target: str = "cpu", dtype: str | None = None,
         max_seq_len: int | None = None) -> runtime.Decoder:
    """Open a verified library with an HF checkpoint's weights: a library DIRECTORY, or the registry's
    entry for MODEL built for TARGET with the same options (held in use until `.close()`)."""
    if (directory is None) == (model is None):
        raise UserError("load: give either a library directory or model=")
    if directory is not None:
        return runtime.load(directory, weights=weights)
    plan = _plan(model, target, dtype, max_seq_len)
    path, fd = registry.Registry().open_for_load(registry.key_of(plan.identity()),
                                                 what=f"{plan.spec.name} for {target}")
    try:
        return runtime.load(path, weights=weights, lock_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def list_models() -> dict[str, zoo.ModelSpec]:
    return zoo.load_zoo()


def show_model(model: str | os.PathLike) -> dict[str, Any]:
    return zoo.model_summary(zoo.resolve_model(model))


def list_targets() -> dict[str, targets.TargetSpec]:
    return targets.list_targets()

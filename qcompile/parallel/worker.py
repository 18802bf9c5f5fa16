"""What each Disco worker does for itself, and the worker processes' entry point.

Workers are numbered stage-major: worker w holds tensor-parallel shard w % N of pipeline stage w // N (N
shards a stage; Disco's worker groups are the stages). `python -m qcompile.parallel.worker ID N GROUPS
READ_FD WRITE_FD` is what a ProcessSession started with `entrypoint="qcompile.parallel.worker"` runs for
workers 1..; worker 0 is a thread of the controller process, which imports this module too, so every
worker has the same functions:

  qcompile.parallel.load_module(private_dir, n_shards) -> its stage's VM module (private_dir/stage<s>/model.so)
  qcompile.parallel.load_shard(library_dir, weights_dir) -> [Tensor]: its stage's parameters, read as its
      shard's slices of the HF checkpoint (never a full copy of a split tensor), on its device
  qcompile.parallel.empty_cache(library_dir) -> [Tensor]: its stage's layers' KV buffers (its share
      of the kv heads)
  qcompile.parallel.step(module, function, inputs, position, cache, params, ...) -> [logits, cache]:
      one call of its stage's entry point, the hidden state received from the previous stage and sent to
      the next (Disco's point-to-point builtins); worker 0 ends with the logits
  qcompile.parallel.failure(result) -> str: the UserError a function returned instead of raising it
and, on a CPU session, the gloo bridge (`bridge`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tvm_ffi import Shape, get_global_func, register_global_func

from ..build.library import read_manifest
from ..errors import UserError
from ..run import tvm_runtime
from ..run.weights import load_parameters, parameter_specs
from ..spec.model import ModelSpec
from . import shards


def _worker() -> int:
    return int(get_global_func("runtime.disco.worker_rank")())


def _device() -> Any:
    """The worker's device: the CPU, or the GPU `init_ccl` bound it to."""
    return get_global_func("runtime.disco.device")()


def _place(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(stage, shard within the stage, shards per stage) of this worker."""
    n = (manifest.get("parallel") or {}).get("tensor_parallel", 1)
    return _worker() // n, _worker() % n, n


def _stage_record(manifest: dict[str, Any], stage: int) -> dict[str, Any] | None:
    pipeline = manifest.get("pipeline")
    return pipeline["stages"][stage] if pipeline else None


def _user_errors_returned(func):
    """A UserError (a bad checkpoint, say) is returned as its message: raised inside a Disco worker it would
    abort the process. The controller reads each worker's `failure` and raises it there."""
    @functools.wraps(func)
    def run(*args):
        try:
            return func(*args)
        except UserError as e:
            return str(e)
    return run


@register_global_func("qcompile.parallel.failure", override=True)
def failure(result: Any) -> str:
    return result if isinstance(result, str) else ""


@register_global_func("qcompile.parallel.load_module", override=True)
def load_module(private_dir: str, n_shards: int) -> Any:
    stage = _worker() // n_shards
    return get_global_func("runtime.disco.load_vm_module")(str(Path(private_dir) / f"stage{stage}" / "model.so"),
                                                          None)


@register_global_func("qcompile.parallel.load_shard", override=True)
@_user_errors_returned
def load_shard(library: str, weights: str) -> list[Any] | str:
    manifest = read_manifest(Path(library))
    spec, split = ModelSpec.from_manifest(manifest), shards.from_manifest(manifest)
    stage, shard, _ = _place(manifest)
    params = parameter_specs(manifest)
    record = _stage_record(manifest, stage)
    if record is not None:
        params = params[slice(*record["parameter_range"])]
    slicing = (lambda name, shape: split.tensor_slice(name, shape, shard)) if split else None
    rt, device = tvm_runtime.runtime(), _device()
    return [rt.tensor(a, device) for a in load_parameters(spec, Path(weights), params, shard=slicing)]


@register_global_func("qcompile.parallel.empty_cache", override=True)
def empty_cache(library: str) -> list[Any]:
    """Its stage's layers' KV buffers (k, v per layer; [slots, kv_heads / shards, head_dim] as the manifest's
    `kv_cache` says), uninitialised: the entry points write them in place."""
    manifest = read_manifest(Path(library))
    cache = manifest["kv_cache"]  # rows per shard: the build records one shard's kv heads
    record = _stage_record(manifest, _place(manifest)[0])
    layers = cache["layers"][record["layers"][0]:record["layers"][1]] if record else cache["layers"]
    rt, device = tvm_runtime.runtime(), _device()
    return [rt.empty((layer["slots"], *cache["row"]), cache["dtype"], device) for layer in layers for _ in "kv"]


@register_global_func("qcompile.parallel.step", override=True)
def step(module: Any, function: str, inputs: Any, position: int, cache: Any, params: Any, n_shards: int,
         n_stages: int, hidden: int, vocab: int, dtype: str) -> list[Any]:
    """One call of this worker's stage: inputs (token ids [n]) -> [logits on worker 0 (else None), cache].
    A stage after the first receives the hidden state [n, hidden] from its counterpart in the previous
    stage; a stage before the last sends its output on; the last stage's first shard sends the logits
    to worker 0."""
    rt, device = tvm_runtime.runtime(), _device()
    stage, n = _worker() // n_shards, int(inputs.shape[0])
    x = inputs
    if stage > 0:
        x = rt.tensor(np.zeros((n, hidden), dtype), device)
        get_global_func("runtime.disco.recv_from_prev_group")(x)
    out, cache = module[function](x, Shape([position]), cache, params)  # writes the cache in place
    if stage < n_stages - 1:
        get_global_func("runtime.disco.send_to_next_group")(out)
        out = None
    if n_stages > 1:
        last = (n_stages - 1) * n_shards  # the last stage's first shard
        if _worker() == last:
            get_global_func("runtime.disco.send_to_worker")(out, 0)
        elif _worker() == 0:
            out = rt.tensor(np.zeros((n, vocab), np.float32), device)
            get_global_func("runtime.disco.recv_from_worker")(out, last)
    return [out, cache]


def main() -> None:
    """A worker process: TVM's Disco worker loop, after this module's registrations (and the gloo
    bridge's, when torch is there: the controller checks it is before a CPU session starts)."""
    tvm_runtime.runtime()  # full TVM (the Disco worker loop, the VM), from $TVM_LIBRARY_PATH if set

    try:
        from . import bridge  # noqa: F401, PLC0415
    except ImportError:
        pass
    worker_id, num_workers, num_groups, reader, writer = map(int, sys.argv[1:6])
    get_global_func("runtime.disco.WorkerProcess")(worker_id, num_workers, num_groups, reader, writer)


if __name__ == "__main__":
    main()

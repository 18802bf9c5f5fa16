"""What each Disco worker does for itself, and the worker processes' entry point.

`python -m qcompile.parallel.worker ID N GROUPS READ_FD WRITE_FD` is what a ProcessSession started with
`entrypoint="qcompile.parallel.worker"` runs for workers 1..N-1 (TVM's own `tvm.exec.disco_worker` plus
this module's registrations). Worker 0 is a thread of the controller process, which imports this module
too, so every worker has the same functions:

  qcompile.parallel.load_shard(library_dir, weights_dir) -> [Tensor]: this worker's parameters, read as
      its slices of the HF checkpoint (never a full copy of a split tensor), on its device
  qcompile.parallel.empty_cache(library_dir) -> [Tensor]: its empty KV cache (its share of the kv heads)
  qcompile.parallel.failure(result) -> str: the UserError a function returned instead of raising it
  and, on a CPU session, the gloo bridge (`bridge`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tvm_ffi import get_global_func, register_global_func

from ..build.library import read_manifest
from ..errors import UserError
from ..run import tvm_runtime
from ..run.weights import load_parameters
from ..spec.model import ModelSpec
from . import shards


def _rank() -> int:
    return int(get_global_func("runtime.disco.worker_rank")())


def _device() -> Any:
    """The worker's device: the CPU, or the GPU `init_ccl` bound it to."""
    return get_global_func("runtime.disco.device")()


def _user_errors_returned(func):
    """A UserError (a bad checkpoint, say) is returned as its message: raised inside a Disco worker it would
    abort the process. The controller reads each worker's `failure` and raises it there."""
    def run(*args):
        try:
            return func(*args)
        except UserError as e:
            return str(e)
    return run


@register_global_func("qcompile.parallel.failure", override=True)
def failure(result: Any) -> str:
    """The message a worker function returned instead of its result ("" if it succeeded)."""
    return result if isinstance(result, str) else ""


@register_global_func("qcompile.parallel.load_shard", override=True)
@_user_errors_returned
def load_shard(library: str, weights: str) -> list[Any] | str:
    manifest = read_manifest(Path(library))
    spec, split, rank = ModelSpec.from_manifest(manifest), shards.from_manifest(manifest), _rank()
    params = [(p["name"], p["shape"], p["dtype"]) for p in manifest["parameters"]]
    rt, device = tvm_runtime.runtime(), _device()
    return [rt.tensor(a, device) for a in load_parameters(
        spec, Path(weights), params, shard=lambda name, shape: split.tensor_slice(name, shape, rank))]


@register_global_func("qcompile.parallel.empty_cache", override=True)
def empty_cache(library: str) -> list[Any]:
    """2 * layers empty tensors [0, kv_heads / shards, head_dim] (k0, v0, k1, ...), the library's dtype."""
    import numpy as np  # noqa: PLC0415

    manifest = read_manifest(Path(library))
    config = ModelSpec.from_manifest(manifest).config
    shard = shards.from_manifest(manifest).shard_config(config)
    entry = np.zeros((0, shard.num_key_value_heads, shard.resolved_head_dim), manifest["dtype"])
    rt, device = tvm_runtime.runtime(), _device()
    return [rt.tensor(entry, device) for _ in range(2 * config.num_hidden_layers)]


def main() -> None:
    """A worker process: TVM's Disco worker loop, after this module's registrations (and the gloo
    bridge's, when torch is there: the controller checks it is before a CPU session starts)."""
    import tvm  # noqa: F401, PLC0415 (full TVM: the Disco worker loop and the VM)

    try:
        from . import bridge  # noqa: F401, PLC0415
    except ImportError:
        pass
    worker_id, num_workers, num_groups, reader, writer = map(int, sys.argv[1:6])
    get_global_func("runtime.disco.WorkerProcess")(worker_id, num_workers, num_groups, reader, writer)


if __name__ == "__main__":
    main()

"""A split library (tensor-parallel shards x pipeline stages) run on TVM's distributed runtime: a Disco
ProcessSession of N x S workers, stage-major (worker w: shard w % N of stage w // N; Disco's worker groups
are the stages). Each worker holds its stage's parameters as its shard's slices, its share of its stage's
KV cache, and its stage's shared object. The collectives are the runtime's (NCCL / RCCL on GPUs; on the
CPU, torch's gloo through `bridge`).

The controller (this process, which also hosts worker 0) broadcasts the token ids, has every worker run
one step of its stage (`worker.step`: hidden states passed stage to stage), and reads the logits from
worker 0, to which the last stage sends them. Within a stage every shard ends with the whole hidden state
(the last all-reduce); norm and LM head are replicated.
"""

from __future__ import annotations

import importlib
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from ..errors import UserError
from ..run.runtime import Decoder, _check_checkpoint_matches, verify_library
from . import shards

# The collective each GPU kind's runtime must have been built with (`runtime.disco.compiled_ccl`).
GPU_COLLECTIVE = {"cuda": "nccl", "rocm": "rccl"}
BUILD_SCRIPT = "scripts/build-tvm-runtime-nccl.sh"
_EXIST = 0  # runtime.GetDeviceAttr: whether device i exists


def collective(directory: Path, device: str, workers: int) -> str | None:
    """The collective a session for this library uses: the runtime's NCCL / RCCL on GPUs, None on the CPU
    (the gloo bridge). A UserError saying what is missing and how to get it otherwise."""
    where = f"{directory}: a split {device} library ({workers} workers)"
    if device == "cpu":
        try:
            import torch.distributed as dist  # noqa: PLC0415
        except ImportError:
            dist = None
        if dist is None or not dist.is_available() or not dist.is_gloo_available():
            raise UserError(f"{where} runs its collectives on torch.distributed's gloo; install torch "
                            "(pip install torch)")
        return None
    needed = GPU_COLLECTIVE[device]
    compiled = tvm_ffi.get_global_func("runtime.disco.compiled_ccl", allow_missing=True)
    have = compiled() if compiled is not None else None
    if have != needed:
        raise UserError(f"{where} needs a TVM runtime built with {needed.upper()} (this one has "
                        f"{have or 'no collective'}); build one with {BUILD_SCRIPT} and set TVM_LIBRARY_PATH "
                        "to its output")
    attr = tvm_ffi.get_global_func("runtime.GetDeviceAttr")
    kind = tvm_ffi.device(device, 0).dlpack_device_type()
    found = sum(bool(attr(kind, i, _EXIST)) for i in range(workers))
    if found < workers:
        raise UserError(f"{where} needs {workers} {device} devices (one per worker); this machine has {found}")
    return needed


def _disco() -> Any:
    """TVM's Disco Python module (needs full TVM: the compiler package carries Disco's Python side).

    `import tvm` tries it before the library that registers Disco's functions is loaded, fails, and
    leaves `tvm.runtime.disco._ffi_api` behind without them (so `tvm.runtime.disco` is None; see
    ../shared/notes/tvm-0.27.md). Once tvm is imported the functions exist: the stale half-import is
    dropped and Disco imported again."""
    try:
        import tvm  # noqa: PLC0415

        if tvm.runtime.disco is None:
            for name in ("tvm.runtime.disco", "tvm.runtime.disco._ffi_api", "tvm.runtime.disco.session"):
                sys.modules.pop(name, None)
        return importlib.import_module("tvm.runtime.disco")
    except ImportError as e:
        raise UserError(f"running a split library needs TVM's Disco (pip install apache-tvm): {e}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardedDecoder(Decoder):
    """A decoder library built with --tensor-parallel N and/or --pipeline-stages S, run as N x S Disco
    workers. Same interface as `Decoder` (prefill / decode / generate / text); `close()` ends the workers."""

    _session = None

    def _open(self, directory: Path, weights: Path) -> None:
        manifest = self.manifest
        split = shards.from_manifest(manifest)
        self._shards = split.shards if split else 1
        stage_records = (manifest.get("pipeline") or {}).get("stages") or [{"library": manifest["library"]}]
        self._stages, workers = len(stage_records), self._shards * len(stage_records)
        kind = manifest["target"]["device"]
        ccl = collective(directory, kind, workers)
        disco = _disco()
        self._private = tempfile.TemporaryDirectory(prefix="qcompile-load-")  # lives as long as the workers
        for s, record in enumerate(stage_records):  # each stage's shared object, verified into stage<s>/
            (Path(self._private.name) / f"stage{s}").mkdir()
            verify_library(directory, {**manifest, "library": record["library"]}, Path(self._private.name) / f"stage{s}")
        _check_checkpoint_matches(self.spec, weights)
        from . import worker  # noqa: F401, PLC0415 (worker 0 runs in this process: its functions)

        self._directory = str(directory)
        self._session = session = disco.ProcessSession(workers, num_groups=self._stages,
                                                       entrypoint="qcompile.parallel.worker")
        if ccl is None:
            from . import bridge  # noqa: F401, PLC0415

            session.get_global_func("qcompile.parallel.gloo_init")(_free_port(), self._shards)
        else:
            session.init_ccl(ccl, *range(workers))
        self._vm = session.get_global_func("qcompile.parallel.load_module")(self._private.name, self._shards)
        self._params = session.get_global_func("qcompile.parallel.load_shard")(self._directory, str(weights))
        failures = session.get_global_func("qcompile.parallel.failure")(self._params)
        messages = [failures.debug_get_from_remote(w) for w in range(workers)]  # waits for every load
        if any(messages):
            self.close()
            raise UserError(next(m for m in messages if m))
        self._empty_cache_on_workers = session.get_global_func("qcompile.parallel.empty_cache")
        self._step = session.get_global_func("qcompile.parallel.step")
        self._item = session.get_global_func("ffi.ArrayGetItem")
        self.device = tvm_ffi.device(kind, 0)
        self._host_empty = importlib.import_module("tvm").runtime.empty

    def _new_cache(self) -> Any:
        return self._empty_cache_on_workers(self._directory)

    def _run(self, function: str, ids: np.ndarray) -> np.ndarray:
        session, cfg = self._session, self.spec.config
        out = self._step(self._vm, self._function_name(function, ids.size), session.broadcast(ids, in_group=False),
                         self.position, self._cache, self._params, self._shards, self._stages, cfg.hidden_size, cfg.vocab_size,
                         self.manifest["dtype"])
        logits, self._cache = self._item(out, 0), self._item(out, 1)
        host = self._host_empty((ids.size, self.vocab_size), "float32")
        session.copy_from_worker_0(host, logits)
        session.sync_worker_0()
        self.position += ids.size
        return host.numpy()

    def close(self) -> None:
        """End the workers: the session's destructor shuts them down once the last reference to it (every
        remote object holds one) is gone. (An explicit `shutdown()` would be repeated by the destructor,
        on closed pipes: TVM aborts the process.)"""
        if self._session is not None:
            self._vm = self._params = self._cache = self._item = self._step = None
            self._empty_cache_on_workers = None
            self._session = None
            self._private.cleanup()
        super().close()

"""A build request checked and resolved for this machine (`BuildPlan`), before any compilation, and the
identity of what it will build: everything that decides the library's bytes (the registry's key).

Weights stay in the HF checkpoint and are passed at load time, so compiling needs no weight memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from ..parallel import stages as pipeline
from ..parallel.shards import TensorParallel
from ..quant import choice, policy, schemes
from ..quant.choice import Quantization
from ..run.tvm_runtime import tvm_build_id
from ..spec.model import ModelSpec
from ..spec.target import ResolvedTarget, TargetSpec, availability, resolve
from . import devicecode
from .schedules import Schedules, find_schedules

DTYPES = ("float32", "float16", "bfloat16")


@functools.cache
def source_digest() -> str:
    """sha256 over qcompile's own source files: a code change without a version bump still changes
    what gets built, so it is part of a build's identity."""
    package = Path(__file__).resolve().parent.parent  # the qcompile package
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def c_compiler() -> str:
    """The first line of `cc --version`: export_library links the shared object with it."""
    try:
        out = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.splitlines()[0] if out else "unknown"


def versions() -> dict[str, str]:
    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415

    return {"tvm": tvm.__version__, "tvm_build": tvm_build_id(), "tvm_ffi": tvm_ffi.__version__,
            "qcompile": __version__}


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """A validated build request, resolved for this machine, before any compilation."""

    spec: ModelSpec
    target: ResolvedTarget
    dtype: str
    max_seq_len: int | None  # decoders only
    prefill_chunk: int | None
    schedules: Schedules | None = None  # tuning databases applied (None: default schedules only)
    parallel: TensorParallel | None = None  # tensor-parallel split (None: one device)
    stages: list[pipeline.Stage] | None = None  # pipeline stages (None: one)
    quantization: Quantization | None = None  # weight scheme (None: float weights in `dtype`)

    @property
    def model_config(self) -> Any:
        """The config the library computes with: one shard's when split."""
        config = self.spec.config
        return self.parallel.shard_config(config) if self.parallel else config

    @property
    def buckets(self) -> dict[str, Any]:
        """{"function", "dim", "sizes"}: the static-shape copies ("buckets") of the entry point with a
        dynamic dimension. Tuned kernels are for static shapes, and the runtime calls
        `<function>_<size>` when a call's size is a bucket's."""
        kind = self.spec.kind
        return {"function": kind.bucketed, "dim": kind.dynamic_dim,
                "sizes": kind.bucket_sizes(self.target.device, self.prefill_chunk)}

    @property
    def packed_weights(self) -> bool:
        """Linear and embedding weights stored `rows16` (`run.layouts`): float32 CPU builds."""
        return self.target.device == "cpu" and self.dtype == "float32"

    def identity(self) -> dict[str, Any]:
        """Everything that decides the built library's bytes and manifest (not the model's name)."""
        from tvm.target import codegen  # noqa: PLC0415

        return {"family": self.spec.family.name, "config": self.spec.config.canonical(),
                "target": self.target.target, "device": self.target.device,
                "dtype": self.dtype, "max_seq_len": self.max_seq_len, "prefill_chunk": self.prefill_chunk,
                "versions": versions(), "qcompile_source": source_digest(),
                "toolchain": {"llvm": int(codegen.llvm_version_major()), "cc": c_compiler(),
                              **devicecode.toolchain(self.target)},
                "buckets": self.buckets,
                "tuning_database": self.schedules.digest if self.schedules else None,
                **({"parallel": self.parallel.record(self.spec.config)} if self.parallel else {}),
                **({"pipeline": pipeline.record(self.spec, self.stages)} if self.stages else {}),
                "quantization": self.quantization.as_json() if self.quantization else None}


def plan_build(spec: ModelSpec, target: TargetSpec, *, dtype: str | None = None,
               max_seq_len: int | None = None, schedules: Path | None = None,
               use_schedules: bool = True, tensor_parallel: int = 1, pipeline_stages: int = 1,
               quantization: str | None = None, group_size: int | None = None) -> BuildPlan:
    """Check the build options and resolve the target for this machine (UserError on bad input).
    `schedules`: a tuning database directory (default: the target's committed ones). `tensor_parallel`:
    build one shard of that many (the family's plan decides its shapes; see `parallel.shards`).
    `pipeline_stages`: cut the layers into that many stages, each its own shared object (`parallel.stages`).
    `quantization`, `group_size`: the weight scheme (quant/schemes.py; None: float weights)."""
    parallel = TensorParallel.for_model(spec, tensor_parallel) if tensor_parallel != 1 else None
    cut = pipeline.partition(spec, pipeline_stages) if pipeline_stages != 1 else None
    quant = choice.resolve(quantization, group_size)
    if quant is not None and parallel is not None:
        raise UserError("--quantization with --tensor-parallel is not supported yet (shards slice float "
                        "weights); use one or the other")
    if quant is not None:
        for name, shape in spec.family.hf_tensors(spec.config).items():
            if policy.is_quantized(name, shape):
                schemes.check_group_size(quant.scheme, quant.group_size or 0, name, shape[-1])
    dtype = dtype or target.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    resolved = resolve(target)
    if target.device != "cpu":
        can, why = availability(target)["build"]
        if not can:
            raise UserError(f"target '{target.name}' cannot be built on this machine: {why}")
    found = find_schedules(target.name, schedules, enabled=use_schedules)
    if not spec.kind.has_sequence:
        if max_seq_len is not None:
            raise UserError(f"--max-seq-len applies to decoders; {spec.name} is an {spec.kind.name}")
        return BuildPlan(spec, resolved, dtype, None, None, found, quantization=quant)
    context = spec.config.max_position_embeddings
    max_seq_len = context if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= context:
        raise UserError(f"--max-seq-len must be in 1..{context} (the model's max_position_embeddings), "
                        f"got {max_seq_len}")
    return BuildPlan(spec, resolved, dtype, max_seq_len, prefill_chunk=min(target.prefill_chunk, max_seq_len),
                     schedules=found, parallel=parallel, stages=cut, quantization=quant)



"""Model spec + target -> a library directory: export to Relax, build, package with a manifest.

The library directory (written atomically) holds:
  model.so        the TVM Relax VM executable (kernels + VM bytecode), no weights
  manifest.json   what was built, for whom, and how to call it (see `MANIFEST_FORMAT`)
Weights stay in the HF checkpoint and are passed at load time, so compiling needs no weight memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from . import __version__, devicecode, lowering
from .atomic import write_json
from .errors import UserError
from .schedules import Schedules, find_schedules
from .schema import read_json_object
from .targets import TargetSpec, resolve
from .zoo import ModelSpec

MANIFEST = "manifest.json"
LIBRARY = "model.so"
MANIFEST_FORMAT = "qcompile-library/1"
PACKED_PARAMS = "packed_params"  # nn.Module.export_tvm's name for the weights tuple
# What the runtime and the registry read from a manifest.
MANIFEST_KEYS = ("model", "target", "dtype", "max_seq_len", "prefill_chunk", "buckets", "parameters",
                 "library", "versions", "identity", "build")
DTYPES = ("float32", "float16", "bfloat16")
# Static-shape copies ("buckets") of the entry point with a dynamic dimension: tuned kernels are for
# static shapes, and the runtime calls `<function>_<size>` when a call's size is a bucket's.
BUCKETED = {"decoder": ("prefill", "n"), "encoder": ("encode", "batch")}
ENCODER_BATCH_BUCKETS = (1,)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _type_json(ty: Any) -> Any:
    """A Relax type -> JSON: {"shape": [...], "dtype"} for tensors (symbolic dims by name), lists for
    tuples. (TVM 0.27 calls struct info `ty`: relax.type.TensorType, ir.type.TupleType.)"""
    if hasattr(ty, "fields"):
        return [_type_json(f) for f in ty.fields]
    if hasattr(ty, "dtype") and hasattr(ty, "shape"):
        shape = [int(d.value) if hasattr(d, "value") else re.sub(r"T\.int64\((\d+)\)", r"\1", str(d))
                 for d in ty.shape.values]
        return {"shape": shape, "dtype": str(ty.dtype)}
    return {"kind": type(ty).__name__}


def function_signatures(mod: Any) -> dict[str, Any]:
    """Each exported Relax function's inputs (name -> struct info) and output. The packed weights
    tuple is summarised: it is the manifest's `parameters`, in order."""
    from tvm import relax  # noqa: PLC0415

    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs and "global_symbol" in func.attrs:
            out[gv.name_hint] = {
                "inputs": {p.name: (_type_json(p.ty) if p.name != PACKED_PARAMS
                                    else "parameters, as one tuple") for p in func.params},
                "output": _type_json(func.ret_ty),
            }
    return out


def tvm_build_id() -> str:
    """Which TVM binaries these are: a digest of the sha256s that the wheel's RECORD lists for its
    shared libraries (the wheel carries no commit hash; this tells apart two builds of one version)."""
    try:
        record = importlib.metadata.distribution("apache-tvm").read_text("RECORD") or ""
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed from a wheel)"
    libraries = sorted(line for line in record.splitlines() if re.search(r"/libtvm[^/]*\.so,", line))
    return hashlib.sha256("\n".join(libraries).encode()).hexdigest()[:16] if libraries else "unknown"


@functools.cache
def source_digest() -> str:
    """sha256 over qcompile's own source files: a code change without a version bump still changes
    what gets built, so it is part of a build's identity."""
    package = Path(__file__).resolve().parent
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


def is_library_dir(path: Path) -> bool:
    """A directory qcompile wrote as a library (so `compile -o` may replace it)."""
    try:
        return read_manifest(path).get("format") == MANIFEST_FORMAT
    except UserError:
        return False


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """A validated build request, resolved for this machine, before any compilation."""

    spec: ModelSpec
    target: TargetSpec
    tvm_target: Any
    target_record: dict[str, Any]  # resolved target dict, device, CPU features
    dtype: str
    max_seq_len: int | None  # decoders only
    prefill_chunk: int | None
    schedules: Schedules | None = None  # tuning databases applied (None: default schedules only)

    @property
    def buckets(self) -> dict[str, Any]:
        """{"function", "dim", "sizes"}: which static copies of the dynamic entry point are built."""
        function, dim = BUCKETED[self.spec.family.kind]
        if self.spec.family.kind == "encoder":
            sizes = list(ENCODER_BATCH_BUCKETS)
        elif self.target.device == "cpu":
            sizes = [self.prefill_chunk]
        else:  # dlight (TVM 0.27) fails on the bucket's GQA kernels over [p + chunk] ("padding factor
            sizes = []  # ... not divisible"); GPU prefill runs symbolic-length kernels only
        return {"function": function, "dim": dim, "sizes": sizes}

    def identity(self) -> dict[str, Any]:
        """Everything that decides the built library's bytes and manifest (not the model's name)."""
        from tvm.target import codegen  # noqa: PLC0415

        return {"family": self.spec.family.name, "config": self.spec.config.canonical(),
                "target": self.target_record["target"], "device": self.target_record["device"],
                "dtype": self.dtype, "max_seq_len": self.max_seq_len, "prefill_chunk": self.prefill_chunk,
                "versions": versions(), "qcompile_source": source_digest(),
                "toolchain": {"llvm": int(codegen.llvm_version_major()), "cc": c_compiler(),
                              **devicecode.toolchain(self.target)},
                "buckets": self.buckets,
                "tuning_database": self.schedules.digest if self.schedules else None}


def plan_build(spec: ModelSpec, target: TargetSpec, *, dtype: str | None = None,
               max_seq_len: int | None = None, schedules: Path | None = None,
               use_schedules: bool = True) -> BuildPlan:
    """Check the build options and resolve the target for this machine (UserError on bad input).
    `schedules`: a tuning database directory (default: the target's committed ones)."""
    dtype = dtype or target.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tvm_target, target_record = resolve(target)
    if target.device != "cpu":
        from .targets import availability  # noqa: PLC0415

        can, why = availability(target)["build"]
        if not can:
            raise UserError(f"target '{target.name}' cannot be built on this machine: {why}")
    found = find_schedules(target.name, schedules, enabled=use_schedules)
    if spec.family.kind != "decoder":  # sequence bounds are a decoder's
        if max_seq_len is not None:
            raise UserError(f"--max-seq-len applies to decoders; {spec.name} is an {spec.family.kind}")
        return BuildPlan(spec, target, tvm_target, target_record, dtype, None, None, found)
    context = spec.config.max_position_embeddings
    max_seq_len = context if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= context:
        raise UserError(f"--max-seq-len must be in 1..{context} (the model's max_position_embeddings), "
                        f"got {max_seq_len}")
    return BuildPlan(spec, target, tvm_target, target_record, dtype, max_seq_len,
                     prefill_chunk=min(target.prefill_chunk, max_seq_len), schedules=found)


def export(plan: BuildPlan) -> tuple[Any, list[tuple[str, Any]]]:
    """The model as a Relax module (entry points + their static buckets) and its parameter specs.

    A bucket is the bucketed entry point traced again with its dynamic dim fixed (so its kernels get
    static shapes), exported under `<function>_<size>`."""
    spec = plan.spec
    module = spec.family.build(spec.config, plan.dtype)
    specs = module.export_spec()
    buckets = plan.buckets
    for size in buckets["sizes"]:
        name = f"{buckets['function']}_{size}"
        object.__setattr__(module, name, getattr(module, buckets["function"]))  # export_tvm looks up by name
        specs[name] = _fix_dim(specs[buckets["function"]], buckets["dim"], size)
    return module.export_tvm(spec=specs)


def _fix_dim(arg_spec: Any, dim: str, size: int) -> Any:
    """An export spec (dicts/lists of nn.spec.Tensor) with symbolic dim `dim` set to `size`."""
    from tvm.relax.frontend import nn  # noqa: PLC0415

    if isinstance(arg_spec, dict):
        return {k: v if k == "$" else _fix_dim(v, dim, size) for k, v in arg_spec.items()}
    if isinstance(arg_spec, list):
        return [_fix_dim(v, dim, size) for v in arg_spec]
    if isinstance(arg_spec, nn.spec.Tensor):
        return nn.spec.Tensor([size if d == dim else d for d in arg_spec.shape], arg_spec.dtype)
    return arg_spec


def write_library(plan: BuildPlan, directory: Path, *, log=print) -> dict[str, Any]:
    """Build into the (empty, private) `directory`: model.so, then manifest.json last. Not atomic by
    itself: callers publish the directory with a rename (`api.compile_model`, the registry)."""
    import tvm  # noqa: PLC0415

    spec, start = plan.spec, time.perf_counter()
    log(f"[1/3] exporting {spec.name} ({spec.family.name}, {plan.dtype}) to Relax")
    mod, params = export(plan)
    where = plan.target_record["target"].get("mcpu") or plan.target_record["target"].get("arch", "")
    log(f"[2/3] building for {plan.target.name} ({where}); schedules: "
        f"{', '.join(str(d) for d in plan.schedules.directories) if plan.schedules else 'default only'}")
    report = lowering.ScheduleReport()
    database = plan.schedules.open() if plan.schedules else None
    pipeline = lowering.relax_pipeline(plan.tvm_target, database, report)
    with devicecode.build_context(plan.target):
        executable = tvm.compile(mod, plan.tvm_target, relax_pipeline=pipeline)
    if plan.schedules:
        log(f"      tuned kernels: {len(report.tuned)}; default schedules: {len(report.default_static)} "
            f"static without a record{': ' + ', '.join(sorted(report.default_static)) if report.default_static else ''}"
            f", {len(report.default_symbolic)} with symbolic shapes")
    log("[3/3] writing the library")
    executable.export_library(str(directory / LIBRARY), **devicecode.export_options(plan.target, log))
    device_code = devicecode.check_library(plan.target, directory / LIBRARY)
    parameters = [{"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype}
                  for name, p in params]
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": {"name": spec.name, "family": spec.family.name, "kind": spec.family.kind,
                  "source": spec.source, "config": dataclasses.asdict(spec.config)},
        "target": plan.target_record,
        "dtype": plan.dtype,
        "max_seq_len": plan.max_seq_len,
        "prefill_chunk": plan.prefill_chunk,
        "functions": function_signatures(mod),
        "parameters": parameters,
        "parameter_count": sum(math.prod(p["shape"]) for p in parameters),
        "active_parameter_count": spec.family.active_parameter_count(spec.config),
        "library": {"file": LIBRARY, "sha256": sha256_file(directory / LIBRARY)},
        "versions": versions(),
        "buckets": plan.buckets,
        "device_code": device_code,
        "tuning_database": ({**plan.schedules.as_json(), "kernels": report.as_json()}
                            if plan.schedules else None),
        "identity": plan.identity(),
        "build": {"seconds": round(time.perf_counter() - start, 2),
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
    }
    write_json(directory / MANIFEST, manifest)  # last: a directory with a manifest is complete
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: library directory not found")
    path = directory / MANIFEST
    manifest = read_json_object(path, missing=f"{directory}: not a qcompile library (no {MANIFEST})")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format is not {MANIFEST_FORMAT}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UserError(f"{path}: incomplete manifest (no '{missing[0]}')")
    return manifest

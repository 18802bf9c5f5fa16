"""Build targets: a target file (`TargetSpec`) and the one object a build, a tuning run and the runtime
pass around once it is resolved for this machine (`ResolvedTarget`).

A target file (`qcompile/data/targets/*.yaml`, or the user's `QCOMPILE_TARGETS` directories):
`description`, `target` (TVM target dict, host included; 0.27 takes dicts, not strings), `device` (the
runtime device kind: cpu, cuda, rocm), `dtype` (default compute dtype), `requires_features` (CPU
features the build assumes), `device_code` (GPU: what the library carries), `prefill_chunk`, and
optionally `tolerance` (per dtype, overriding the shared tiers of `data/tolerance.yaml`: `max_rel_diff`
= max |logit diff| / logit scale; for 16-bit dtypes also `top1_agreement` and `kl`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .. import data
from ..errors import UserError
from .schema import build_record, positive

HOST = "host"  # placeholder resolved on the build machine
# The runtime device of each TVM target kind (TVM calls the CPU backend "llvm"); stated once.
DEVICE_OF_KIND = {"llvm": "cpu", "cuda": "cuda", "rocm": "rocm"}
DEFAULT_TARGET = "cpu"  # the target that builds for this machine's own CPU


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    description: str
    target: dict[str, Any]
    device: str
    dtype: str
    tolerance: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # + shared tiers
    prefill_chunk: int = positive(256)
    requires_features: list[str] = dataclasses.field(default_factory=list)
    # GPU targets: {"format": "fatbin"} (CUDA: cubin for target.arch + PTX) or {"format": "hsaco",
    # "code_object_version": 5} (ROCm)
    device_code: dict[str, Any] | None = None
    name: str = ""

    def check(self, where: str) -> None:
        if "kind" not in self.target:
            raise UserError(f"{where}: field 'target' needs a 'kind'")
        if self.device not in ("cpu", "cuda", "rocm"):
            raise UserError(f"{where}: field 'device' must be cpu, cuda or rocm, got {self.device!r}")
        kind = self.target["kind"]
        if kind in DEVICE_OF_KIND and DEVICE_OF_KIND[kind] != self.device:
            expected = next(k for k, d in DEVICE_OF_KIND.items() if d == self.device)
            raise UserError(f"{where}: device '{self.device}' needs target kind '{expected}'")
        if (self.device == "cpu") != (self.device_code is None):
            raise UserError(f"{where}: field 'device_code' is for GPU targets (and they need it)")
        if self.device == "rocm" and not {"mcpu", "host"} <= set(self.target):
            raise UserError(f"{where}: a rocm target needs 'mcpu' (e.g. gfx942) and 'host'")
        if self.device == "cuda" and not {"arch", "host"} <= set(self.target):
            raise UserError(f"{where}: a cuda target needs 'arch' (e.g. sm_90) and 'host'")
        for dtype, tier in self.tolerance.items():
            if "max_rel_diff" not in tier:
                raise UserError(f"{where}: field 'tolerance.{dtype}' needs 'max_rel_diff'")



def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: must be a mapping")
    return doc


def _target_files() -> dict[str, Path]:
    """Target name -> its file; a user directory's file replaces a built-in one of the same name."""
    files: dict[str, Path] = {}
    for directory in data.target_dirs():
        files |= {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    return dict(sorted(files.items()))


def list_targets() -> dict[str, TargetSpec]:
    return {name: load_target(name) for name in _target_files()}


def load_target(name: str) -> TargetSpec:
    files = _target_files()
    if name not in files:
        raise UserError(f"unknown target '{name}' (known: {', '.join(files)})")
    path = files[name]
    spec = build_record(TargetSpec, _read_yaml_mapping(path), str(path))
    shared = _read_yaml_mapping(data.tolerance_file())
    return dataclasses.replace(spec, name=name, tolerance={**shared, **spec.tolerance})


# LLVM lists a CPU model's tuning preferences among its features (slow-3ops-lea, false-deps-popcnt,
# macrofusion, ...): they steer code generation but any CPU runs the result, so they are not
# requirements. What remains are instruction-set extensions.
_TUNING_FLAG = re.compile(r"^(slow-|fast-|false-deps-|tuning-|prefer-|idiv|lea-|no-bypass|pad-short|use-|"
                          r"harden-|lvi-|retpoline|allow-light|branchfusion|macrofusion|sbb-dep|"
                          r"insert-vzeroupper|ermsb|fsrm|avoid-)")


def isa_features(target) -> set[str]:
    """The instruction-set extensions LLVM enables for a CPU target (tuning flags left out)."""
    from tvm.target import codegen  # noqa: PLC0415

    return {f for f in codegen.llvm_get_cpu_features(target) if not _TUNING_FLAG.match(f)}


def host_cpu_features() -> set[str]:
    from tvm.target import Target, codegen  # noqa: PLC0415 (tvm is slow to import)

    cpu, triple = codegen.llvm_get_system_cpu(), "x86_64-pc-linux-gnu"
    return isa_features(Target({"kind": "llvm", "mcpu": cpu, "mtriple": triple}))


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    """A target resolved for this build machine: the one form a target travels in after loading.

    `spec` is the target file; `target` the resolved TVM target dict (`mcpu: host` -> this CPU's name,
    `num-cores: host` -> its cores); `tvm` the TVM Target; `cpu_features` the instruction-set extensions
    LLVM enables for it (CPU targets). `record()` is what a manifest stores.
    """

    spec: TargetSpec
    target: dict[str, Any]
    tvm: Any
    cpu_features: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> str:
        return self.spec.device

    @property
    def arch(self) -> str:
        """The device architecture: the CPU name (mcpu), sm_NN or gfxNNN."""
        return architecture(self.target)

    @property
    def device_code(self) -> dict[str, Any] | None:
        return self.spec.device_code

    def record(self) -> dict[str, Any]:
        """The manifest's `target`: name, resolved dict, device, arch (+ cpu_features on a CPU)."""
        record = {"name": self.name, "target": self.target, "device": self.device, "arch": self.arch}
        if self.device == "cpu":
            record["cpu_features"] = list(self.cpu_features)
        return record


def architecture(target: dict[str, Any]) -> str:
    """The arch of a (resolved) TVM target dict: `arch` (CUDA sm_NN) or `mcpu` (CPU name, ROCm gfxNNN)."""
    return str(target.get("arch") or target.get("mcpu") or "")


def resolve(spec: TargetSpec) -> ResolvedTarget:
    """The target for this build machine (UserError when TVM rejects it or the CPU lacks a feature)."""
    import tvm  # noqa: PLC0415
    from tvm.target import codegen  # noqa: PLC0415

    target = dict(spec.target)
    if target.get("mcpu") == HOST:
        target["mcpu"] = codegen.llvm_get_system_cpu()
    if target.get("num-cores") == HOST:
        target["num-cores"] = os.cpu_count() or 1
    try:
        tvm_target = tvm.target.Target(target)
    except Exception as e:  # TVM reports bad target dicts with assorted error types
        raise UserError(f"target '{spec.name}': TVM rejects the target dict ({str(e).splitlines()[0]})") from None
    if spec.device != "cpu":
        return ResolvedTarget(spec, target, tvm_target)
    features = sorted(isa_features(tvm_target))
    missing = [f for f in spec.requires_features if f not in features]
    if missing:
        raise UserError(f"target '{spec.name}': CPU {target.get('mcpu')} lacks {', '.join(missing)}")
    return ResolvedTarget(spec, target, tvm_target, tuple(features))


def availability(spec: TargetSpec) -> dict[str, tuple[bool, str]]:
    """Whether this machine can build for the target and run what it builds, each with the reason."""
    from ..build import devicecode  # noqa: PLC0415

    if spec.device == "cpu":
        try:
            resolved = resolve(spec)
        except UserError as e:
            return {"build": (False, str(e)), "run": (False, "cannot build")}
        from ..run.cpu_features import missing as missing_features  # noqa: PLC0415

        missing = missing_features(resolved.cpu_features, host_cpu_features())
        run = (False, f"this CPU lacks {', '.join(missing[:4])}") if missing else (True, "this CPU")
        return {"build": (True, "LLVM"), "run": run}
    if spec.device == "cuda":
        version = devicecode.nvcc_version()
        build = (True, f"nvcc {version}") if version else (False, "needs nvcc on PATH (CUDA toolkit)")
        return {"build": build, "run": gpu_present("cuda", architecture(spec.target))}
    linker, libs = devicecode.lld(), devicecode.rocm_device_libs()
    if linker is None or linker[1] < 19:
        build = (False, "needs ld.lld >= 19 (apt-get install lld-22)" if linker is None
                 else f"needs ld.lld >= 19, found {linker[1]} (apt-get install lld-22)")
    elif libs is None:
        build = (False, f"needs rocm-device-libs in {devicecode.ROCM_PATH}/amdgcn/bitcode "
                        "(apt-get install rocm-device-libs)")
    else:
        build = (True, f"ld.lld {linker[1]}, rocm-device-libs")
    return {"build": build, "run": gpu_present("rocm", architecture(spec.target))}


def gpu_present(kind: str, arch: str) -> tuple[bool, str]:
    """A GPU of `kind` this TVM runtime can load code for, and of the library's arch (`run.tvm_runtime`)."""
    from ..run.tvm_runtime import runtime  # noqa: PLC0415

    return runtime().gpu_present(kind, arch)

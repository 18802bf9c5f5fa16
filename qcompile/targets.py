"""targets/*.yaml -> a TVM target plus what building and running for it needs.

A target file: `description`, `target` (TVM target dict, host included; 0.27 takes dicts, not strings),
`device` (the runtime device kind: cpu, cuda, rocm), `dtype` (default compute dtype),
`requires_features` (CPU features the build assumes), `device_code` (GPU: what the library carries),
`prefill_chunk`, and `tolerance` (per dtype, the numeric tier a build must meet against transformers:
`max_rel_diff` = max |logit diff| / logit scale; for 16-bit dtypes also `top1_agreement` and `kl`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .schema import build_record, positive

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
HOST = "host"  # placeholder resolved on the build machine


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    description: str
    target: dict[str, Any]
    device: str
    dtype: str
    tolerance: dict[str, dict[str, float]]
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
        expected = {"cpu": "llvm", "cuda": "cuda", "rocm": "rocm"}[self.device]
        if self.target["kind"] in ("llvm", "cuda", "rocm") and self.target["kind"] != expected:
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

    @property
    def arch(self) -> str:
        """The device architecture: the CPU name, sm_NN or gfxNNN."""
        return str(self.target.get("arch") or self.target.get("mcpu") or "")


def targets_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_TARGETS", TARGETS_DIR))


def list_targets() -> dict[str, TargetSpec]:
    return {p.stem: load_target(p.stem) for p in sorted(targets_dir().glob("*.yaml"))}


def load_target(name: str) -> TargetSpec:
    path = targets_dir() / f"{name}.yaml"
    if "/" in name or not path.is_file():
        known = ", ".join(p.stem for p in sorted(targets_dir().glob("*.yaml")))
        raise UserError(f"unknown target '{name}' (known: {known})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: must be a mapping")
    return dataclasses.replace(build_record(TargetSpec, doc, str(path)), name=name)


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


def resolve(spec: TargetSpec) -> tuple[Any, dict[str, Any]]:
    """The TVM Target for this build machine, and what the manifest records about it.

    Returns (tvm.target.Target, {"name", "target" (resolved dict), "device", "cpu_features"}).
    """
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
    record = {"name": spec.name, "target": target, "device": spec.device,
              "arch": str(target.get("arch") or target.get("mcpu") or "")}
    if target["kind"] == "llvm":
        features = sorted(isa_features(tvm_target))
        missing = [f for f in spec.requires_features if f not in features]
        if missing:
            raise UserError(f"target '{spec.name}': CPU {target.get('mcpu')} lacks {', '.join(missing)}")
        record["cpu_features"] = features
    return tvm_target, record


def availability(spec: TargetSpec) -> dict[str, tuple[bool, str]]:
    """Whether this machine can build for the target and run what it builds, each with the reason."""
    from . import devicecode  # noqa: PLC0415

    if spec.device == "cpu":
        try:
            tvm_target, _ = resolve(spec)
        except UserError as e:
            return {"build": (False, str(e)), "run": (False, "cannot build")}
        missing = sorted(isa_features(tvm_target) - host_cpu_features())
        run = (False, f"this CPU lacks {', '.join(missing[:4])}") if missing else (True, "this CPU")
        return {"build": (True, "LLVM"), "run": run}
    if spec.device == "cuda":
        version = devicecode.nvcc_version()
        build = (True, f"nvcc {version}") if version else (False, "needs nvcc on PATH (CUDA toolkit)")
        return {"build": build, "run": gpu_present("cuda", spec.arch)}
    linker, libs = devicecode.lld(), devicecode.rocm_device_libs()
    if linker is None or linker[1] < 19:
        build = (False, "needs ld.lld >= 19 (apt-get install lld-22)" if linker is None
                 else f"needs ld.lld >= 19, found {linker[1]} (apt-get install lld-22)")
    elif libs is None:
        build = (False, f"needs rocm-device-libs in {devicecode.ROCM_PATH}/amdgcn/bitcode "
                        "(apt-get install rocm-device-libs)")
    else:
        build = (True, f"ld.lld {linker[1]}, rocm-device-libs")
    return {"build": build, "run": gpu_present("rocm", spec.arch)}


def gpu_present(kind: str, arch: str) -> tuple[bool, str]:
    """A GPU of `kind` this TVM runtime can load code for, and of the library's arch."""
    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415

    loader = {"cuda": "ffi.Module.load_from_bytes.cuda", "rocm": "ffi.Module.load_from_bytes.hip"}[kind]
    if tvm_ffi.get_global_func(loader, allow_missing=True) is None:
        return False, f"this TVM runtime cannot load {kind} code (no {kind} runtime library)"
    device = tvm.device(kind, 0)
    if not device.exist:
        return False, f"no {kind} device on this machine"
    found = device_arch(kind, device)
    return (True, found) if found == arch else (False, f"this GPU is {found}, not {arch}")


def device_arch(kind: str, device) -> str:
    """sm_NN of a CUDA device ("9.0" -> sm_90); gfxNNN of a ROCm one (unverified here: the PyPI
    runtime has no ROCm loader, so this line has not run against a real GPU)."""
    version = str(device.compute_version)
    return ("sm_" if kind == "cuda" else "gfx") + version.replace(".", "")

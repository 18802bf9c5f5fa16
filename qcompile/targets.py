"""targets/*.yaml -> a TVM target plus what building and running for it needs.

A target file: `description`, `target` (TVM target dict; 0.27 takes dicts, not strings), `device`
(the runtime device kind: cpu, cuda, rocm), `dtype` (default compute dtype), `requires_features` (CPU
features the build assumes), `prefill_chunk` and `tolerance` (per dtype, relative to the logit scale).
"""

from __future__ import annotations

import dataclasses
import os
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
    tolerance: dict[str, float]
    prefill_chunk: int = positive(256)
    requires_features: list[str] = dataclasses.field(default_factory=list)
    name: str = ""

    def check(self, where: str) -> None:
        if "kind" not in self.target:
            raise UserError(f"{where}: field 'target' needs a 'kind'")
        if self.device not in ("cpu", "cuda", "rocm"):
            raise UserError(f"{where}: field 'device' must be cpu, cuda or rocm, got {self.device!r}")


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


def host_cpu_features() -> set[str]:
    from tvm.target import Target, codegen  # noqa: PLC0415 (tvm is slow to import)

    cpu, triple = codegen.llvm_get_system_cpu(), "x86_64-pc-linux-gnu"
    return set(codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": cpu, "mtriple": triple})))


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
    record = {"name": spec.name, "target": target, "device": spec.device}
    if target["kind"] == "llvm":
        features = sorted(codegen.llvm_get_cpu_features(tvm_target))
        missing = [f for f in spec.requires_features if f not in features]
        if missing:
            raise UserError(f"target '{spec.name}': CPU {target.get('mcpu')} lacks {', '.join(missing)}")
        record["cpu_features"] = features
    return tvm_target, record

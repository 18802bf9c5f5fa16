"""Build a plan into a library directory: export the model to Relax (entry points + their static
buckets), compile with the shared lowering, export the shared object (with GPU device code), and write
the manifest last (a directory with a manifest is complete).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import time
from pathlib import Path
from typing import Any

from . import devicecode, library, lowering
from ..atomic import write_json
from .plan import BuildPlan, versions

PACKED_PARAMS = "packed_params"  # nn.Module.export_tvm's name for the weights tuple


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


def export(plan: BuildPlan) -> tuple[Any, list[tuple[str, Any]]]:
    """The model as a Relax module (entry points + their static buckets) and its parameter specs.

    A bucket is the bucketed entry point traced again with its dynamic dim fixed (so its kernels get
    static shapes), exported under `<function>_<size>`."""
    from ..quant import kernels  # noqa: PLC0415

    spec = plan.spec
    # the families build packed weights under it (GPU: in the form dlight's rules recognise)
    with kernels.quantized(plan.quantization, dequantize_stage=plan.target.device != "cpu"):
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
    weights = f", {plan.quantization.describe()} weights" if plan.quantization else ""
    log(f"[1/3] exporting {spec.name} ({spec.family.name}, {plan.dtype}{weights}) to Relax")
    mod, params = export(plan)
    log(f"[2/3] building for {plan.target.name} ({plan.target.arch}); schedules: "
        f"{', '.join(str(d) for d in plan.schedules.directories) if plan.schedules else 'default only'}")
    report = lowering.ScheduleReport()
    database = plan.schedules.open() if plan.schedules else None
    rules_first = bool(plan.schedules and plan.schedules.predates_cpu_rules)
    pipeline = lowering.relax_pipeline(plan.target.tvm, database, report, rules_first)
    with devicecode.build_context(plan.target):
        executable = tvm.compile(mod, plan.target.tvm, relax_pipeline=pipeline)
    if plan.schedules:
        log(f"      tuned kernels: {len(report.tuned)}; default schedules: {len(report.default_static)} "
            f"static without a record{': ' + ', '.join(sorted(report.default_static)) if report.default_static else ''}"
            f", {len(report.default_symbolic)} with symbolic shapes")
    if report.rule:
        log(f"      qcompile CPU rules scheduled {len(report.rule)} kernels: "
            + ", ".join(f"{rule} x{list(report.rule.values()).count(rule)}" for rule in sorted(set(report.rule.values()))))
    log("[3/3] writing the library")
    executable.export_library(str(directory / library.LIBRARY), **devicecode.export_options(plan.target, log))
    device_code = devicecode.check_library(plan.target, directory / library.LIBRARY)
    parameters = [{"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype}
                  for name, p in params]
    manifest = {
        "format": library.MANIFEST_FORMAT,
        "model": {"name": spec.name, "family": spec.family.name, "kind": spec.kind.name,
                  "source": spec.source, "config": dataclasses.asdict(spec.config)},
        "target": plan.target.record(),
        "dtype": plan.dtype,
        "quantization": plan.quantization.as_json() if plan.quantization else None,
        "max_seq_len": plan.max_seq_len,
        "prefill_chunk": plan.prefill_chunk,
        "functions": function_signatures(mod),
        "parameters": parameters,
        "parameter_count": (sum(math.prod(p["shape"]) for p in parameters) if plan.quantization is None
                            else sum(math.prod(s) for s in spec.family.hf_tensors(spec.config).values())),
        "active_parameter_count": spec.family.active_parameter_count(spec.config),
        "library": {"file": library.LIBRARY, "sha256": library.sha256_file(directory / library.LIBRARY)},
        "versions": versions(),
        "buckets": plan.buckets,
        "device_code": device_code,
        "tuning_database": ({**plan.schedules.as_json(), "kernels": report.as_json()}
                            if plan.schedules else None),
        "cpu_rules": report.rule,  # kernel -> the qcompile CPU rule that scheduled it (no record in a database)
        "identity": plan.identity(),
        "build": {"seconds": round(time.perf_counter() - start, 2),
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
    }
    write_json(directory / library.MANIFEST, manifest)  # last: a directory with a manifest is complete
    return manifest

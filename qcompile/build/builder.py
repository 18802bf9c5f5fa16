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

from . import devicecode, library, lowering, memory
from ..quant import kernels
from ..atomic import write_json
from ..parallel import stages
from ..parallel.stages import Stage, stage_parameter_name
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


def export(plan: BuildPlan, stage: Stage | None = None) -> tuple[Any, list[tuple[str, Any]]]:
    """The model (or one pipeline stage of it) as a Relax module (entry points + their static buckets)
    and its parameter specs, named as the whole model's.

    A bucket is the bucketed entry point traced again with its dynamic dim fixed (so its kernels get
    static shapes), exported under `<function>_<size>`."""

    spec = plan.spec
    # the families build packed weights under it (GPU: in the form dlight's rules recognise)
    with kernels.quantized(plan.quantization, dequantize_stage=plan.target.device != "cpu"):
        module = spec.family.build(plan.model_config, plan.dtype)
    if plan.parallel:
        module.shard(plan.parallel.shards)  # an all-reduce after each row-parallel projection
    if stage is not None:
        module = module.pipeline_stage(stage.first_layer, stage.end_layer, stage.is_first, stage.is_last)
    if plan.packed_weights:
        from ..models.packing import pack_weights  # noqa: PLC0415

        pack_weights(module)  # float linear weights (not quantized ones) stored rows16
    specs = module.export_spec(plan.max_seq_len) if spec.kind.has_sequence else module.export_spec()
    buckets = plan.buckets
    for size in buckets["sizes"]:
        name = f"{buckets['function']}_{size}"
        object.__setattr__(module, name, getattr(module, buckets["function"]))  # export_tvm looks up by name
        specs[name] = _fix_dim(specs[buckets["function"]], buckets["dim"], size)
    mod, params = module.export_tvm(spec=specs)
    return mod, params if stage is None else [(stage_parameter_name(n, stage), p) for n, p in params]


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


def kv_cache_manifest(plan: BuildPlan) -> dict[str, Any] | None:
    """A decoder's KV cache buffers, as the runtime allocates them: per layer, K and V of `slots` rows
    [slots, kv_heads, head_dim] (`DecoderConfig.kv_cache_layout`). None for an encoder."""
    if not plan.spec.kind.has_sequence:
        return None
    cfg = plan.model_config  # one shard's when split: its share of the kv heads
    return {"layers": cfg.kv_cache_layout(plan.max_seq_len), "dtype": plan.dtype,
            "row": [cfg.num_key_value_heads, cfg.resolved_head_dim]}


def batch_manifest(plan: BuildPlan) -> dict[str, Any] | None:
    """A decoder's batched entry point (`CausalLM.batch_step`) and its page geometry, as the runtime's
    batch engine needs them; None for an encoder or a split (tensor-parallel / pipelined) library."""
    if not plan.spec.kind.has_sequence or plan.parallel or plan.stages:
        return None
    from ..models import decoder_graph, paged  # noqa: PLC0415

    return {"function": "batch_step", "page_tokens": paged.PAGE_TOKENS,
            "max_pages": decoder_graph.max_pages(plan.max_seq_len)}


def write_library(plan: BuildPlan, directory: Path, *, log=print) -> dict[str, Any]:
    """Build into the (empty, private) `directory`: model.so, then manifest.json last. Not atomic by
    itself: callers publish the directory with a rename (`api.compile_model`, the registry)."""
    import tvm  # noqa: PLC0415

    spec, start = plan.spec, time.perf_counter()
    report = lowering.ScheduleReport()
    database = plan.schedules.open() if plan.schedules else None
    rules_first = bool(plan.schedules and plan.schedules.predates_cpu_rules)
    pipeline = lowering.relax_pipeline(plan.target.tvm, database, report, rules_first)
    parameters, stage_records = [], []
    for stage in plan.stages or [None]:  # one shared object per pipeline stage (stage 0's is model.so)
        file = library.LIBRARY if stage is None or stage.is_first else f"model.stage{stage.index}.so"
        part = "" if stage is None else f" stage {stage.index} (layers {stage.first_layer}..{stage.end_layer - 1})"
        weights = f", {plan.quantization.describe()} weights" if plan.quantization else ""
        log(f"[1/3] exporting {spec.name}{part} ({spec.family.name}, {plan.dtype}{weights}) to Relax")
        mod, params = export(plan, stage)
        log(f"[2/3] building for {plan.target.name} ({plan.target.arch}); schedules: "
            f"{', '.join(str(d) for d in plan.schedules.directories) if plan.schedules else 'default only'}")
        with devicecode.build_context(plan.target):
            executable = tvm.compile(mod, plan.target.tvm, relax_pipeline=pipeline)
        log(f"[3/3] writing {file}")
        executable.export_library(str(directory / file), **devicecode.export_options(plan.target, log))
        checked = devicecode.check_library(plan.target, directory / file)
        # "layout": how the loader stores the HF tensor (`run.layouts`); absent: as the checkpoint has it.
        own = [{"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype,
                **({"layout": p.attrs["layout"]} if "layout" in p.attrs else {})} for name, p in params]
        parameters += own
        if stage is None or stage.is_first:
            functions, device_code = function_signatures(mod), checked
        if stage is not None:
            stage_records.append({"stage": stage.index, "layers": [stage.first_layer, stage.end_layer],
                                  "library": {"file": file, "sha256": library.sha256_file(directory / file)},
                                  "functions": function_signatures(mod), "device_code": checked,
                                  # its parameters: parameters[start:end] (a tied embedding is in two)
                                  "parameter_range": [len(parameters) - len(own), len(parameters)]})
    if plan.schedules:
        log(f"      tuned kernels: {len(report.tuned)}; default schedules: {len(report.default_static)} "
            f"static without a record{': ' + ', '.join(sorted(report.default_static)) if report.default_static else ''}"
            f", {len(report.default_symbolic)} with symbolic shapes")
    if report.rule:
        log(f"      qcompile CPU rules scheduled {len(report.rule)} kernels: "
            + ", ".join(f"{rule} x{list(report.rule.values()).count(rule)}" for rule in sorted(set(report.rule.values()))))
    manifest = {
        "format": library.MANIFEST_FORMAT,
        "model": {"name": spec.name, "family": spec.family.name, "kind": spec.kind.name,
                  "source": spec.source, "config": dataclasses.asdict(spec.config)},
        "target": plan.target.record(),
        "dtype": plan.dtype,
        "quantization": plan.quantization.as_json() if plan.quantization else None,
        "max_seq_len": plan.max_seq_len,
        "prefill_chunk": plan.prefill_chunk,
        "functions": functions,  # stage 0's when pipelined (each stage's: `pipeline`)
        "parameters": parameters,
        # (one shard's when split; a tied embedding two stages hold counted once; quantized: the float
        # model's, the packed tensors being storage of those)
        "parameter_count": (sum(math.prod(p["shape"]) for p in {p["name"]: p for p in parameters}.values())
                            if plan.quantization is None
                            else sum(math.prod(s) for s in spec.family.hf_tensors(spec.config).values())),
        "active_parameter_count": spec.family.active_parameter_count(spec.config),
        "library": {"file": library.LIBRARY, "sha256": library.sha256_file(directory / library.LIBRARY)},
        "versions": versions(),
        "buckets": plan.buckets,
        "kv_cache": kv_cache_manifest(plan),
        "batch": batch_manifest(plan),
        "device_code": device_code,
        "tuning_database": ({**plan.schedules.as_json(), "kernels": report.as_json()}
                            if plan.schedules else None),
        # Tensor-parallel split: plan, shard count, one shard's config fields (`parameters` are per shard).
        "parallel": plan.parallel.record(spec.config) if plan.parallel else None,
        # Pipeline stages: each one's layers, shared object, entry points and parameters (of `parameters`).
        "pipeline": ({"stages": stage_records, "balance": stages.record(spec, plan.stages)}
                     if plan.stages else None),
        "cpu_rules": report.rule,  # kernel -> the qcompile CPU rule that scheduled it (no record in a database)
        "memory_plan": memory.of_build(plan),
        "identity": plan.identity(),
        "build": {"seconds": round(time.perf_counter() - start, 2),
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
    }
    write_json(directory / library.MANIFEST, manifest)  # last: a directory with a manifest is complete
    return manifest

"""Relax module -> kernels scheduled for a target: the pass order that building and tuning share.

  1. FuseTransposeMatmul   x @ W^T reads W [out, in] where it lies (without it every call copies
                           every weight into a transposed temporary: 2x the bytes of a decode step)
  2. fuse                  library dispatch, LegalizeOps .. FuseTIR: one PrimFunc per fused kernel;
                           these PrimFuncs are MetaSchedule's tuning tasks (`fused`)
  3. schedule              kernels the tuning database has records for get their best schedule; on GPU
                           dlight's default rules schedule the rest (a GPU kernel needs thread bindings);
                           on CPU qcompile's own rules (`cpu_rules`) schedule the kernel classes they
                           know, and the rest keep TVM's default lowering
  4. TVM's own lowering for the target kind (dataflow lowering and finalize passes)
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

GPU_KINDS = ("cuda", "rocm")


@dataclasses.dataclass
class ScheduleReport:
    """Which kernels a build scheduled from the database, and which it left to default schedules."""

    tuned: list[str] = dataclasses.field(default_factory=list)
    default_static: list[str] = dataclasses.field(default_factory=list)  # tunable, no record
    rule: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel -> the cpu_rules rule used
    default_symbolic: list[str] = dataclasses.field(default_factory=list)  # symbolic shapes: not tuned

    def as_json(self) -> dict[str, Any]:
        return {"tuned": sorted(self.tuned), "default_static": sorted(self.default_static),
                "default_symbolic": sorted(self.default_symbolic), "rule_scheduled": dict(sorted(self.rule.items()))}


def is_symbolic(func: Any) -> bool:
    """A kernel whose shapes depend on a runtime value: a symbolic dim (`n = TypeVar("n")` heads its
    script) or a scalar parameter (`p: T.int64`). MetaSchedule tunes only static shapes."""
    return bool(_SYMBOLIC.search(func.script()))


_SYMBOLIC = re.compile(r"^\w+ = TypeVar\(|: T\.int64[,)]", re.MULTILINE)


def fused(mod: Any, target: Any) -> Any:
    """Stages 1-2: the module whose PrimFuncs are the kernels (and the tuning tasks)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    passes = [relax.transform.FuseTransposeMatmul(), *_backend(target).library_dispatch_passes(target),
              relax.transform.LegalizeOps(),
              relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(),
              relax.transform.DeadCodeElimination()]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def schedule(mod: Any, target: Any, database: Any | None, report: ScheduleReport,
             rules_first: bool = False) -> Any:
    """Stage 3 on a fused module; fills `report` when a database is applied. `rules_first`: the
    database was tuned before qcompile's CPU rules existed (its records never competed with them), so
    the kernels a rule takes get the rule, and the database serves the rest."""
    import tvm  # noqa: PLC0415
    from tvm import relax, tirx  # noqa: PLC0415

    cpu = target.kind.name not in GPU_KINDS
    with target, tvm.transform.PassContext(opt_level=3):
        if cpu and rules_first:
            mod = cpu_default_schedules(mod, target, report)
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        # Which kernels the database served (the report is only recorded when one was applied; telling
        # symbolic from static prints each kernel, so a build without one skips it).
        for gv, func in mod.functions_items() if database is not None else ():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if gv.name_hint in report.rule:
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                report.tuned.append(gv.name_hint)
            elif is_symbolic(func):
                report.default_symbolic.append(gv.name_hint)
            else:
                report.default_static.append(gv.name_hint)
        if target.kind.name in GPU_KINDS:
            mod = gpu_default_schedules(mod)
        else:
            mod = cpu_default_schedules(mod, target, report)
    return mod


def cpu_default_schedules(mod: Any, target: Any, report: ScheduleReport) -> Any:
    """qcompile's CPU rules for every kernel the database did not schedule."""
    from tvm import tirx  # noqa: PLC0415

    from .cpu_rules import default_schedule  # noqa: PLC0415

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        found = default_schedule(func, target)
        if found is not None:
            rule, sch = found
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            report.rule[gv.name_hint] = rule
    return mod


def gpu_default_schedules(mod: Any) -> Any:
    """dlight's rules for every kernel the database did not schedule. Tensorize (the WMMA path of
    dl.gpu.Matmul) is switched off per kernel: it segfaults on float16 in TVM 0.27."""
    from tvm import tirx  # noqa: PLC0415
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    import tvm  # noqa: PLC0415

    rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        one = tvm.IRModule({gv: func.with_attr("dlight.do_not_tensorize", True)})
        # dlight's reduction rules give the attention products over a symbolic cache length
        # (models.layers.attention_scores / attention_values) a cross-thread reduction that TVM 0.27
        # then fails to lower ("reduction-related loops ... not the deepest"): Fallback binds their
        # spatial loops to threads and runs each reduction in one thread.
        kernel_rules = (dl.gpu.Fallback(),) if _is_attention_product(func) else rules
        mod[gv] = dl.ApplyDefaultSchedule(*kernel_rules)(one)[gv]
    return mod


def _is_attention_product(func: Any) -> bool:
    from .cpu_rules import ATTENTION_BLOCKS, first_block_name  # noqa: PLC0415

    return first_block_name(func) in ATTENTION_BLOCKS


def _backend(target: Any) -> Any:
    """TVM's pass lists for the target kind (tvm.relax.backend.<kind>.pipeline)."""
    kind = {"llvm": "cpu_generic"}.get(target.kind.name, target.kind.name)
    return importlib.import_module(f"tvm.relax.backend.{kind}.pipeline")


def relax_pipeline(target: Any, database: Any | None, report: ScheduleReport, rules_first: bool = False) -> Any:
    """The whole Relax pipeline for `tvm.compile(..., relax_pipeline=...)`."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="qcompile_pipeline")
    def _pipeline(mod, _ctx):
        mod = schedule(fused(mod, target), target, database, report, rules_first)
        backend = _backend(target)
        # RewriteDataflowReshape (reshape kernels -> views) is left out: in TVM 0.27 it fails on the
        # GQA transpose of the prefill bucket ([p + 128, heads, 128], qwen-72b) "padding factor ... not
        # divisible"; the reshapes it would save are activation-sized copies.
        lower = [p for p in backend.dataflow_lower_passes(target)
                 if "RewriteDataflowReshape" not in str(p.info.name)] + backend.finalize_passes(target)
        with target:
            return tvm.transform.Sequential(lower)(mod)

    return _pipeline

"""MetaSchedule's side of tuning: a model's tunable kernels as tasks, the builder and runner that measure
candidates (local, or a device behind TVM's RPC tracker), the default schedule as candidate 0, and
reading results back from the database.

Tasks are the fused kernels of the model's build (`build.lowering.fused`) whose shapes are all static:
the decode step (one token), the prefill bucket (the target's prefill_chunk tokens), the image encoder's
batch-1 bucket. Kernels with symbolic shapes (attention over the growing KV cache, the symbolic-length
prefill) are not tuned; they keep default schedules.
"""

from __future__ import annotations

import fnmatch
import functools
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..build import builder as library_builder
from ..build import cpu_rules, lowering
from ..build.plan import BuildPlan
from ..build.schedules import check_database
from ..errors import UserError

# Each candidate: 3 timed calls (repeated until 20 ms for tiny kernels); a candidate slower than
# RUN_TIMEOUT seconds for its 3 calls is recorded as failed rather than waited for.
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20, "enable_cpu_cache_flush": False}
RUN_TIMEOUT = 20
# The target intrinsics each device's tuning registers (see `register_target_intrinsics`).
# TVM imports tvm.s_tir.tensor_intrin (every architecture's tensor intrinsics: ~20 s here, 14 s of it
# CUDA's) when a tuning context or a builder worker starts. Registering only the target's own keeps
# a tuning round to seconds.
TENSOR_INTRINSICS = {"cpu": ("x86",), "cuda": ("cuda",), "rocm": ("rocm",)}


def register_target_intrinsics(device: str) -> None:
    """Make `tvm.s_tir.tensor_intrin` a package holding just the `device`'s target intrinsics (in this
    process; also passed as the builder and runner workers' initializer)."""
    import importlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    package = types.ModuleType(name)
    package.__path__ = list(importlib.util.find_spec(name).submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    for sub in TENSOR_INTRINSICS.get(device, ()):
        setattr(package, sub, importlib.import_module(f"{name}.{sub}"))


def parse_rpc(text: str) -> tuple[str, int, str]:
    """HOST:PORT:KEY (TVM RPC tracker address and the device key)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts) or not parts[1].isdigit():
        raise UserError(f"--rpc {text!r}: expected HOST:PORT:KEY (a TVM RPC tracker and device key)")
    return parts[0], int(parts[1]), parts[2]


def workers(device: str, rpc: str | None) -> tuple[Any, Any]:
    """MetaSchedule's builder and runner (local, or a device behind the RPC tracker)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    init = functools.partial(register_target_intrinsics, device)
    builder = ms.builder.LocalBuilder(initializer=init)
    evaluator = ms.runner.EvaluatorConfig(**EVALUATOR)
    if rpc is None:
        return builder, ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=evaluator,
                                              initializer=init)
    host, port, key = parse_rpc(rpc)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=RUN_TIMEOUT * 4)
    return builder, ms.runner.RPCRunner(config, evaluator_config=evaluator, initializer=init)


def static_tasks(plan: BuildPlan, kernels: str | None = None,
                 functions: list[str] | None = None) -> tuple[list[Any], int]:
    """The model's tunable kernels as MetaSchedule tasks, and how many symbolic ones were left out.
    `functions`: take kernels only from these entry points (e.g. decode); `kernels`: a name glob."""
    from tvm import relax  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    mod, _ = library_builder.export(plan)
    if functions:
        entries = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        unknown = sorted(set(functions) - set(entries))
        if unknown:
            raise UserError(f"--functions: {plan.spec.name} has no entry point {unknown[0]!r} "
                            f"(it has {', '.join(sorted(entries))})")
        for name in set(entries) - set(functions):
            del mod[name]
    tasks = ms.relax_integration.extract_tasks(lowering.fused(mod, plan.target.tvm), plan.target.tvm)
    static = [t for t in tasks if not lowering.is_symbolic(t.dispatched[0]["main"])]
    symbolic = len(tasks) - len(static)
    static = [t for t in static if schedulable(t.dispatched[0])]  # not library calls (topk, sort)
    if kernels is not None:
        static = [t for t in static if fnmatch.fnmatchcase(t.task_name, kernels)]
        if not static:
            raise UserError(f"--kernels {kernels!r} matches none of {plan.spec.name}'s tunable kernels")
    return static, symbolic


def measure(mods: list[Any], target: Any, device: str, builder: Any, runner: Any) -> list[list[float] | None]:
    """Run seconds of each one-kernel IRModule, built and run the way MetaSchedule measures its
    candidates (None where building or running failed)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    builds = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, slots = [], []
    for i, (mod, built) in enumerate(zip(mods, builds, strict=True)):
        if built.error_msg is None:
            inputs.append(ms.runner.RunnerInput(built.artifact_path, device,
                                                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
            slots.append(i)
    seconds: list[list[float] | None] = [None] * len(mods)
    for i, future in zip(slots, runner.run(inputs), strict=True):
        result = future.result()
        if result.error_msg is None:
            seconds[i] = [float(s) for s in result.run_secs]
    return seconds


def record_counts(directory: Path) -> Counter:
    lines = check_database(directory)
    return Counter(lines.workloads[index] for index, _ in lines.records)


def input_shapes(mod: Any) -> str:
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])[:-1]  # the last is the output
    return " ".join("x".join(str(int(d)) for d in a.shape) for a in args if hasattr(a, "shape"))


def schedulable(mod: Any) -> bool:
    """A kernel written as TIR blocks (a library call such as topk has none to schedule)."""
    from tvm import s_tir  # noqa: PLC0415

    try:
        s_tir.Schedule(mod).get_sblock("root")
    except Exception:  # noqa: BLE001 (TVM raises its own error types for a missing block)
        return False
    return True


def _default_schedule(mod: Any, target: Any) -> tuple[Any, Any]:
    """(trace, scheduled module) of the schedule a build gives this kernel without a record: qcompile's
    CPU rule for its class (`build.cpu_rules`), else TVM's default lowering, recorded as a trace that
    changes nothing (one lookup of the root block: the database's top-k skips empty traces)."""
    from tvm import s_tir  # noqa: PLC0415

    found = cpu_rules.default_schedule(mod["main"], target)
    if found is not None:
        return found[1].trace, found[1].mod
    schedule = s_tir.Schedule(mod)
    schedule.get_sblock("root")
    return schedule.trace, mod


def _rule_trace(trace: Any) -> bool:
    """A trace a cpu_rules rule made (its blocks carry the rule annotation)."""
    return any(inst.kind.name == "Annotate" and cpu_rules.RULE_ATTR in [str(a) for a in inst.attrs]
               for inst in trace.insts)


def _is_default(record: Any) -> bool:
    return len(record.trace.insts) == 1 or _rule_trace(record.trace)


def record_defaults(db: Any, tasks: list[Any], workloads: list[Any], target: Any, device: str, builder: Any,
                    runner: Any, log: Callable[[str], None]) -> None:
    """Measure and record the default schedule of each kernel without a record of it (CPU only: a GPU
    kernel does not run unscheduled, and dlight's schedule is not a trace the database can hold). A
    database tuned before a cpu_rules rule covered a kernel gets the rule's schedule recorded too, so
    the best record is never slower than what a build without the database runs."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    if device != "cpu":
        return
    defaults = [_default_schedule(tasks[i].dispatched[0], target) for i in range(len(tasks))]
    records = db.get_all_tuning_records()
    todo = [i for i, w in enumerate(workloads)  # a failed default counts as recorded
            if not any(r.workload.same_as(w) and _is_default(r)
                       and _rule_trace(r.trace) == _rule_trace(defaults[i][0]) for r in records)]
    if not todo:
        return
    log(f"measuring {len(todo)} kernels with their default schedules")
    mods = [defaults[i][1] for i in todo]
    for i, mod, secs in zip(todo, mods, measure(mods, target, device, builder, runner), strict=True):
        db.commit_tuning_record(ms.database.TuningRecord(
            defaults[i][0], workloads[i], run_secs=secs or [1e10], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def default_seconds(db: Any, workload: Any) -> float | None:
    """The default schedule's mean run time (a rule's, when one was recorded, over TVM's default)."""
    found = [r for r in db.get_all_tuning_records()
             if r.workload.same_as(workload) and _is_default(r) and r.run_secs]
    for record in sorted(found, key=lambda r: not _rule_trace(r.trace)):
        secs = [float(s) for s in record.run_secs]
        return statistics.mean(secs) if max(secs) < 1e9 else None
    return None


def best_seconds(db: Any, task: Any) -> float | None:
    """Mean run time of the task's best valid record, or None."""
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    return statistics.mean(float(s) for s in top[0].run_secs) if top else None



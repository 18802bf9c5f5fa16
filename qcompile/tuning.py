"""`qcompile tune`: MetaSchedule (XGBoost cost model) on a model's static-shape kernels, resumable.

Tasks are the fused kernels of the model's build (`lowering.fused`) whose shapes are all static: the
decode step (one token), the prefill bucket (the target's prefill_chunk tokens), the image encoder's
batch-1 bucket. Kernels with symbolic shapes (attention over the growing KV cache, the symbolic-length
prefill) are not tuned; they keep default schedules.

Nothing finished is lost: MetaSchedule's JSON database appends each measured candidate as it finishes. A
rerun counts the records each kernel already has and tunes only the rest of its `trials` (a record cut
short by a kill is dropped on reopening). Default and tuned times come from the same builder and runner
(local, or a device behind TVM's RPC tracker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import logging
import signal
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import lowering, pipeline
from .atomic import atomic_file, write_json
from .errors import UserError
from .schedules import RECORDS, WORKLOADS, check_database, schedules_root
from .schema import read_json_object

REPORT = "report.json"
CURVE = "curve.png"
TRIALS_PER_ITERATION = 16  # candidates measured per search round
# Evolutionary search sized for a 2-core machine (TVM's default population is 512, 4 generations).
SEARCH = {"population_size": 256, "genetic_num_iters": 3}
# Each candidate: 3 timed calls (repeated until 20 ms for tiny kernels); a candidate slower than
# RUN_TIMEOUT seconds for its 3 calls is recorded as failed rather than waited for.
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20, "enable_cpu_cache_flush": False}
RUN_TIMEOUT = 20


@dataclasses.dataclass
class TaskResult:
    name: str
    weight: int  # calls per model step (identical layers share one kernel)
    workload: str  # MetaSchedule's structural hash of the kernel
    trials: int = 0  # records in the database
    default_seconds: float | None = None
    tuned_seconds: float | None = None  # best record
    inputs: str = ""  # the kernel's input shapes, e.g. "128x896 9728x896" (names repeat across functions)

    @property
    def speedup(self) -> float | None:
        if self.default_seconds and self.tuned_seconds:
            return self.default_seconds / self.tuned_seconds
        return None


# TVM imports tvm.s_tir.tensor_intrin (every architecture's tensor intrinsics: ~20 s here, 14 s of it
# CUDA's) when a tuning context or a builder worker starts. Registering only the target's own keeps
# a tuning round to seconds.
TENSOR_INTRINSICS = {"llvm": ("x86",), "cuda": ("cuda",), "rocm": ("rocm",)}


def register_target_intrinsics(kind: str) -> None:
    """Make `tvm.s_tir.tensor_intrin` a package holding just the `kind` target's intrinsics (in this
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
    for sub in TENSOR_INTRINSICS.get(kind, ()):
        setattr(package, sub, importlib.import_module(f"{name}.{sub}"))


def default_directory(plan: pipeline.BuildPlan) -> Path:
    return schedules_root() / plan.target.name / plan.spec.name


def parse_rpc(text: str) -> tuple[str, int, str]:
    """HOST:PORT:KEY (TVM RPC tracker address and the device key)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts) or not parts[1].isdigit():
        raise UserError(f"--rpc {text!r}: expected HOST:PORT:KEY (a TVM RPC tracker and device key)")
    return parts[0], int(parts[1]), parts[2]


# MetaSchedule's per-task search log: warnings only (its INFO tables would tear the progress bar).
_SEARCH_LOG = logging.getLogger("qcompile.tuning.search")
_SEARCH_LOG.setLevel(logging.WARNING)


def _workers(target: Any, rpc: str | None) -> tuple[Any, Any]:
    """MetaSchedule's builder and runner (local, or a device behind the RPC tracker)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    init = functools.partial(register_target_intrinsics, target.kind.name)
    builder = ms.builder.LocalBuilder(initializer=init)
    evaluator = ms.runner.EvaluatorConfig(**EVALUATOR)
    if rpc is None:
        return builder, ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=evaluator,
                                              initializer=init)
    host, port, key = parse_rpc(rpc)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=RUN_TIMEOUT * 4)
    return builder, ms.runner.RPCRunner(config, evaluator_config=evaluator, initializer=init)


def static_tasks(plan: pipeline.BuildPlan, kernels: str | None = None,
                 functions: list[str] | None = None) -> tuple[list[Any], int]:
    """The model's tunable kernels as MetaSchedule tasks, and how many symbolic ones were left out.
    `functions`: take kernels only from these entry points (e.g. decode); `kernels`: a name glob."""
    from tvm import relax  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    mod, _ = pipeline.export(plan)
    if functions:
        entries = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        unknown = sorted(set(functions) - set(entries))
        if unknown:
            raise UserError(f"--functions: {plan.spec.name} has no entry point {unknown[0]!r} "
                            f"(it has {', '.join(sorted(entries))})")
        for name in set(entries) - set(functions):
            del mod[name]
    tasks = ms.relax_integration.extract_tasks(lowering.fused(mod, plan.tvm_target), plan.tvm_target)
    static = [t for t in tasks if not lowering.is_symbolic(t.dispatched[0]["main"])]
    symbolic = len(tasks) - len(static)
    static = [t for t in static if _schedulable(t.dispatched[0])]  # not library calls (topk, sort)
    if kernels is not None:
        static = [t for t in static if fnmatch.fnmatchcase(t.task_name, kernels)]
        if not static:
            raise UserError(f"--kernels {kernels!r} matches none of {plan.spec.name}'s tunable kernels")
    return static, symbolic


def measure(mods: list[Any], target: Any, builder: Any, runner: Any) -> list[list[float] | None]:
    """Run seconds of each one-kernel IRModule, built and run the way MetaSchedule measures its
    candidates (None where building or running failed)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    builds = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, slots = [], []
    for i, (mod, built) in enumerate(zip(mods, builds, strict=True)):
        if built.error_msg is None:
            inputs.append(ms.runner.RunnerInput(built.artifact_path, _device_type(target),
                                                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
            slots.append(i)
    seconds: list[list[float] | None] = [None] * len(mods)
    for i, future in zip(slots, runner.run(inputs), strict=True):
        result = future.result()
        if result.error_msg is None:
            seconds[i] = [float(s) for s in result.run_secs]
    return seconds


def _device_type(target: Any) -> str:
    return {"llvm": "cpu"}.get(target.kind.name, target.kind.name)


class _Progress:
    """A tqdm bar over all trials of the run; the postfix shows the current task and its best time."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm  # noqa: PLC0415

        self.bar = tqdm(total=total, unit="trial", disable=not enabled or total == 0, dynamic_ncols=True)
        self.best: float | None = None

    def start(self, name: str, best: float | None) -> None:
        self.name, self.best = name, best
        self._show()

    def measured(self, run_seconds: list[float | None]) -> None:
        valid = [s for s in run_seconds if s is not None]
        if valid:
            self.best = min(valid + ([self.best] if self.best is not None else []))
        self.bar.update(len(run_seconds))
        self._show()

    def _show(self) -> None:
        best = f"{self.best * 1e3:.3f} ms" if self.best is not None else "-"
        self.bar.set_postfix_str(f"{self.name}: best {best}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def _measure_callback(progress: _Progress) -> Any:
    from tvm.ir.utils import derived_object  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            secs = []
            for result in runner_results:
                ok = result.error_msg is None and result.run_secs
                secs.append(statistics.mean(float(s) for s in result.run_secs) if ok else None)
            progress.measured(secs)
            if _STOP:  # a signal came: this batch is in the database (AddToDatabase ran first)
                raise KeyboardInterrupt

    return ProgressCallback()


def tune(plan: pipeline.BuildPlan, *, trials: int, directory: Path | None = None, rpc: str | None = None,
         kernels: str | None = None, functions: list[str] | None = None,
         log: Callable[[str], None] = print, show_progress: bool = True) -> dict[str, Any]:
    """Tune the plan's static kernels to `trials` records each (resuming); write report and curve.

    Candidate 0 of every CPU kernel is its default schedule (a no-op trace), measured like the others:
    the database's best record is then never slower than what a build without it would run."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    target = plan.tvm_target
    if target.kind.name != "llvm" and rpc is None:
        raise UserError(f"target '{plan.target.name}' runs on a {plan.target.device} device, which this "
                        "machine lacks: measure on one with --rpc HOST:PORT:KEY")
    directory = Path(directory) if directory is not None else default_directory(plan)
    register_target_intrinsics(target.kind.name)
    builder, runner = _workers(target, rpc)
    log(f"extracting kernels of {plan.spec.name} for {plan.target.name}")
    tasks, symbolic = static_tasks(plan, kernels, functions)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the schedules directory ({e.strerror})") from None
    check_database(directory, repair=True)  # a record cut short by a kill is dropped here
    db = ms.database.JSONDatabase(str(directory / WORKLOADS), str(directory / RECORDS))
    workloads = [db.commit_workload(t.dispatched[0]) for t in tasks]
    keys = [str(w.as_json()[0]) for w in workloads]  # the structural hash the file stores
    _record_defaults(db, tasks, workloads, target, builder, runner, log)
    done = _record_counts(directory)
    results = [TaskResult(t.task_name, int(t.weight), k, done[k], _default_seconds(db, w),
                          inputs=_input_shapes(t.dispatched[0]))
               for t, k, w in zip(tasks, keys, workloads, strict=True)]
    # Costliest kernels first (weight x default time), so a run cut short has spent its time well.
    order = sorted(range(len(tasks)), key=lambda i: -results[i].weight * (results[i].default_seconds or 1e9))
    tasks, results = [tasks[i] for i in order], [results[i] for i in order]

    remaining = {r.workload: max(0, trials - r.trials) for r in results}
    total = sum(remaining.values())
    log(f"{len(tasks)} kernels to tune ({symbolic} with symbolic shapes keep default schedules); "
        f"{total} trials to run, {sum(r.trials for r in results)} records already in {directory}")
    progress = _Progress(total, show_progress)
    cost_model = ms.cost_model.XGBModel()  # shared: what one kernel teaches carries to the next
    try:
        with tempfile.TemporaryDirectory(prefix="qcompile-tune-") as work_dir, _interruptible(log):
            for task, result in zip(tasks, results, strict=True):
                budget = remaining[result.workload]
                if budget == 0 or _STOP:
                    continue
                progress.start(result.name, _best(db, task))
                context = ms.TuneContext(
                    mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                    search_strategy=ms.search_strategy.EvolutionarySearch(**SEARCH),
                    task_name=task.task_name, logger=_SEARCH_LOG, num_threads="physical")
                ms.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=work_dir,
                              max_trials_global=budget, max_trials_per_task=budget,
                              num_trials_per_iter=min(budget, TRIALS_PER_ITERATION), builder=builder,
                              runner=runner, database=db, cost_model=cost_model,
                              measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                                 _measure_callback(progress)])
    finally:
        progress.close()
    done = _record_counts(directory)
    for task, result in zip(tasks, results, strict=True):
        result.trials, result.tuned_seconds = done[result.workload], _best(db, task)
    # Kernels tuned by earlier runs into this directory (e.g. --functions decode, then prefill_128)
    # stay in the report and the curve.
    tuned_now = {r.workload for r in results}
    earlier = []
    if (directory / REPORT).is_file():
        fields = {f.name for f in dataclasses.fields(TaskResult)}
        earlier = [TaskResult(**{k: v for k, v in t.items() if k in fields})
                   for t in read_json_object(directory / REPORT, missing="").get("tasks", [])
                   if t.get("workload") not in tuned_now]
    report = _report(plan, directory, results + earlier, symbolic, trials, rpc)
    write_json(directory / REPORT, report)
    _plot_curve(directory / CURVE, check_database(directory), results + earlier, plan.spec.name)
    return report


_STOP: list[int] = []  # signals received during a tuning run


@contextlib.contextmanager
def _interruptible(log: Callable[[str], None]):
    """Ctrl-C or SIGTERM stop tuning after the batch being measured: the measure callback raises
    KeyboardInterrupt once that batch's records are in the database (raising from the signal handler
    itself, at an arbitrary point inside TVM or XGBoost, crashed the process). A second signal stops at
    once. MetaSchedule re-wraps the callback's exception as a RuntimeError; the flag tells them apart."""
    _STOP.clear()

    def handler(signum, _frame):
        if _STOP:
            raise KeyboardInterrupt
        _STOP.append(signum)
        log("stopping after the batch being measured (its records are kept); signal again to stop now")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception:
        if _STOP:
            raise KeyboardInterrupt from None
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if _STOP:
        raise KeyboardInterrupt


def _record_counts(directory: Path) -> Counter:
    lines = check_database(directory)
    return Counter(lines.workloads[index] for index, _ in lines.records)


def _input_shapes(mod: Any) -> str:
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])[:-1]  # the last is the output
    return " ".join("x".join(str(int(d)) for d in a.shape) for a in args if hasattr(a, "shape"))


def _schedulable(mod: Any) -> bool:
    """A kernel written as TIR blocks (a library call such as topk has none to schedule)."""
    from tvm import s_tir  # noqa: PLC0415

    try:
        s_tir.Schedule(mod).get_sblock("root")
    except Exception:  # noqa: BLE001 (TVM raises its own error types for a missing block)
        return False
    return True


def _default_trace(mod: Any) -> Any:
    """A trace that changes nothing: one lookup of the root block. (The database's top-k skips records
    with an empty trace, so the default schedule is recorded with this one.)"""
    from tvm import s_tir  # noqa: PLC0415

    schedule = s_tir.Schedule(mod)
    schedule.get_sblock("root")
    return schedule.trace


def _is_default(record: Any) -> bool:
    return len(record.trace.insts) == 1


def _record_defaults(db: Any, tasks: list[Any], workloads: list[Any], target: Any, builder: Any,
                     runner: Any, log: Callable[[str], None]) -> None:
    """Measure and record the default schedule of each kernel without such a record (CPU only: a GPU
    kernel does not run unscheduled, and dlight's schedule is not a trace the database can hold)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    if target.kind.name != "llvm":
        return
    recorded = {id(w) for w in workloads
                if any(r.workload.same_as(w) and _is_default(r) for r in db.get_all_tuning_records())}
    todo = [i for i, w in enumerate(workloads) if id(w) not in recorded]  # a failed default counts
    if not todo:
        return
    log(f"measuring {len(todo)} kernels with their default schedules")
    mods = [tasks[i].dispatched[0] for i in todo]
    for i, mod, secs in zip(todo, mods, measure(mods, target, builder, runner), strict=True):
        db.commit_tuning_record(ms.database.TuningRecord(
            _default_trace(mod), workloads[i], run_secs=secs or [1e10], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def _default_seconds(db: Any, workload: Any) -> float | None:
    for record in db.get_all_tuning_records():
        if record.workload.same_as(workload) and _is_default(record) and record.run_secs:
            secs = [float(s) for s in record.run_secs]
            return statistics.mean(secs) if max(secs) < 1e9 else None
    return None


def _best(db: Any, task: Any) -> float | None:
    """Mean run time of the task's best valid record, or None."""
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    return statistics.mean(float(s) for s in top[0].run_secs) if top else None


def _report(plan: pipeline.BuildPlan, directory: Path, results: list[TaskResult], symbolic: int,
            trials: int, rpc: str | None) -> dict[str, Any]:
    def total(attr: str) -> float | None:
        values = [(r.weight, getattr(r, attr) or r.default_seconds) for r in results]
        return None if any(v is None for _, v in values) else sum(w * v for w, v in values)

    return {"model": plan.spec.name, "target": plan.target.name, "directory": str(directory),
            "trials_per_task": trials,
            "measured_on": rpc or "local", "symbolic_kernels_untuned": symbolic,
            "tasks": [{**dataclasses.asdict(r), "speedup": r.speedup} for r in results],
            "static_kernels_seconds_per_step": {"default": total("default_seconds"),
                                                "tuned": total("tuned_seconds")}}


def _plot_curve(path: Path, lines: Any, results: list[TaskResult], model: str) -> None:
    """Estimated time of all tuned kernels (sum of weight x best so far; default until a kernel has a
    record) against the trials measured, in database order."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    by_key = {r.workload: r for r in results}
    best = {r.workload: r.default_seconds for r in results}
    if any(v is None for v in best.values()):
        return  # a kernel without a default time: no honest total to draw
    xs, ys = [0], [sum(by_key[k].weight * v for k, v in best.items())]
    for index, seconds in lines.records:
        key = lines.workloads[index]
        if key not in by_key:
            continue
        if seconds is not None and seconds < best[key]:
            best[key] = seconds
        xs.append(xs[-1] + 1)
        ys.append(sum(by_key[k].weight * v for k, v in best.items()))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [y * 1e3 for y in ys])
    ax.set(xlabel="trials measured", ylabel="static kernels, ms per model step",
           title=f"{model}: tuning curve", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_file(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def format_report(report: dict[str, Any]) -> list[list[str]]:
    """Rows for the per-task table: kernel, weight, trials, default ms, tuned ms, speedup."""
    def ms_(v: float | None) -> str:
        return f"{v * 1e3:.4f}" if v is not None else "-"

    rows = [[f"{t['name']} ({t.get('inputs') or '?'})", str(t["weight"]), str(t["trials"]), ms_(t["default_seconds"]),
             ms_(t["tuned_seconds"]), f"{t['speedup']:.1f}x" if t["speedup"] else "-"]
            for t in sorted(report["tasks"], key=lambda t: -(t["weight"] * (t["default_seconds"] or 0)))]
    totals = report["static_kernels_seconds_per_step"]
    if totals["default"] and totals["tuned"]:
        rows.append(["TOTAL (weighted)", "", "", ms_(totals["default"]), ms_(totals["tuned"]),
                     f"{totals['default'] / totals['tuned']:.1f}x"])
    return rows

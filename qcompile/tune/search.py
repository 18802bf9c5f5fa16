"""`qcompile tune`: MetaSchedule's evolutionary search (XGBoost cost model) over a model's static-shape
kernels, costliest first, resumable and interruptible.

Nothing finished is lost: MetaSchedule's JSON database appends each measured candidate as it finishes. A
rerun counts the records each kernel already has and tunes only the rest of its `trials` (a record cut
short by a kill is dropped on reopening). Default and tuned times come from the same builder and runner
(local, or a device behind TVM's RPC tracker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..build.plan import BuildPlan
from ..build.schedules import RECORDS, WORKLOADS, check_database, default_tuning_directory
from ..errors import UserError
from ..spec.schema import read_json_object
from . import tasks as tuning_tasks
from .report import TaskResult, plot_curve, report

REPORT = "report.json"
CURVE = "curve.png"
TRIALS_PER_ITERATION = 16  # candidates measured per search round
# Evolutionary search sized for a 2-core machine (TVM's default population is 512, 4 generations).
SEARCH = {"population_size": 256, "genetic_num_iters": 3}

# MetaSchedule's per-task search log: warnings only (its INFO tables would tear the progress bar).
_SEARCH_LOG = logging.getLogger("qcompile.tuning.search")
_SEARCH_LOG.setLevel(logging.WARNING)


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


def tune(plan: BuildPlan, *, trials: int, directory: Path | None = None, rpc: str | None = None,
         kernels: str | None = None, functions: list[str] | None = None,
         log: Callable[[str], None] = print, show_progress: bool = True) -> dict[str, Any]:
    """Tune the plan's static kernels to `trials` records each (resuming); write report and curve.

    Candidate 0 of every CPU kernel is its default schedule (a no-op trace), measured like the others:
    the database's best record is then never slower than what a build without it would run."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    target, device = plan.target.tvm, plan.target.device
    if device != "cpu" and rpc is None:
        raise UserError(f"target '{plan.target.name}' runs on a {device} device, which this "
                        "machine lacks: measure on one with --rpc HOST:PORT:KEY")
    directory = (Path(directory) if directory is not None
                 else default_tuning_directory(plan.target.name, plan.spec.name))
    tuning_tasks.register_target_intrinsics(device)
    builder, runner = tuning_tasks.workers(device, rpc)
    log(f"extracting kernels of {plan.spec.name} for {plan.target.name}")
    tasks, symbolic = tuning_tasks.static_tasks(plan, kernels, functions)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the schedules directory ({e.strerror})") from None
    check_database(directory, repair=True)  # a record cut short by a kill is dropped here
    db = ms.database.JSONDatabase(str(directory / WORKLOADS), str(directory / RECORDS))
    workloads = [db.commit_workload(t.dispatched[0]) for t in tasks]
    keys = [str(w.as_json()[0]) for w in workloads]  # the structural hash the file stores
    tuning_tasks.record_defaults(db, tasks, workloads, target, device, builder, runner, log)
    done = tuning_tasks.record_counts(directory)
    results = [TaskResult(t.task_name, int(t.weight), k, done[k], tuning_tasks.default_seconds(db, w),
                          inputs=tuning_tasks.input_shapes(t.dispatched[0]))
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
                progress.start(result.name, tuning_tasks.best_seconds(db, task))
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
    done = tuning_tasks.record_counts(directory)
    for task, result in zip(tasks, results, strict=True):
        result.trials, result.tuned_seconds = done[result.workload], tuning_tasks.best_seconds(db, task)
    # Kernels tuned by earlier runs into this directory (e.g. --functions decode, then prefill_128)
    # stay in the report and the curve.
    tuned_now = {r.workload for r in results}
    earlier = []
    if (directory / REPORT).is_file():
        fields = {f.name for f in dataclasses.fields(TaskResult)}
        earlier = [TaskResult(**{k: v for k, v in t.items() if k in fields})
                   for t in read_json_object(directory / REPORT, missing="").get("tasks", [])
                   if t.get("workload") not in tuned_now]
    content = report(plan.spec.name, plan.target.name, results + earlier, symbolic, trials, rpc)
    write_json(directory / REPORT, content)
    plot_curve(directory / CURVE, check_database(directory), results + earlier, plan.spec.name)
    return {**content, "directory": str(directory)}


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



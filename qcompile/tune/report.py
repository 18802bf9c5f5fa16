"""What a tuning run reports: per kernel its weight, trials, default and best times (`TaskResult`), the
report.json written beside the database, the tuning curve (PNG) and the table `tune` prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..atomic import atomic_file


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


def report(model: str, target: str, results: list[TaskResult], symbolic: int, trials: int,
           rpc: str | None) -> dict[str, Any]:
    """report.json's content. No paths: it is committed beside the database it describes."""
    def total(attr: str) -> float | None:
        values = [(r.weight, getattr(r, attr) or r.default_seconds) for r in results]
        return None if any(v is None for _, v in values) else sum(w * v for w, v in values)

    return {"model": model, "target": target, "trials_per_task": trials,
            "measured_on": rpc or "local", "symbolic_kernels_untuned": symbolic,
            "tasks": [{**dataclasses.asdict(r), "speedup": r.speedup} for r in results],
            "static_kernels_seconds_per_step": {"default": total("default_seconds"),
                                                "tuned": total("tuned_seconds")}}


def plot_curve(path: Path, lines: Any, results: list[TaskResult], model: str) -> None:
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

"""Where a call's time goes, kernel by kernel: the Relax VM's instrument hook times every function the VM
calls (the compiled kernels and the VM's builtins: allocation, shape checks), on the library itself.

(TVM 0.27's Python VM has no profiler, and the PyPI runtime has no `vm_profiler_load_executable`; the
instrument hook is what remains. Its own cost is a Python call per kernel, so absolute times are slightly
high for tiny kernels; the ranking is what it is for.)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def kernel_times(model: Any, call: Callable[[], Any]) -> tuple[float, list[dict[str, Any]]]:
    """(wall seconds of `call()`, per kernel {"kernel", "calls", "seconds"}, costliest first) for a loaded
    library `model` (run.runtime.Library)."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(_func, name, before, _result, *_args):
        if before:
            started.append(time.perf_counter())
        else:
            seconds[name] += time.perf_counter() - started.pop()
            calls[name] += 1

    vm = model._vm
    vm.set_instrument(instrument)
    try:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    finally:
        vm.set_instrument(None)
    ranked = sorted(seconds, key=lambda name: -seconds[name])
    return wall, [{"kernel": name, "calls": calls[name], "seconds": seconds[name]} for name in ranked]

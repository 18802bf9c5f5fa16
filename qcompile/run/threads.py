"""How many threads TVM's runtime runs kernels on.

TVM's thread pool reads TVM_NUM_THREADS once, when its library loads, and without it uses half the
logical CPUs on x86 (it assumes hyper-threading): on a 2-vCPU machine that is one thread, and a decode
step reads weights at half the machine's bandwidth. qcompile therefore sets TVM_NUM_THREADS to every CPU
this process may run on when it is imported (a value the user set is kept), and `--threads N` sets it
before TVM is imported. Once TVM is loaded the count is fixed for the process.
"""

from __future__ import annotations

import os

from ..errors import UserError

VARIABLE = "TVM_NUM_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_all_cpus_by_default() -> None:
    os.environ.setdefault(VARIABLE, str(available_cpus()))


def configure(threads: int | None) -> int:
    """Run kernels on `threads` threads (None: keep the default); returns the count in force. Refused
    once TVM is loaded with another count (its pool cannot be resized)."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        from .tvm_runtime import loaded  # noqa: PLC0415 (tvm-ffi and numpy: not at `import qcompile`)

        if loaded() and os.environ.get(VARIABLE) != str(threads):
            raise UserError(f"--threads {threads}: TVM is already loaded with {os.environ.get(VARIABLE)} "
                            "threads in this process (set TVM_NUM_THREADS before importing tvm)")
        os.environ[VARIABLE] = str(threads)
    return count()


def count() -> int:
    """The thread count kernels run on in this process."""
    use_all_cpus_by_default()
    return int(os.environ[VARIABLE])

"""qcompile: a compiler-driven model zoo for the Qwen family on Apache TVM."""

__version__ = "0.1.0"

from .run.threads import use_all_cpus_by_default  # noqa: E402

use_all_cpus_by_default()  # before anything imports tvm: TVM reads its thread count once, at load

from .api import compile_model, init_weights, load, register_model  # noqa: E402

__all__ = ["__version__", "compile_model", "init_weights", "load", "register_model"]

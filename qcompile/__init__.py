"""qcompile: a compiler-driven model zoo for the Qwen family on Apache TVM."""

__version__ = "0.1.0"

from .api import compile_model, init_weights, load, register_model  # noqa: E402

__all__ = ["__version__", "compile_model", "init_weights", "load", "register_model"]

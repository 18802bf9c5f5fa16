"""What every subcommand shares: the one-line usage error, option types, the build options, tables
and JSON output, and where progress goes (stderr, silent with --json)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError

MODEL_HELP = "zoo name or HF checkpoint directory"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other user error."""

    def error(self, message: str):  # noqa: D102
        raise UserError(f"{self.prog}: {message} (see --help)")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def progress(args) -> Callable[[str], None]:
    """Progress lines go to stderr; with --json, nowhere (stdout is the JSON alone)."""
    if getattr(args, "json", False):
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_json(p: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_target(p: argparse.ArgumentParser, help: str = "a target of `qcompile targets list` (default: cpu)") -> None:
    p.add_argument("--target", default="cpu", help=help)


def add_build_options(p: argparse.ArgumentParser,
                      dtype_help: str = "compute dtype (default: the target's; float32 on cpu)",
                      seq_help: str = "longest sequence (prompt + new tokens) the library accepts; default: "
                                      "the model's max_position_embeddings") -> None:
    p.add_argument("--dtype", help=dtype_help)
    p.add_argument("--max-seq-len", type=non_negative_int, help=seq_help)
    p.add_argument("--quantization", metavar="SCHEME",
                   help="weight scheme: q8, q4 (int8 / int4 with a float16 scale per group), bf16, f16 "
                        "(16-bit storage); default: float weights in --dtype")
    p.add_argument("--group-size", type=non_negative_int, help="q8/q4: weights per scale (default 32)")


def add_runnable(p: argparse.ArgumentParser) -> None:
    """LIBRARY|MODEL and --weights, and what finds a MODEL's registry entry (--target, build options)."""
    p.add_argument("library", type=Path, metavar="LIBRARY|MODEL",
                   help="a library directory, or a MODEL whose registry entry (for --target and the "
                        "build options below, as given to compile --register) is loaded")
    p.add_argument("--target", default="cpu", help="with a MODEL: the target it was built for (cpu)")
    add_build_options(p, dtype_help="with a MODEL: its build dtype", seq_help="with a MODEL: its --max-seq-len")
    p.add_argument("--weights", type=Path, required=True, help="HF checkpoint directory")


def load_runnable(args, spec, library: Path | None):
    """Open what add_runnable's arguments name (`spec, library` from api.describe_runnable)."""
    from .. import api  # noqa: PLC0415

    if library is not None:
        return api.load(library, weights=args.weights)
    return api.load(weights=args.weights, model=spec, target=args.target, dtype=args.dtype,
                    max_seq_len=args.max_seq_len, quantization=args.quantization, group_size=args.group_size)


def listing(group, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that lists or shows something: --json, and `func` as its handler."""
    p = group.add_parser(name, help=help)
    add_json(p)
    p.set_defaults(func=func)
    return p


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=non_negative_int,
                   help="threads the kernels run on (default: every CPU this process may use; "
                        "TVM_NUM_THREADS also sets it)")

"""The `qcompile` command line: one small module per subcommand, each parsing its options, calling
`qcompile.api` and printing (tables, or JSON with --json).

A user error exits with status 2 and one line on stderr; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from types import ModuleType

from ..errors import UserError
from .common import Parser

# The subcommands' modules, in the order `qcompile --help` lists them. Imported when the parser is built, so
# a deploy bundle (`qcompile bundle`) can ship only the modules of the commands it runs.
SUBCOMMANDS = ("zoo", "targets", "inspect", "compile", "tune", "bench", "check", "init_weights", "quantize",
               "dequantize", "run", "chat", "serve", "registry", "bundle", "demo")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qcompile", description=(
        "Compile Qwen-family models with Apache TVM into verified libraries, and run them. MODEL is a "
        "name from the zoo (`qcompile zoo list`) or a Hugging Face checkpoint directory "
        "(config.json [+ safetensors])."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in SUBCOMMANDS:
        _module(name).add(sub)
    return parser


class _OneCommand:
    """Stands in for argparse's subparsers when one subcommand is the whole program: the parser the
    subcommand adds becomes the program's own (its options, help and usage under the program's name)."""

    def __init__(self, prog: str):
        self.prog = prog
        self.parser: Parser | None = None

    def add_parser(self, name: str, help: str | None = None, **kwargs) -> Parser:  # noqa: A002 (argparse's name)
        kwargs.setdefault("description", help)
        self.parser = Parser(prog=self.prog, **kwargs)
        return self.parser


def command_main(command: str, prog: str, argv: list[str] | None = None) -> int:
    """`prog ARGS` as `qcompile COMMAND ARGS` (a bundle's qcompile-run, qcompile-serve, qcompile-chat)."""
    one = _OneCommand(prog)
    _module(command).add(one)
    return _execute(lambda: one.parser.parse_args(argv), prog)


def main(argv: list[str] | None = None) -> int:
    return _execute(lambda: build_parser().parse_args(argv), "qcompile")


def _execute(parse: Callable[[], argparse.Namespace], prog: str) -> int:
    """Parse and run; a UserError is one line on stderr and status 2."""
    try:
        args = parse()
        args.func(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a tuning run keeps every finished record; rerun to resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

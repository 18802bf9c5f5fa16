"""The `qcompile` command line: one small module per subcommand, each parsing its options, calling
`qcompile.api` and printing (tables, or JSON with --json).

A user error exits with status 2 and one line on stderr; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import (bench, chat, check, compile, demo, init_weights, inspect, registry, run, serve, targets, tune,
               zoo)
from .common import Parser

# In the order `qcompile --help` lists them.
SUBCOMMANDS = (zoo, targets, inspect, compile, tune, bench, check, init_weights, run, chat, serve, registry, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qcompile", description=(
        "Compile Qwen-family models with Apache TVM into verified libraries, and run them. MODEL is a "
        "name from the zoo (`qcompile zoo list`) or a Hugging Face checkpoint directory "
        "(config.json [+ safetensors])."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in SUBCOMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted (a tuning run keeps every finished record; rerun to resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

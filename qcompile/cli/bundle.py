"""`qcompile bundle LIBRARY... -o DIR`: a deploy folder that runs the libraries without TVM's compiler."""

from __future__ import annotations

from pathlib import Path

from .. import api
from .common import add_json, emit_json


def add(sub) -> None:
    p = sub.add_parser("bundle", help="write a deploy folder: libraries, TVM's runtime libraries, the runtime "
                                      "part of qcompile, requirements.txt and launchers (no compiler)",
                       description="The folder's qcompile-run, qcompile-chat and qcompile-serve take the "
                                   "arguments of `qcompile run`, `chat` and `serve`; install its "
                                   "requirements.txt (no apache-tvm) where it is deployed.")
    p.add_argument("libraries", type=Path, nargs="+", metavar="LIBRARY", help="a library directory (compile -o)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the folder to write (replaced if a bundle)")
    add_json(p, help="print bundle.json (what is inside, sizes in bytes)")
    p.set_defaults(func=run)


def run(args) -> None:
    # The summary line (what is inside, its size) is the output; --json prints the record instead.
    record = api.bundle(args.libraries, out=args.out, log=(lambda _line: None) if args.json else print)
    if args.json:
        emit_json(record)

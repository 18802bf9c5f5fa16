"""`qcompile targets list`."""

from __future__ import annotations

from .. import api
from .common import Parser, emit_json, listing, print_table


def add(sub) -> None:
    targets = sub.add_parser("targets", help="list the build targets")
    targets_sub = targets.add_subparsers(dest="targets_command", required=True, parser_class=Parser)
    listing(targets_sub, "list", "every target file, and whether this machine can build and run it",
            list_targets)


def list_targets(args) -> None:
    status = api.target_status()
    if args.json:
        return emit_json({n: {"description": t.description, "target": t.target, "device": t.device,
                              "dtype": t.dtype, "device_code": t.device_code,
                              **{k: {"ok": ok, "why": why} for k, (ok, why) in can.items()}}
                          for n, (t, can) in status.items()})

    def mark(ok_why) -> str:
        return ("yes: " if ok_why[0] else "no: ") + ok_why[1]

    print_table([[n, t.device, t.dtype, mark(can["build"]), mark(can["run"])] for n, (t, can) in status.items()],
                ["TARGET", "DEVICE", "DTYPE", "BUILDS HERE", "RUNS HERE"])

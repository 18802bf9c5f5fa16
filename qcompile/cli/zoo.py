"""`qcompile zoo list | show MODEL`."""

from __future__ import annotations

from .. import api
from .common import MODEL_HELP, Parser, emit_json, listing, print_table


def add(sub) -> None:
    zoo = sub.add_parser("zoo", help="list or show the models of the zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=Parser)
    listing(zoo_sub, "list", "every model in the zoo", list_models)
    listing(zoo_sub, "show", "one model's resolved config, parameter count and tensor-parallel plan",
            show).add_argument("model", help=MODEL_HELP)


def list_models(args) -> None:
    models = api.list_models()
    if args.json:
        return emit_json([{"name": n, "family": s.family.name, "description": s.description}
                          for n, s in models.items()])
    print_table([[n, s.family.name, s.description] for n, s in models.items()],
                ["MODEL", "FAMILY", "DESCRIPTION"])


def show(args) -> None:
    summary = api.show_model(args.model)
    if args.json:
        return emit_json(summary)
    print(f"{summary['name']}  ({summary['family']}; from {summary['source']})")
    if summary["description"]:
        print(f"  {summary['description']}")
    print(f"  parameters: {summary['parameters']:,}")
    for key, value in summary["config"].items():
        print(f"  {key}: {value}")

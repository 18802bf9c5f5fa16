"""`qcompile registry list | show | verify | rm | gc`: the store of built libraries."""

from __future__ import annotations

import json

from .. import api
from ..errors import UserError
from .common import Parser, emit_json, listing, print_table


def add(sub) -> None:
    registry = sub.add_parser("registry", help="the store of built libraries (compile --register)")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True, parser_class=Parser)
    listing(registry_sub, "list", "entries, most recently used first, with sizes and ages", list_entries)
    listing(registry_sub, "show", "one entry and its build identity", show) \
        .add_argument("key", help="entry key or a unique prefix (>= 6 hex digits)")
    listing(registry_sub, "verify", "re-hash every file of every entry (or of KEY); exit 2 if damaged",
            verify).add_argument("key", nargs="?", help="entry key or prefix")
    listing(registry_sub, "rm", "remove an entry (refused while it is in use)", remove) \
        .add_argument("key", help="entry key or a unique prefix")
    listing(registry_sub, "gc", "evict least-recently-used entries above a size bound (never one in "
            "use) and clear crashed builds", gc) \
        .add_argument("--max-size", required=True, help="size bound, e.g. 500M or 20G")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def list_entries(args) -> None:
    entries = [e.summary() for e in api.registry().list()]
    if args.json:
        return emit_json(entries)
    print_table([[e["key"][:12], e["model"], e["target"], e["dtype"], str(e["max_seq_len"]),
                  f"{e['size_bytes'] / 2**20:.1f} MiB", _age(e["age_seconds"]), _age(e["idle_seconds"])]
                 for e in entries],
                ["KEY", "MODEL", "TARGET", "DTYPE", "MAX_SEQ", "SIZE", "AGE", "LAST_USED"])


def show(args) -> None:
    store = api.registry()
    entry = store.entry(store.resolve_key(args.key))
    if args.json:
        return emit_json({**entry.summary(), "identity": entry.manifest["identity"]})
    for key, value in {**entry.summary(), "identity": json.dumps(entry.manifest["identity"])}.items():
        print(f"{key}: {value}")


def verify(args) -> None:
    store = api.registry()
    keys = [store.resolve_key(args.key)] if args.key else [e.name for e in sorted(store.entries.iterdir())]
    report = {key: store.verify(key) for key in keys}
    if args.json:
        emit_json([{"key": k, "ok": not p, "problems": p} for k, p in report.items()])
    else:
        for key, problems in report.items():
            print(f"{key[:12]}  {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}")
    damaged = [k for k, p in report.items() if p]
    if damaged:
        raise UserError(f"registry verify: {len(damaged)} of {len(report)} entries damaged "
                        f"(first: {damaged[0][:12]})")


def remove(args) -> None:
    store = api.registry()
    key = store.resolve_key(args.key)
    store.remove(key)
    if args.json:
        return emit_json({"removed": key})
    print(f"removed {key[:12]}")


def gc(args) -> None:
    result = api.registry().gc(api.parse_size(args.max_size))
    if args.json:
        return emit_json(result)
    print(f"removed {len(result['removed'])} entries; {len(result['kept_in_use'])} over the bound kept "
          f"because in use; now {result['total_bytes'] / 2**20:.1f} MiB (bound "
          f"{result['max_bytes'] / 2**20:.1f} MiB)")

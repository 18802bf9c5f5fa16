"""The `qcompile` command line: parses, calls `qcompile.api`, prints (tables, or JSON with --json).

A user error exits with status 2 and one line on stderr; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other user error."""

    def error(self, message: str):  # noqa: D102
        raise UserError(f"{self.prog}: {message} (see --help)")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite_positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def parse_token_ids(text: str) -> list[int]:
    """'3 14 15' or '3,14,15' -> [3, 14, 15]; a non-numeric entry is a UserError naming it."""
    ids = []
    for item in text.replace(",", " ").split():
        try:
            ids.append(int(item))
        except ValueError:
            raise UserError(f"--prompt-ids: {item!r} is not a token id (integers separated by spaces)") from None
    if not ids:
        raise UserError("--prompt-ids: no token ids given")
    return ids


def cmd_zoo_list(args) -> None:
    from . import api

    models = api.list_models()
    if args.json:
        return _emit_json([{"name": n, "family": s.family.name, "description": s.description}
                           for n, s in models.items()])
    _print_table([[n, s.family.name, s.description] for n, s in models.items()],
                 ["MODEL", "FAMILY", "DESCRIPTION"])


def cmd_zoo_show(args) -> None:
    from . import api

    summary = api.show_model(args.model)
    if args.json:
        return _emit_json(summary)
    print(f"{summary['name']}  ({summary['family']}; from {summary['source']})")
    if summary["description"]:
        print(f"  {summary['description']}")
    print(f"  parameters: {summary['parameters']:,}")
    for key, value in summary["config"].items():
        print(f"  {key}: {value}")


def cmd_targets_list(args) -> None:
    from . import api
    from .targets import availability

    targets = api.list_targets()
    status = {n: availability(t) for n, t in targets.items()}
    if args.json:
        return _emit_json({n: {"description": t.description, "target": t.target, "device": t.device,
                               "dtype": t.dtype, "device_code": t.device_code,
                               **{k: {"ok": ok, "why": why} for k, (ok, why) in status[n].items()}}
                           for n, t in targets.items()})

    def mark(ok_why) -> str:
        return ("yes: " if ok_why[0] else "no: ") + ok_why[1]

    _print_table([[n, t.device, t.dtype, mark(status[n]["build"]), mark(status[n]["run"])]
                  for n, t in targets.items()], ["TARGET", "DEVICE", "DTYPE", "BUILDS HERE", "RUNS HERE"])


def cmd_inspect(args) -> None:
    from .devicecode import device_modules
    from .pipeline import LIBRARY, read_manifest

    manifest = read_manifest(args.library)
    found = device_modules(args.library / LIBRARY)  # what the .so carries, read from its bytes
    target = manifest["target"]
    summary = {"model": manifest["model"]["name"], "target": target["name"], "device": target["device"],
               "arch": target.get("arch"), "dtype": manifest["dtype"],
               "device_code": manifest.get("device_code"), "device_modules_in_library": found,
               "toolchain": manifest["identity"]["toolchain"], "versions": manifest["versions"],
               "tuning_database": manifest.get("tuning_database"), "library": manifest["library"]}
    if args.json:
        return _emit_json(summary)
    print(f"{summary['model']} for {summary['target']} ({summary['device']} {summary['arch']}, {summary['dtype']})")
    print(f"  library   {manifest['library']['file']} sha256 {manifest['library']['sha256'][:16]}…")
    for m in found:
        what = (f"cubin {', '.join(m['cubin'])} + PTX {', '.join(m['ptx'])}" if m["code"] == "fatbin"
                else f"{m['arch']}, code object v{m['code_object_version']}" if m["code"] == "hsaco"
                else m["code"])
        print(f"  device    {m['kind']} module: {m['format']}, {m['bytes']:,} bytes ({what})")
    if not found:
        print("  device    none (host code only)")
    tools = ", ".join(f"{k} {v}" for k, v in summary["toolchain"].items())
    print(f"  built by  TVM {summary['versions']['tvm']} (tvm-ffi {summary['versions']['tvm_ffi']}); {tools}")
    tuning = summary["tuning_database"]
    print("  schedules " + (f"{len(tuning['kernels']['tuned'])} tuned kernels from {tuning['sha256']}"
                            if tuning else "default only"))


def cmd_compile(args) -> None:
    from . import api

    if args.output is None and not args.register:
        raise UserError("compile: give -o DIR, --register, or both")
    log = (lambda _msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    options = dict(target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len, log=log,
                   schedules=args.schedules, use_schedules=not args.no_schedules)
    if args.register:
        entry, built = api.register_model(args.model, copy_to=args.output, **options)
        manifest = entry.manifest
        where = f"{'new' if built else 'existing'} registry entry {entry.key[:12]} ({entry.path})"
    else:
        manifest, where = api.compile_model(args.model, out=args.output, **options), str(args.output)
    if args.json:
        return _emit_json({"output": str(args.output) if args.output else None,
                           "registry_key": entry.key if args.register else None,
                           **{k: manifest[k] for k in ("model", "target", "dtype", "max_seq_len",
                                                       "parameter_count", "library", "build")}})
    built_note = f"built in {manifest['build']['seconds']} s" if not args.register or built else "reused"
    print(f"{manifest['model']['name']} for {args.target} ({manifest['parameter_count']:,} parameters, "
          f"{manifest['dtype']}, {built_note}): {where}"
          + (f", copied to {args.output}" if args.register and args.output else ""))


def cmd_tune(args) -> None:
    from . import api, tuning

    log = (lambda _msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    report = api.tune(args.model, target=args.target, trials=args.trials, schedules=args.schedules,
                      rpc=args.rpc, kernels=args.kernels, log=log, show_progress=not args.json,
                      functions=args.functions.split(",") if args.functions else None)
    seconds = time.perf_counter() - start
    if args.json:
        return _emit_json({**report, "seconds": round(seconds, 1)})
    _print_table(tuning.format_report(report), ["KERNEL (INPUT SHAPES)", "CALLS", "TRIALS", "DEFAULT ms", "TUNED ms", "SPEEDUP"])
    print(f"tuned in {seconds:.0f} s; database, report.json and curve.png in {report['directory']}")


def cmd_check(args) -> None:
    from . import crosscheck

    log = (lambda _msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    rows = crosscheck.run(args.models.split(","), args.targets.split(","), workdir=args.workdir,
                          dtype=args.dtype, log=log)
    if args.json:
        _emit_json(rows)
    else:
        def fmt(metrics):
            return ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()) if metrics else "-"
        _print_table([[r["model"], r["target"], r["dtype"], f"yes, {r['built']['seconds']} s",
                       "yes" if r["ran"]["ok"] else f"no: {r['ran']['why']}",
                       fmt(r.get("vs_transformers")), fmt(r.get("vs_cpu_float32")),
                       ("FAIL: " + "; ".join(r["failed"])) if r.get("failed") else
                       ("pass" if "failed" in r else "-")] for r in rows],
                     ["MODEL", "TARGET", "DTYPE", "BUILT", "RAN", "VS TRANSFORMERS", "VS CPU FLOAT32", "TIER"])
    failed = [r for r in rows if r.get("failed")]
    if failed:
        raise UserError(f"check: {len(failed)} of {len(rows)} pairs outside their tier "
                        f"(first: {failed[0]['model']} on {failed[0]['target']}: {failed[0]['failed'][0]})")


def cmd_bench(args) -> None:
    from . import bench

    log = (lambda _msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    report = bench.bench(args.model, target=args.target, vs_torch=args.vs == "torch",
                         prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                         repeats=args.repeats, workdir=args.workdir, log=log,
                         skip=tuple(args.skip.split(",")) if args.skip else ())
    if args.json:
        return _emit_json(report)
    header, rows = bench.table(report)
    machine = report["machine"]
    print(f"{report['model']} on {report['target']}, batch 1, median of {report['repeats']} runs; "
          f"{report['tuned_kernels']} tuned kernels (database {report['tuning_database'] or 'none'})")
    print(f"measured here: read bandwidth {machine['read_bytes_per_s'] / 1e9:.1f} GB/s, float32 matmul "
          f"peak {machine['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s")
    _print_table(rows, header)
    print(json.dumps(report))


def cmd_init_weights(args) -> None:
    from . import api

    out = api.init_weights(args.model, out=args.output, seed=args.seed, std=args.std,
                           max_shard_bytes=int(args.max_shard_mb * (1 << 20)))
    print(f"wrote random weights for {args.model} (seed {args.seed}, std {args.std}) to {out}")


def _check_output_file(path: Path | None, flag: str) -> None:
    """An output file's place is checked before any work, so a typo does not waste a run."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag}: {path}: is a directory; give a file path")
    if not path.parent.is_dir():
        raise UserError(f"{flag}: directory {path.parent} does not exist")


def cmd_run(args) -> None:
    from . import api

    from .zoo import looks_like_path, resolve_model

    if (args.library / "manifest.json").is_file() or (looks_like_path(args.library) and not args.library.exists()):
        from .pipeline import read_manifest
        from .runtime import spec_from_manifest

        spec = spec_from_manifest(read_manifest(args.library))  # reports a missing library directory
        load = lambda: api.load(args.library, weights=args.weights)  # noqa: E731
    else:  # a MODEL: its registry entry for these build options
        spec = resolve_model(args.library)
        load = lambda: api.load(weights=args.weights, model=args.library, target=args.target,  # noqa: E731
                                dtype=args.dtype, max_seq_len=args.max_seq_len)
    kind = spec.family.kind
    wanted, unwanted = (("--prompt-ids", ("--image", "--features-out")) if kind == "decoder"
                        else ("--image", ("--prompt-ids", "--logits-out", "--eos-id")))
    given = {flag for flag, value in (("--prompt-ids", args.prompt_ids), ("--image", args.image),
                                      ("--features-out", args.features_out),
                                      ("--logits-out", args.logits_out), ("--eos-id", args.eos_id))
             if value is not None}
    if wanted not in given:
        raise UserError(f"run: {wanted} is needed for this {kind}")
    if given & set(unwanted):
        raise UserError(f"run: {sorted(given & set(unwanted))[0]} does not apply to this {kind}")
    (run_decoder if kind == "decoder" else run_encoder)(args, spec, load)


def run_decoder(args, spec, load) -> None:
    from .atomic import save_npy

    prompt = parse_token_ids(args.prompt_ids)
    _check_output_file(args.logits_out, "--logits-out")
    model = load()
    new = model.generate(prompt, args.max_new_tokens, eos_token_id=args.eos_id)
    stats = model.last_stats
    if args.logits_out is not None:
        save_npy(args.logits_out, model.last_prompt_logits)
    result = {"prompt_ids": prompt, "generated_ids": new.tolist(),
              "prefill_seconds": stats.prefill_seconds, "decode_tokens_per_s": stats.decode_tokens_per_s}
    if args.json:
        return _emit_json(result)
    print("generated:", " ".join(map(str, result["generated_ids"])))
    rate = stats.decode_tokens_per_s
    print(f"prefill {len(prompt)} tokens: {stats.prefill_seconds * 1e3:.1f} ms; decode: "
          + (f"{rate:.1f} tokens/s" if rate else "n/a (fewer than 2 new tokens)"))


def run_encoder(args, spec, load) -> None:
    from .atomic import save_npy
    from .vision import as_pixel_values

    _check_output_file(args.features_out, "--features-out")
    pixels = as_pixel_values(args.image, spec.config)  # every image is read and checked before the weights
    model = load()
    start = time.perf_counter()
    features = model.encode(pixels)
    seconds = time.perf_counter() - start
    if args.features_out is not None:
        save_npy(args.features_out, features)
    result = {"images": [str(p) for p in args.image], "shape": list(features.shape),
              "encode_seconds": seconds, "images_per_s": len(args.image) / seconds,
              "cls_features_head": features[:, 0, :4].round(5).tolist()}
    if args.json:
        return _emit_json(result)
    print(f"last_hidden_state {result['shape']} for {len(args.image)} image(s) in {seconds * 1e3:.1f} ms "
          f"({result['images_per_s']:.1f} images/s)" + (f"; saved to {args.features_out}"
                                                       if args.features_out else ""))


def _registry():
    from .registry import Registry

    return Registry()


def cmd_registry_list(args) -> None:
    entries = [e.summary() for e in _registry().list()]
    if args.json:
        return _emit_json(entries)
    _print_table([[e["key"][:12], e["model"], e["target"], e["dtype"], str(e["max_seq_len"]),
                   f"{e['size_bytes'] / 2**20:.1f} MiB", _age(e["age_seconds"]), _age(e["idle_seconds"])]
                  for e in entries],
                 ["KEY", "MODEL", "TARGET", "DTYPE", "MAX_SEQ", "SIZE", "AGE", "LAST_USED"])


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def cmd_registry_show(args) -> None:
    store = _registry()
    entry = store.entry(store.resolve_key(args.key))
    if args.json:
        return _emit_json({**entry.summary(), "identity": entry.manifest["identity"]})
    for key, value in {**entry.summary(), "identity": json.dumps(entry.manifest["identity"])}.items():
        print(f"{key}: {value}")


def cmd_registry_verify(args) -> None:
    store = _registry()
    keys = [store.resolve_key(args.key)] if args.key else [e.name for e in sorted(store.entries.iterdir())]
    report = {key: store.verify(key) for key in keys}
    if args.json:
        _emit_json([{"key": k, "ok": not p, "problems": p} for k, p in report.items()])
    else:
        for key, problems in report.items():
            print(f"{key[:12]}  {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}")
    damaged = [k for k, p in report.items() if p]
    if damaged:
        raise UserError(f"registry verify: {len(damaged)} of {len(report)} entries damaged "
                        f"(first: {damaged[0][:12]})")


def cmd_registry_rm(args) -> None:
    store = _registry()
    key = store.resolve_key(args.key)
    store.remove(key)
    if args.json:
        return _emit_json({"removed": key})
    print(f"removed {key[:12]}")


def cmd_registry_gc(args) -> None:
    from .registry import parse_size

    result = _registry().gc(parse_size(args.max_size))
    if args.json:
        return _emit_json(result)
    print(f"removed {len(result['removed'])} entries; {len(result['kept_in_use'])} over the bound kept "
          f"because in use; now {result['total_bytes'] / 2**20:.1f} MiB (bound "
          f"{result['max_bytes'] / 2**20:.1f} MiB)")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.model, workdir=args.workdir, prompt_len=args.prompt_len,
             max_new_tokens=args.max_new_tokens, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description=(
        "Compile Qwen-family models with Apache TVM into verified libraries, and run them. MODEL is a "
        "name from zoo.yaml or a Hugging Face checkpoint directory (config.json [+ safetensors])."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def build_options(p, dtype_help="compute dtype (default: the target's; float32 on cpu)",
                      seq_help="longest sequence (prompt + new tokens) the library accepts; default: "
                               "the model's max_position_embeddings"):
        p.add_argument("--dtype", help=dtype_help)
        p.add_argument("--max-seq-len", type=_non_negative_int, help=seq_help)

    def listing(group, name: str, help: str, func) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    zoo = sub.add_parser("zoo", help="list or show the models of zoo.yaml")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    listing(zoo_sub, "list", "every model in the zoo", cmd_zoo_list)
    listing(zoo_sub, "show", "one model's resolved config and parameter count", cmd_zoo_show) \
        .add_argument("model", help="zoo name or HF checkpoint directory")

    targets = sub.add_parser("targets", help="list the build targets in targets/")
    targets_sub = targets.add_subparsers(dest="targets_command", required=True, parser_class=_Parser)
    listing(targets_sub, "list", "every target file, and whether this machine can build and run it",
            cmd_targets_list)

    p = listing(sub, "inspect", "what a library was built for and the device code it carries", cmd_inspect)
    p.add_argument("library", type=Path, help="library directory")

    p = sub.add_parser("compile", help="build MODEL for a target into a library directory")
    p.add_argument("model", help="zoo name or HF checkpoint directory")
    p.add_argument("--target", default="cpu", help="a target in targets/ (default: cpu)")
    p.add_argument("-o", "--output", type=Path,
                   help="library directory to write (replaced atomically if it is a previous library)")
    p.add_argument("--register", action="store_true",
                   help="store the library in the registry ($QCOMPILE_HOME, default ~/.cache/qcompile); "
                        "an identical build already there is reused")
    build_options(p)
    p.add_argument("--schedules", type=Path, metavar="DIR",
                   help="tuning database directory to apply (default: every one under schedules/TARGET/)")
    p.add_argument("--no-schedules", action="store_true", help="default schedules only (no tuning database)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="auto-tune MODEL's kernels with MetaSchedule (resumable)",
                       description="Tune the static-shape kernels of MODEL (decode step, prefill bucket, "
                       "image batch 1) with MetaSchedule's XGBoost cost model. Each measured candidate is "
                       "appended to the database at once: Ctrl-C or a kill loses no finished record, and "
                       "a rerun tunes only what is missing. Ends with a per-kernel table, report.json and "
                       "curve.png beside the database.")
    p.add_argument("model", help="zoo name or HF checkpoint directory")
    p.add_argument("--target", default="cpu", help="a target in targets/ (default: cpu)")
    p.add_argument("--trials", type=_non_negative_int, default=64,
                   help="measured candidates per kernel, the default schedule included (64)")
    p.add_argument("--schedules", type=Path, metavar="DIR",
                   help="database directory (default: schedules/TARGET/MODEL/, which compile applies)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY",
                   help="measure on a device registered with a TVM RPC tracker under KEY")
    p.add_argument("--functions", metavar="NAMES",
                   help="only kernels of these entry points, comma-separated (e.g. decode,prefill_128)")
    p.add_argument("--kernels", metavar="GLOB", help="tune only kernels whose name matches, e.g. '*NT_matmul*'")
    p.add_argument("--dtype", help="compute dtype (default: the target's)")
    p.add_argument("--json", action="store_true", help="machine-readable report (no progress bar)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("bench", help="speed side by side: tuned, default schedules, transformers",
                       description="One run on this machine: qcompile with the committed schedules, "
                       "qcompile with default schedules, and (--vs torch) transformers eager and "
                       "torch.compile, each in its own process on the same random-weight checkpoint. "
                       "Decoders: prefill latency and decode tokens/s; encoders: encode latency. Each "
                       "beside its physical limit (bytes / measured read bandwidth for decode, FLOPs / "
                       "measured matmul peak for prefill). Prints a table, then the JSON.")
    p.add_argument("model", help="zoo name")
    p.add_argument("--target", default="cpu", help="cpu (the engines run here)")
    p.add_argument("--vs", choices=["torch"], help="also run transformers eager and torch.compile")
    p.add_argument("--prompt-len", type=_non_negative_int, default=128, help="prefill tokens (128)")
    p.add_argument("--decode-tokens", type=_non_negative_int, default=32, help="decode steps per run (32)")
    p.add_argument("--repeats", type=_non_negative_int, default=5, help="runs per figure; median (5)")
    p.add_argument("--skip", metavar="ENGINES",
                   help="engines to leave out, comma-separated (e.g. qcompile-default: minutes per run)")
    p.add_argument("--workdir", type=Path, default=Path("build/bench"),
                   help="random-weight checkpoints are kept here (build/bench)")
    p.add_argument("--json", action="store_true", help="JSON only")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", help="cross-backend regression: build, run where possible, compare",
                       description="For every MODEL x TARGET: build the library (device code checked), "
                       "run it if this machine can, and compare with transformers and with the float32 "
                       "CPU library against the tier in the target file. Exit 2 if any pair fails.")
    p.add_argument("--models", default="qwen2-debug,qwen2-sw-debug,qwen3-moe-debug,vit-debug",
                   help="comma-separated zoo models (default: the debug models)")
    p.add_argument("--targets", default="cpu,cpu-x86-64-v3,cuda-sm80,cuda-sm90,rocm-gfx90a,rocm-gfx942",
                   help="comma-separated targets (default: all)")
    p.add_argument("--dtype", help="override every target's default dtype")
    p.add_argument("--workdir", type=Path, default=Path("build/check"), help="libraries go here (build/check)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("init-weights", help="write a random-weight HF checkpoint for MODEL")
    p.add_argument("model", help="zoo name or HF checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--std", type=_finite_positive, default=0.15,
                   help="weight std (default 0.15; HF's 0.02 makes tiny models repeat one token)")
    p.add_argument("--max-shard-mb", type=_finite_positive, default=2048,
                   help="shard the safetensors above this size, with an index file (default 2048)")
    p.set_defaults(func=cmd_init_weights)

    p = sub.add_parser("run", help="generate greedily (decoders) or encode images (encoders) with a library")
    p.add_argument("library", type=Path, metavar="LIBRARY|MODEL",
                   help="a library directory, or a MODEL whose registry entry (for --target and the "
                        "build options below, as given to compile --register) is loaded")
    p.add_argument("--target", default="cpu", help="with a MODEL: the target it was built for (cpu)")
    build_options(p, dtype_help="with a MODEL: its build dtype", seq_help="with a MODEL: its --max-seq-len")
    p.add_argument("--weights", type=Path, required=True, help="HF checkpoint directory")
    p.add_argument("--prompt-ids", help='decoders: prompt token ids, e.g. "3 14 15"')
    p.add_argument("--image", type=Path, action="append",
                   help="encoders: an image file (repeat for a batch); preprocessed as the model's HF "
                        "image processor does")
    p.add_argument("--features-out", type=Path,
                   help="encoders: save last_hidden_state, float32 [images, tokens, width], as .npy")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=16, help="tokens to generate (16)")
    p.add_argument("--eos-id", type=_non_negative_int, help="stop after generating this token id")
    p.add_argument("--logits-out", type=Path, help="save the prompt's logits, float32 [prompt_len, vocab]")
    p.add_argument("--json", action="store_true",
                   help="decoders: print {prompt_ids, generated_ids, prefill_seconds, decode_tokens_per_s}; "
                        "encoders: {images, shape, encode_seconds, images_per_s, cls_features_head}")
    p.set_defaults(func=cmd_run)

    registry = sub.add_parser("registry", help="the store of built libraries (compile --register)")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True, parser_class=_Parser)
    listing(registry_sub, "list", "entries, most recently used first, with sizes and ages",
            cmd_registry_list)
    listing(registry_sub, "show", "one entry and its build identity", cmd_registry_show) \
        .add_argument("key", help="entry key or a unique prefix (>= 6 hex digits)")
    listing(registry_sub, "verify", "re-hash every file of every entry (or of KEY); exit 2 if damaged",
            cmd_registry_verify).add_argument("key", nargs="?", help="entry key or prefix")
    listing(registry_sub, "rm", "remove an entry (refused while it is in use)", cmd_registry_rm) \
        .add_argument("key", help="entry key or a unique prefix")
    listing(registry_sub, "gc", "evict least-recently-used entries above a size bound (never one in "
            "use) and clear crashed builds", cmd_registry_gc) \
        .add_argument("--max-size", required=True, help="size bound, e.g. 500M or 20G")

    p = sub.add_parser("demo", help="compile, make random weights, generate beside transformers")
    p.add_argument("model", nargs="?", default="qwen2-sw-debug", help="zoo model (qwen2-sw-debug)")
    p.add_argument("--workdir", type=Path, default=Path("build/demo"),
                   help="where the library and checkpoint go (build/demo)")
    p.add_argument("--prompt-len", type=_non_negative_int, default=24, help="random prompt length (24)")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=16, help="tokens to generate (16)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed for weights and prompt (0)")
    p.set_defaults(func=cmd_demo)
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

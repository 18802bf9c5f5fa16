"""`qcompile init-weights MODEL -o DIR`: a random-weight HF checkpoint."""

from __future__ import annotations

from pathlib import Path

from .. import api
from .common import MODEL_HELP, finite_positive, non_negative_int


def add(sub) -> None:
    p = sub.add_parser("init-weights", help="write a random-weight HF checkpoint for MODEL")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--std", type=finite_positive, default=0.15,
                   help="weight std (default 0.15; HF's 0.02 makes tiny models repeat one token)")
    p.add_argument("--max-shard-mb", type=finite_positive, default=2048,
                   help="shard the safetensors above this size, with an index file (default 2048)")
    p.set_defaults(func=run)


def run(args) -> None:
    out = api.init_weights(args.model, out=args.output, seed=args.seed, std=args.std,
                           max_shard_bytes=int(args.max_shard_mb * (1 << 20)))
    print(f"wrote random weights for {args.model} (seed {args.seed}, std {args.std}) to {out}")

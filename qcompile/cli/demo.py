"""`qcompile demo [MODEL]`: compile, random weights, generate beside transformers."""

from __future__ import annotations

from pathlib import Path

from .. import api
from .common import non_negative_int


def add(sub) -> None:
    p = sub.add_parser("demo", help="compile, make random weights, generate beside transformers")
    p.add_argument("model", nargs="?", default="qwen2-sw-debug", help="zoo model (qwen2-sw-debug)")
    p.add_argument("--workdir", type=Path, default=Path("build/demo"),
                   help="where the library and checkpoint go (build/demo)")
    p.add_argument("--prompt-len", type=non_negative_int, default=24, help="random prompt length (24)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=16, help="tokens to generate (16)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for weights and prompt (0)")
    p.set_defaults(func=run)


def run(args) -> None:
    api.demo(args.model, workdir=args.workdir, prompt_len=args.prompt_len,
             max_new_tokens=args.max_new_tokens, seed=args.seed)

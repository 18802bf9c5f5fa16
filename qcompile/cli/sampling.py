"""The sampling flags `run --prompt` and `chat` share (not a subcommand). Each flag is a field of
`run.generation.SamplingParams`; ranges are checked there, so the rules live in one place."""

from __future__ import annotations

import argparse
from typing import Any

# flag -> (SamplingParams field, type, help)
FLAGS: dict[str, tuple[str, type, str]] = {
    "--temperature": ("temperature", float, "0 (default): greedy, the most probable token; > 0: sample"),
    "--top-k": ("top_k", int, "sample among the k most probable tokens (0: off)"),
    "--top-p": ("top_p", float, "sample among the most probable tokens making up this mass (1: off)"),
    "--min-p": ("min_p", float, "drop tokens less probable than this fraction of the top one (0: off)"),
    "--repetition-penalty": ("repetition_penalty", float,
                             "HF's: divide positive / multiply negative logits of tokens seen (1: off)"),
    "--presence-penalty": ("presence_penalty", float, "OpenAI's: subtract from tokens generated (-2..2)"),
    "--frequency-penalty": ("frequency_penalty", float,
                            "OpenAI's: subtract this times each token's count so far (-2..2)"),
    "--seed": ("seed", int, "random seed: the same seed gives the same tokens"),
}


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("sampling (transformers' semantics; default greedy)")
    for flag, (_field, kind, help_text) in FLAGS.items():
        group.add_argument(flag, type=kind, help=help_text)
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help="stop before this text (repeatable); it is not printed")


def sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields the user set (the others keep SamplingParams' defaults)."""
    fields = {field: getattr(args, field) for field, _kind, _help in FLAGS.values()
              if getattr(args, field) is not None}
    if args.stop is not None:
        fields["stop"] = list(args.stop)
    return fields


def given_sampling_flags(args: argparse.Namespace) -> list[str]:
    """The sampling flags on the command line (for refusing them where they do not apply)."""
    given = [flag for flag, (field, _kind, _help) in FLAGS.items() if getattr(args, field) is not None]
    return given + (["--stop"] if args.stop is not None else [])

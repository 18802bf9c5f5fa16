"""`qcompile run LIBRARY|MODEL --weights CKPT`: text generation with the checkpoint's tokenizer (--prompt),
greedy generation from token ids (--prompt-ids), or image features (encoders)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import api
from ..atomic import save_npy
from ..errors import UserError
from .common import add_runnable, add_threads, emit_json, load_runnable, non_negative_int
from .sampling import add_sampling_options, given_sampling_flags, sampling_fields

# Every kind's inputs and outputs, as flags; which ones a kind takes is `Kind.run_flags`.
FLAGS = {"--prompt-ids": "prompt_ids", "--prompt": "prompt", "--logits-out": "logits_out", "--eos-id": "eos_id",
         "--image": "image", "--features-out": "features_out"}


def add(sub) -> None:
    p = sub.add_parser("run", help="generate text or tokens (decoders) or encode images (encoders) with a library")
    add_runnable(p)
    p.add_argument("--prompt", help="decoders: prompt text, tokenized with the checkpoint's tokenizer; the "
                                    "generated text is printed as it streams")
    p.add_argument("--chat", action="store_true",
                   help="with --prompt: send it as a user message through the checkpoint's chat template")
    p.add_argument("--system", help="with --chat: a system message before it")
    p.add_argument("--prompt-ids", help='decoders: prompt token ids, e.g. "3 14 15" (greedy; prints ids)')
    p.add_argument("--image", type=Path, action="append",
                   help="encoders: an image file (repeat for a batch); preprocessed as the model's HF "
                        "image processor does")
    p.add_argument("--features-out", type=Path,
                   help="encoders: save last_hidden_state, float32 [images, tokens, width], as .npy")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=16, help="tokens to generate (16)")
    p.add_argument("--eos-id", type=non_negative_int,
                   help="with --prompt-ids: stop after generating this token id (--prompt stops at the "
                        "tokenizer's end tokens)")
    p.add_argument("--logits-out", type=Path,
                   help="with --prompt-ids: save the prompt's logits, float32 [prompt_len, vocab]")
    add_sampling_options(p)
    add_threads(p)
    p.add_argument("--json", action="store_true",
                   help="decoders: print {prompt_ids, generated_ids, prefill_seconds, decode_tokens_per_s} "
                        "(with --prompt also text and finish_reason); "
                        "encoders: {images, shape, encode_seconds, images_per_s, cls_features_head}")
    p.set_defaults(func=run)


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


def _check_output_file(path: Path | None, flag: str) -> None:
    """An output file's place is checked before any work, so a typo does not waste a run."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{flag}: {path}: is a directory; give a file path")
    if not path.parent.is_dir():
        raise UserError(f"{flag}: directory {path.parent} does not exist")


def run(args) -> None:
    api.set_threads(args.threads)
    spec, library = api.describe_runnable(args.library)
    kind = spec.kind
    given = {flag for flag, attr in FLAGS.items() if getattr(args, attr) is not None}
    inputs = [flag for flag in kind.run_inputs if flag in given]
    if not inputs:
        raise UserError(f"run: {' or '.join(kind.run_inputs)} is needed for this {kind.name}")
    if len(inputs) > 1:
        raise UserError(f"run: give {' or '.join(kind.run_inputs)}, not both")
    unwanted = sorted(given - set(kind.run_flags))
    if unwanted:
        raise UserError(f"run: {unwanted[0]} does not apply to this {kind.name}")

    text_only = [flag for flag, given in (("--chat", args.chat), ("--system", args.system is not None))
                 if given] + given_sampling_flags(args)
    if args.prompt is None and text_only:
        raise UserError(f"run: {text_only[0]} needs --prompt (--prompt-ids generates greedily)")
    RUNNERS[kind.name](args, spec, lambda: load_runnable(args, spec, library))


def run_decoder(args, spec, load) -> None:
    if args.prompt is not None:
        return run_text(args, load)
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
        return emit_json(result)
    print("generated:", " ".join(map(str, result["generated_ids"])))
    rate = stats.decode_tokens_per_s
    print(f"prefill {len(prompt)} tokens: {stats.prefill_seconds * 1e3:.1f} ms; decode: "
          + (f"{rate:.1f} tokens/s" if rate else "n/a (fewer than 2 new tokens)"))


def run_text(args, load) -> None:
    """--prompt: text in, text out (streamed to stdout; timings on stderr), or one JSON object."""
    for flag, value in (("--eos-id", args.eos_id), ("--logits-out", args.logits_out)):
        if value is not None:
            raise UserError(f"run: {flag} applies to --prompt-ids (--prompt stops at the tokenizer's end tokens)")
    if args.system is not None and not args.chat:
        raise UserError("run: --system needs --chat")
    params = api.sampling_params(**sampling_fields(args), max_tokens=args.max_new_tokens)
    api.require_tokenizer(args.weights)  # before the weights are read
    model = load()
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    prompt = api.prompt_ids(model, messages=[*messages, {"role": "user", "content": args.prompt}]) \
        if args.chat else api.prompt_ids(model, text=args.prompt)
    pieces, generated, finish = [], [], None
    for chunk in api.generate_chunks(model, prompt, params):
        pieces.append(chunk.text)
        generated += chunk.token_ids
        finish = chunk.finish_reason
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    stats = model.last_stats
    if args.json:
        return emit_json({"prompt_ids": prompt, "generated_ids": generated, "text": "".join(pieces),
                          "finish_reason": finish, "prefill_seconds": stats.prefill_seconds,
                          "decode_tokens_per_s": stats.decode_tokens_per_s})
    print()
    rate = stats.decode_tokens_per_s
    print(f"[{len(prompt)} prompt tokens, prefill {stats.prefill_seconds * 1e3:.1f} ms; {len(generated)} new "
          f"tokens" + (f", {rate:.1f} tokens/s" if rate else "") + f"; finish: {finish}]", file=sys.stderr)


def run_encoder(args, spec, load) -> None:
    _check_output_file(args.features_out, "--features-out")
    pixels = api.pixel_values(args.image, spec)  # every image is read and checked before the weights
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
        return emit_json(result)
    print(f"last_hidden_state {result['shape']} for {len(args.image)} image(s) in {seconds * 1e3:.1f} ms "
          f"({result['images_per_s']:.1f} images/s)" + (f"; saved to {args.features_out}"
                                                       if args.features_out else ""))


# What `run` does and prints per kind (the output of a decoder and an encoder differ in kind, not detail).
RUNNERS = {"decoder": run_decoder, "encoder": run_encoder}

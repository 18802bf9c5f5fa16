"""`qcompile chat LIBRARY|MODEL --weights CKPT`: talk to a decoder in the terminal.

One line is one user message; the reply streams as it is generated, then its token count and speed
(on stderr, so stdout is the conversation alone). The history is kept and sent through the checkpoint's
chat template every turn; `/reset` clears it; Ctrl-D (end of input) exits; Ctrl-C stops a reply.
"""

from __future__ import annotations

import dataclasses
import sys

from .. import api
from ..errors import UserError
from .common import add_runnable, add_threads, load_runnable, non_negative_int
from .sampling import add_sampling_options, sampling_fields

RESET = "/reset"


def add(sub) -> None:
    p = sub.add_parser("chat", help="chat with a decoder in the terminal (history kept, /reset, Ctrl-D exits)")
    add_runnable(p)
    p.add_argument("--system", help="a system message that starts every conversation")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=256,
                   help="longest reply in tokens (256; less when the context is nearly full)")
    add_sampling_options(p)
    add_threads(p)
    p.set_defaults(func=run)


def run(args) -> None:
    api.set_threads(args.threads)
    params = api.sampling_params(**sampling_fields(args), max_tokens=args.max_new_tokens)
    spec, library = api.describe_runnable(args.library)
    if spec.kind.name != "decoder":
        raise UserError(f"chat: {spec.name} is an {spec.kind.name}; chat needs a decoder")
    api.require_tokenizer(args.weights)  # before the weights are read
    model = load_runnable(args, spec, library)
    if sys.stdin.isatty():
        import readline  # noqa: F401, PLC0415 (line editing and history for input())
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(start)
    note(f"chatting with {spec.name} (context {model.max_seq_len} tokens); {RESET} clears the history, "
         f"Ctrl-D exits")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if text == RESET:
            history = list(start)
            note("(history cleared)")
        elif text:
            history += reply(model, params, [*history, {"role": "user", "content": text}])


def reply(model, params, messages: list[dict]) -> list[dict]:
    """Stream the assistant's answer to `messages`; the turn to add to the history (none if it did not
    fit the context or was interrupted)."""
    prompt = api.prompt_ids(model, messages=messages)
    room = model.max_seq_len - len(prompt)
    if room < 1:
        note(f"(the conversation, {len(prompt)} tokens, fills the context of {model.max_seq_len}; "
             f"{RESET} to start over)")
        return []
    pieces = []
    try:
        for chunk in api.generate_chunks(model, prompt, dataclasses.replace(params, max_tokens=min(params.max_tokens,
                                                                                                   room))):
            pieces.append(chunk.text)
            print(chunk.text, end="", flush=True)
    except KeyboardInterrupt:
        print()
        note("(reply interrupted; not kept)")
        return []
    print()
    stats = model.last_stats
    rate = stats.decode_tokens_per_s
    note(f"[{stats.new_tokens} tokens" + (f", {rate:.1f} tokens/s]" if rate else "]"))
    return [messages[-1], {"role": "assistant", "content": "".join(pieces)}]


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

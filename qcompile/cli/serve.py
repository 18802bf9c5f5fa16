"""`qcompile serve LIBRARY --weights CKPT`: an OpenAI-compatible HTTP server (see `qcompile.serve`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import api
from .common import non_negative_int


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def batch_size(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve a decoder library over an OpenAI-compatible HTTP API",
                       description="Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true "
                                   "for server-sent events), /health (queue, counts and the batch). Requests "
                                   "run in a continuous batch: each joins at the next step and leaves when it "
                                   "is done; the rest wait in a queue, and a full queue answers 429 with "
                                   "Retry-After.")
    p.add_argument("library", type=Path, metavar="LIBRARY", help="a decoder library directory")
    p.add_argument("--weights", type=Path, required=True,
                   help="HF checkpoint directory, with its tokenizer files (tokenizer.json or vocab.json + "
                        "merges.txt, tokenizer_config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (8000; 0: any free port)")
    p.add_argument("--queue-size", type=non_negative_int, default=16,
                   help="requests that may wait while the batch is full (16); more are refused with 429")
    p.add_argument("--max-batch", type=batch_size, default=8,
                   help="most requests decoded together (8): more streams share each step's read of the "
                        "weights (more tokens/s in all), each step takes longer. Libraries built with "
                        "--tensor-parallel or --pipeline-stages serve one at a time")
    p.add_argument("--kv-budget", metavar="SIZE",
                   help="memory for the batch's KV cache, e.g. 2GB (1e9 bytes) or 512MiB (2^20); a request "
                        "joins only when its prompt + max_tokens fit what is free, and one that could never "
                        "fit is refused (400). Default: room for --max-batch sequences of the library's "
                        "max_seq_len, at most 2GiB (but always room for one)")
    p.add_argument("--model-name", help="the model id clients use (default: the library's model name)")
    p.set_defaults(func=run)


def run(args) -> None:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        api.serve(args.library, weights=args.weights, host=args.host, port=args.port,
                  queue_size=args.queue_size, max_batch=args.max_batch, kv_budget=args.kv_budget,
                  model_name=args.model_name, log=log)
    except KeyboardInterrupt:  # Ctrl-C is how a server is meant to stop; uvicorn has shut down cleanly
        pass
    log("qcompile serve: stopped")

"""`qcompile serve` under load: latency, time to first token and tokens/s seen by N concurrent clients.

Starts `qcompile serve LIBRARY --weights CKPT` in its own process (so the clients do not share its GIL)
on 127.0.0.1 and a free port, sends one warm-up request, then runs N concurrent `openai` clients, each
sending R streaming requests one after another (streaming, with usage, so the first token's arrival is
seen). A request refused with 429 is counted as refused and not retried. Reports, over the answered
requests: latency and time to first token (p50 / p99), the server's total output tokens/s over the
run's wall time, and per-request decode tokens/s (after the first token).

    .venv/bin/python bench/serve_load.py LIBRARY --weights CKPT [--clients 8] [--requests 4]
        [--max-tokens 32] [--prompt TEXT | --chat] [--queue-size N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def start_server(library: Path, weights: Path, queue_size: int) -> tuple[subprocess.Popen, str]:
    """`qcompile serve` on a free port; returns the process and its base URL once /health answers."""
    process = subprocess.Popen([sys.executable, "-m", "qcompile", "serve", str(library), "--weights", str(weights),
                                "--port", "0", "--queue-size", str(queue_size)],
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # the first line names the address (or says what went wrong)
        lines.append(line)
        if match := re.search(r"on (http://\S+)/v1", line):
            url = match.group(1)
            break
    else:
        raise SystemExit(f"the server did not start:\n{''.join(lines)}")
    deadline = time.monotonic() + 60
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("the server did not become healthy in 60 s")
        time.sleep(0.1)
    return process, url


async def one_request(client: openai.AsyncOpenAI, model: str, args: argparse.Namespace) -> dict | None:
    """One streaming request's timings; None if refused with 429."""
    start = time.perf_counter()
    first = None
    usage = None
    try:
        if args.chat:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
                temperature=args.temperature, stream=True, stream_options={"include_usage": True})
        else:
            stream = await client.completions.create(
                model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            choice = chunk.choices[0] if chunk.choices else None
            text = None if choice is None else choice.delta.content if args.chat else choice.text
            if text and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.RateLimitError:
        return None
    end = time.perf_counter()
    tokens = usage.completion_tokens
    first = first or end
    return {"latency": end - start, "ttft": first - start, "tokens": tokens,
            "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


async def drive(url: str, model: str, args: argparse.Namespace) -> tuple[list[dict], int, float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=args.clients + 4)))
    await one_request(client, model, args)  # warm-up: first-call costs stay out of the figures

    async def one_client() -> list[dict | None]:
        return [await one_request(client, model, args) for _ in range(args.requests)]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client() for _ in range(args.clients)))
    wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    answered = [r for r in results if r is not None]
    return answered, len(results) - len(answered), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt", default="Write a short story about a compiler that learned to dream.")
    parser.add_argument("--chat", action="store_true", help="/v1/chat/completions (default /v1/completions)")
    parser.add_argument("--queue-size", type=int, help="the server's --queue-size (default: clients, no 429s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    queue_size = args.clients if args.queue_size is None else args.queue_size
    process, url = start_server(args.library, args.weights, queue_size)
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        answered, refused, wall = asyncio.run(drive(url, model, args))
    finally:
        process.terminate()
        process.wait(30)
    if not answered:
        raise SystemExit(f"every request was refused ({refused} x 429)")
    latency = [r["latency"] for r in answered]
    ttft = [r["ttft"] for r in answered]
    decode_rates = [r["decode_tokens_per_s"] for r in answered if r["decode_tokens_per_s"]]
    tokens = sum(r["tokens"] for r in answered)
    report = {
        "model": model, "endpoint": "chat/completions" if args.chat else "completions", "clients": args.clients,
        "requests": args.clients * args.requests, "answered": len(answered), "refused_429": refused,
        "max_tokens": args.max_tokens, "completion_tokens": tokens, "wall_seconds": round(wall, 3),
        "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "output_tokens_per_s": tokens / wall,
        "decode_tokens_per_s_per_request_p50": statistics.median(decode_rates) if decode_rates else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{model} via /v1/{report['endpoint']}: {args.clients} clients x {args.requests} requests, "
          f"max_tokens {args.max_tokens}: {len(answered)} answered, {refused} refused (429)")
    for label, key in (("latency", "latency_s"), ("first token", "ttft_s")):
        print(f"{label:14} p50 {report[key]['p50'] * 1e3:8.1f} ms   p99 {report[key]['p99'] * 1e3:8.1f} ms")
    rate = report["decode_tokens_per_s_per_request_p50"]
    print(f"throughput     {report['output_tokens_per_s']:.1f} output tokens/s over {wall:.2f} s "
          f"({tokens} tokens); per request decode p50 " + (f"{rate:.1f} tokens/s" if rate else "n/a"))


if __name__ == "__main__":
    main()

"""A load run against `qcompile serve`: N concurrent `openai` clients x M requests each, mixed streaming
and non-streaming; what came back, latency, time to first token, aggregate tokens/s, and /health after.

Starts `qcompile serve LIBRARY --weights CKPT` in its own process (so the clients do not share its GIL)
on 127.0.0.1 and a free port, sends one warm-up request, then runs the clients; every request loop is
bounded (a retry limit, a deadline for the whole run). Each client sends its requests one after another,
alternating streaming and non-streaming (client i starts with streaming when i is even). Outcomes:
- ok: a complete answer (a finish_reason; for a stream, its last event);
- 429: refused as busy; retried after the Retry-After the server sent (each refusal counted), at most
  --retries times (then the request counts as lost);
- other 4xx / 5xx: an error answer (a 5xx is a server failure);
- lost: no complete answer (connection dropped, timed out, a stream that ended without a finish_reason).
Latency is from the first try to the end of the answer (retries included); time to first token is from
the try that was answered to the first text of a stream (streaming requests only).

    .venv/bin/python bench/serve_load.py LIBRARY --weights CKPT [--clients 32] [--requests 4]
        [--max-tokens 32] [--max-batch 8] [--kv-budget SIZE] [--queue-size N] [--chat] [--out FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from qcompile.atomic import atomic_file


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`qcompile serve` on a free port; returns the process and its base URL once /health answers."""
    command = [sys.executable, "-m", "qcompile", "serve", str(args.library), "--weights", str(args.weights),
               "--port", "0", "--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch)]
    if args.kv_budget:
        command += ["--kv-budget", args.kv_budget]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
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
            process.terminate()
            raise SystemExit("the server did not become healthy in 60 s")
        time.sleep(0.1)
    return process, url


@dataclasses.dataclass
class Outcome:
    kind: str  # "ok" | "4xx" | "5xx" | "lost"
    stream: bool
    refused: int = 0  # 429s before the answer
    latency: float | None = None
    ttft: float | None = None
    tokens: int = 0
    detail: str = ""


async def one_request(client: openai.AsyncOpenAI, model: str, stream: bool, args: argparse.Namespace) -> Outcome:
    """One request to its end: retried after each 429's Retry-After, at most args.retries times."""
    first_try = time.perf_counter()
    outcome = Outcome("lost", stream)
    for _ in range(args.retries + 1):
        start = time.perf_counter()
        try:
            tokens, first, finished = await (_streamed if stream else _whole)(client, model, args)
        except openai.RateLimitError as e:
            outcome.refused += 1
            await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
            continue
        except openai.APIStatusError as e:
            outcome.kind = "5xx" if e.status_code >= 500 else "4xx"
            outcome.detail = f"{e.status_code}: {e.message}"
            return outcome
        except (openai.APIConnectionError, openai.APITimeoutError, httpx.HTTPError) as e:
            outcome.detail = f"{type(e).__name__}: {e}"
            return outcome
        end = time.perf_counter()
        if not finished:
            outcome.detail = "the answer ended without a finish_reason"
            return outcome
        outcome.kind, outcome.tokens, outcome.latency = "ok", tokens, end - first_try
        outcome.ttft = (first - start) if stream and first is not None else None
        return outcome
    outcome.detail = f"refused {outcome.refused} times (429)"
    return outcome


def _text(choice, chat: bool) -> str | None:
    if chat:
        return choice.delta.content if hasattr(choice, "delta") else choice.message.content
    return choice.text


async def _streamed(client, model, args) -> tuple[int, float | None, bool]:
    """(completion tokens, when the first text arrived, whether a finish_reason came)."""
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
              "stream_options": {"include_usage": True}}
    if args.chat:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": args.prompt}], **common)
    else:
        stream = await client.completions.create(prompt=args.prompt, **common)
    first, finished, tokens = None, False, 0
    async for chunk in stream:
        for choice in chunk.choices:
            if _text(choice, args.chat) and first is None:
                first = time.perf_counter()
            finished = finished or choice.finish_reason is not None
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first, finished


async def _whole(client, model, args) -> tuple[int, float | None, bool]:
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        result = await client.chat.completions.create(messages=[{"role": "user", "content": args.prompt}], **common)
    else:
        result = await client.completions.create(prompt=args.prompt, **common)
    return result.usage.completion_tokens, None, result.choices[0].finish_reason is not None


async def drive(url: str, model: str, args: argparse.Namespace) -> tuple[list[Outcome], float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=args.clients + 4)))
    warm = await one_request(client, model, True, args)  # first-call costs stay out of the figures
    if warm.kind != "ok":
        raise SystemExit(f"the warm-up request failed: {warm.kind} {warm.detail}")

    async def one_client(index: int) -> list[Outcome]:
        return [await one_request(client, model, (index + r) % 2 == 0, args) for r in range(args.requests)]

    start = time.perf_counter()
    try:
        per_client = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(args.clients))),
                                            timeout=args.timeout)
    except TimeoutError:
        raise SystemExit(f"the run did not finish in {args.timeout} s (--timeout)") from None
    return [o for outcomes in per_client for o in outcomes], time.perf_counter() - start


def report_lines(args: argparse.Namespace, model: str, outcomes: list[Outcome], wall: float,
                 health: dict) -> list[str]:
    ok = [o for o in outcomes if o.kind == "ok"]
    count = {kind: sum(o.kind == kind for o in outcomes) for kind in ("ok", "4xx", "5xx", "lost")}
    refused = sum(o.refused for o in outcomes)
    tokens = sum(o.tokens for o in ok)
    latency = [o.latency for o in ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1e3:.0f}" if values else "n/a"

    rows = [("requests", f"{len(outcomes)} ({args.clients} clients x {args.requests}; half streaming)"),
            ("ok", str(count["ok"])), ("lost", str(count["lost"])),
            ("429 (retried)", str(refused)), ("other 4xx", str(count["4xx"])), ("5xx", str(count["5xx"])),
            ("latency p50 / p99 ms", f"{ms(latency, 50)} / {ms(latency, 99)}"),
            ("first token p50 / p99 ms", f"{ms(ttft, 50)} / {ms(ttft, 99)}  (streaming requests)"),
            ("completion tokens", str(tokens)),
            ("aggregate tokens/s", f"{tokens / wall:.1f}  (over {wall:.2f} s)"),
            ("health after", json.dumps(health, separators=(",", ":")))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{model} via /v1/{'chat/completions' if args.chat else 'completions'}, max_tokens {args.max_tokens}, "
             f"server --max-batch {args.max_batch} --queue-size {args.queue_size}"
             + (f" --kv-budget {args.kv_budget}" if args.kv_budget else "")]
    lines += [f"{key.ljust(width)}  {value}" for key, value in rows]
    failures = sorted({f"{o.kind}: {o.detail}" for o in outcomes if o.kind != "ok"})
    lines += [f"  {f}" for f in failures[:10]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt", default="Write a short story about a compiler that learned to dream.")
    parser.add_argument("--chat", action="store_true", help="/v1/chat/completions (default /v1/completions)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (8)")
    parser.add_argument("--kv-budget", help="the server's --kv-budget (default: its own)")
    parser.add_argument("--queue-size", type=int, default=16, help="the server's --queue-size (16)")
    parser.add_argument("--retries", type=int, default=50, help="429 retries per request at most (50)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run at most")
    parser.add_argument("--out", type=Path, help="also write the report to this text file (atomically)")
    parser.add_argument("--json", action="store_true", help="the outcomes as JSON instead of the table")
    args = parser.parse_args()

    process, url = start_server(args)
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        outcomes, wall = asyncio.run(drive(url, model, args))
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        process.terminate()
        process.wait(30)
    if args.json:
        print(json.dumps({"wall_seconds": wall, "health": health,
                          "outcomes": [dataclasses.asdict(o) for o in outcomes]}, indent=2))
        return
    text = "\n".join(report_lines(args, model, outcomes, wall, health)) + "\n"
    print(text, end="")
    if args.out:
        command = " ".join(["bench/serve_load.py", *sys.argv[1:]])
        atomic_file(args.out, lambda f: f.write(f"# {command}\n{text}".encode()))


if __name__ == "__main__":
    main()

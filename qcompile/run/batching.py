"""Continuous batching: many requests' `Generation`s over one engine that runs several sequences per step.

Each `Scheduler.step()`:
1. ends the requests that were cancelled (their places are free at once);
2. admits waiting requests, oldest first, while the engine can take them (`engine.can_add(prompt +
   max_tokens)`: a batch place and KV cache for every token the request may reach); the first that does
   not fit waits, and so does everyone behind it (FIFO: a long request is not overtaken forever);
3. plans one engine step of at most `engine.step_tokens` tokens: every decoding request feeds its next
   token (1 each), then requests still reading their prompt get chunks of it from what is left, oldest
   first (chunked prefill: a long prompt shares the steps with the others instead of stalling them);
4. runs it, and feeds the logits to each request whose prompt is all in (or that decoded): it samples
   its token, its chunk is delivered, and a request that ended leaves the engine.

A request's tokens depend only on its own logits, sampler and seed (each `Generation` holds its own), so
they are what it would get alone whenever the engine's logits are (the engine's exactness contract).

Engines: `run.batch.BatchEngine` (a library's `batch_step` entry point, several sequences over a paged
KV cache) and `SequentialEngine` here (the same methods over a plain Decoder's prefill/decode, one
sequence at a time) for libraries without it, e.g. split or pipelined ones. `engine_for` picks.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..errors import UserError
from .generation import Chunk, Generation


class Engine(Protocol):
    """What the scheduler drives (run.batch.BatchEngine's methods; see its docstrings)."""

    max_batch: int  # most sequences at once
    step_tokens: int  # most tokens one step takes in all
    vocab_size: int
    max_seq_len: int
    spec: Any

    def can_ever_hold(self, tokens: int) -> bool: ...
    def can_add(self, tokens: int) -> bool: ...
    def add(self, tokens: int) -> int: ...
    def step(self, work: dict[int, list[int]]) -> dict[int, np.ndarray]: ...
    def remove(self, seq: int) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


# Where a request's output goes: each chunk as it is made; the last is the chunk with a finish_reason,
# or the exception that ended the request (an engine or sampling failure).
Deliver = Callable[[Chunk | Exception], None]


@dataclasses.dataclass
class _Request:
    generation: Generation
    deliver: Deliver
    seq: int = -1  # the engine's sequence id, once admitted
    fed: int = 0  # prompt tokens given to the engine so far

    def next_tokens(self, budget: int) -> list[int]:
        """What this request feeds in a step that has `budget` tokens left for it."""
        if self.generation.next_token is not None:
            return [self.generation.next_token] if budget >= 1 else []
        return self.generation.prompt[self.fed:self.fed + budget]


class Scheduler:
    """Continuous batching of `Generation`s over `engine`. `submit` may be called from any thread;
    `step` from one thread only (the one that owns the engine)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()  # guards the two lists; never held while delivering or stepping
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []  # in order of admission: the oldest first

    def submit(self, generation: Generation, deliver: Deliver) -> None:
        """Queue a request (it joins the batch at a step when the engine can hold it); a UserError now if
        it could never fit, even alone."""
        if not self.engine.can_ever_hold(generation.tokens):
            raise UserError(f"prompt ({len(generation.prompt)} tokens) + max_tokens ({generation.params.max_tokens}) "
                            f"needs more KV cache than this server has (--kv-budget); ask for fewer tokens")
        with self._lock:
            self._waiting.append(_Request(generation, deliver))

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        with self._lock:
            return len(self._waiting), len(self._running)

    def idle(self) -> bool:
        return self.counts() == (0, 0)

    def step(self) -> bool:
        """End the cancelled, admit, run one engine step and deliver its tokens. False when it did
        nothing at all (no request left, or the first waiting one cannot be admitted yet)."""
        progressed = self._end_cancelled() | self._admit()  # both, in this order: a freed place is used now
        with self._lock:
            running = list(self._running)
        work: dict[int, list[int]] = {}
        budget = self.engine.step_tokens
        # Decodes first (1 token each), then prompt chunks from what is left; oldest first within each.
        for request in sorted(running, key=lambda r: r.generation.next_token is None):
            if tokens := request.next_tokens(budget):
                work[request.seq] = tokens
                budget -= len(tokens)
        if not work:
            return progressed
        stepping = [r for r in running if r.seq in work]
        start = time.perf_counter()
        try:
            logits = self.engine.step(work)
        except Exception as error:  # noqa: BLE001 (every request of the step fails with the engine's error)
            for request in stepping:
                self._end(request, error)
            return True
        seconds = time.perf_counter() - start
        for request in stepping:
            request.generation.spent(seconds)
            if request.generation.next_token is None:  # still reading the prompt
                request.fed += len(work[request.seq])
                if request.fed < len(request.generation.prompt):
                    continue
            try:
                chunk = request.generation.feed(logits[request.seq])
            except Exception as error:  # noqa: BLE001 (a failure of this request alone)
                self._end(request, error)
                continue
            if chunk.finish_reason is None:
                request.deliver(chunk)
            else:
                self._end(request, chunk)
        return True

    def _admit(self) -> bool:
        """Answer and drop the waiting requests that end before any work (cancelled, or max_tokens 0),
        wherever they are in the queue; then move waiting requests into the engine, oldest first, while
        they fit."""
        with self._lock:
            ended = [(r, end) for r in self._waiting if (end := r.generation.ended()) is not None]
            for request, _ in ended:
                self._waiting.remove(request)
            admitted = 0
            while self._waiting and self.engine.can_add(self._waiting[0].generation.tokens):
                request = self._waiting.popleft()
                request.seq = self.engine.add(request.generation.tokens)
                self._running.append(request)
                admitted += 1
        for request, end in ended:
            request.deliver(end)
        return bool(ended) or admitted > 0

    def _end_cancelled(self) -> bool:
        with self._lock:
            running = list(self._running)
        ended = [(r, end) for r in running if (end := r.generation.ended()) is not None]
        for request, end in ended:
            self._end(request, end)
        return bool(ended)

    def _end(self, request: _Request, last: Chunk | Exception) -> None:
        """The request leaves the engine (its KV pages are free), then hears its last chunk or error."""
        with self._lock:
            self._running.remove(request)
        self.engine.remove(request.seq)
        request.deliver(last)


class SequentialEngine:
    """The engine's methods over a plain Decoder (prefill/decode): one sequence at a time, its whole
    prompt in one step (max_batch 1: there is nobody to share steps with). For libraries without a
    `batch_step` entry point, so that serving has one path."""

    max_batch = 1

    def __init__(self, decoder: Any):
        self.decoder = decoder
        self.vocab_size, self.max_seq_len, self.spec = decoder.vocab_size, decoder.max_seq_len, decoder.spec
        self.step_tokens = decoder.max_seq_len
        self._next_id = 0
        self._seq: int | None = None  # the one sequence in the decoder
        self._started = False  # whether its prompt has been prefilled

    def can_ever_hold(self, tokens: int) -> bool:
        return tokens <= self.max_seq_len

    def can_add(self, tokens: int) -> bool:
        return self._seq is None and self.can_ever_hold(tokens)

    def add(self, tokens: int) -> int:
        if not self.can_add(tokens):
            raise UserError(f"the engine cannot take a sequence of {tokens} tokens now")
        self._seq, self._started, self._next_id = self._next_id, False, self._next_id + 1
        return self._seq

    def step(self, work: dict[int, list[int]]) -> dict[int, np.ndarray]:
        if not work:
            return {}
        if set(work) != {self._seq}:
            raise UserError(f"step: sequences {sorted(work)} are not in the engine (it holds {self._seq})")
        tokens = work[self._seq]
        if not self._started:
            self._started = True
            return {self._seq: self.decoder.prefill(tokens)[-1]}
        for token in tokens:  # a prompt's later chunks (not sent by the scheduler: the prompt comes whole)
            logits = self.decoder.decode(token)
        return {self._seq: logits}

    def remove(self, seq: int) -> None:
        if seq == self._seq:
            self._seq = None

    def snapshot(self) -> dict[str, Any]:
        return {"sequences": int(self._seq is not None), "max_batch": 1, "engine": "sequential"}


def engine_for(decoder: Any, *, max_batch: int = 8, kv_budget_bytes: int | None = None) -> Engine:
    """The batched engine over `decoder`'s library when it has the batched entry point (`batch` in its
    manifest), with `kv_budget_bytes` of KV cache (None: `run.batch.default_kv_budget`); else the sequential one
    (max_batch 1: split or pipelined libraries, or ones built before batching)."""
    if not decoder.manifest.get("batch"):
        return SequentialEngine(decoder)
    from .batch import BatchEngine  # noqa: PLC0415 (the TVM runtime's side)

    return BatchEngine(decoder, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes)

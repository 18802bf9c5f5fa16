"""Continuous batching (`run.batching.Scheduler`) over a fake engine whose logits are a seeded function of
each sequence's own token history: requests joining and leaving mid-run get exactly the chunks they get
alone (`generation.generate` on a one-sequence fake decoder), chunked prefill stays within the step's
tokens, admission waits for batch places and KV pages (FIFO), cancellation frees the place at once."""

from __future__ import annotations

import string
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from qcompile.errors import UserError
from qcompile.run.batch import DEFAULT_KV_CAP_BYTES, default_kv_budget
from qcompile.run.batching import Scheduler, SequentialEngine, engine_for
from qcompile.run.generation import Chunk, Generation, SamplingParams, generate
from qcompile.run.tokenizer import Tokenizer

VOCAB = list(string.ascii_letters) + list(string.digits) + ["!", "?"]  # 64 one-character tokens
SPEC = types.SimpleNamespace(name="fake")


def logits_of(history: list[int]) -> np.ndarray:
    """float32 [vocab]: a function of the whole sequence so far (a token fed to the wrong sequence, or a
    prompt chunk lost, changes every later logit)."""
    seed = zlib.crc32(np.asarray(history, np.int64).tobytes())
    return (np.random.default_rng(seed).standard_normal(len(VOCAB)) * 3).astype(np.float32)


class FakeDecoder:
    """One sequence: Decoder's prefill/decode over `logits_of`."""

    vocab_size, max_seq_len, spec = len(VOCAB), 128, SPEC

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.history = list(ids)
        return np.stack([logits_of(self.history[:n + 1]) for n in range(len(ids))])

    def decode(self, token: int) -> np.ndarray:
        self.history.append(token)
        return logits_of(self.history)


class FakeEngine:
    """BatchEngine's methods over `logits_of`: KV in pages of PAGE tokens, reserved on add for every
    token the sequence may reach. Records each step's work."""

    PAGE = 4
    vocab_size, max_seq_len, spec = len(VOCAB), 128, SPEC

    def __init__(self, max_batch: int = 3, step_tokens: int = 8, pages: int = 64):
        self.max_batch, self.step_tokens, self.pages = max_batch, step_tokens, pages
        self.sequences: dict[int, dict] = {}
        self.steps: list[dict[int, int]] = []  # per step: sequence -> tokens fed
        self.added = self.removed = 0

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.PAGE)

    def _free(self) -> int:
        return self.pages - sum(s["pages"] for s in self.sequences.values())

    def can_ever_hold(self, tokens: int) -> bool:
        return tokens <= self.max_seq_len and self._pages(tokens) <= self.pages

    def can_add(self, tokens: int) -> bool:
        return (len(self.sequences) < self.max_batch and self.can_ever_hold(tokens)
                and self._pages(tokens) <= self._free())

    def add(self, tokens: int) -> int:
        assert self.can_add(tokens)
        seq = self.added = self.added + 1
        self.sequences[seq] = {"pages": self._pages(tokens), "limit": tokens, "history": []}
        return seq

    def step(self, work: dict[int, list[int]]) -> dict[int, np.ndarray]:
        assert work and sum(len(t) for t in work.values()) <= self.step_tokens, work
        self.steps.append({seq: len(tokens) for seq, tokens in work.items()})
        out = {}
        for seq, tokens in work.items():
            history = self.sequences[seq]["history"]
            history += tokens
            assert len(history) <= self.sequences[seq]["limit"]
            out[seq] = logits_of(history)
        return out

    def remove(self, seq: int) -> None:
        del self.sequences[seq]
        self.removed += 1

    def snapshot(self) -> dict:
        return {"sequences": len(self.sequences), "max_batch": self.max_batch,
                "kv_pages_used": self.pages - self._free(), "kv_pages": self.pages}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="?"))
    return Tokenizer(backend, template="", special_tokens={}, eos_token_ids=[], where=Path("fake"))


def alone(tokenizer, prompt, params) -> list[Chunk]:
    return list(generate(FakeDecoder(), tokenizer, prompt, params))


class Collected:
    """A request's delivered chunks (the `deliver` callback)."""

    def __init__(self):
        self.chunks: list[Chunk] = []
        self.error: Exception | None = None

    def __call__(self, item: Chunk | Exception) -> None:
        assert self.error is None and not (self.chunks and self.chunks[-1].finish_reason), "after the end"
        if isinstance(item, Exception):
            self.error = item
        else:
            self.chunks.append(item)

    @property
    def done(self) -> bool:
        return self.error is not None or bool(self.chunks and self.chunks[-1].finish_reason)


def submit(scheduler, tokenizer, prompt, params, cancelled=lambda: False) -> Collected:
    out = Collected()
    scheduler.submit(Generation(scheduler.engine, tokenizer, prompt, params, cancelled=cancelled), out)
    return out


def run_until_idle(scheduler, limit: int = 1000) -> None:
    for _ in range(limit):
        if scheduler.idle():
            return
        assert scheduler.step(), "no progress"
    raise AssertionError("did not finish")


REQUESTS = [  # (prompt, sampling) with prompts of 1..21 tokens; greedy and seeded, stop strings and tokens
    ([1], SamplingParams(max_tokens=9)),
    (list(range(2, 23)), SamplingParams(max_tokens=5, temperature=0.9, seed=3)),
    ([5, 6, 7], SamplingParams(max_tokens=12, temperature=1.2, top_k=10, top_p=0.9, seed=11)),
    (list(range(30, 43)), SamplingParams(max_tokens=7, repetition_penalty=1.3, presence_penalty=0.5)),
    ([9, 9, 9, 9], SamplingParams(max_tokens=10, temperature=0.7, min_p=0.05, seed=5)),
    (list(range(40, 60)), SamplingParams(max_tokens=3)),
]


def with_stops(tokenizer, prompt, params):
    """`params` plus a stop string and a stop token taken from what the request generates alone, so both
    end it early (a stop string of two tokens' text: held back across tokens)."""
    tokens = [t for c in alone(tokenizer, prompt, params) for t in c.token_ids]
    text = tokenizer.decode(tokens[2:4])
    return (SamplingParams(**{**vars(params), "stop": [text]}),
            SamplingParams(**{**vars(params), "stop_token_ids": [tokens[-2]]}))


@pytest.mark.parametrize("max_batch,step_tokens", [(3, 8), (6, 16), (1, 4)])
def test_each_request_gets_what_it_gets_alone(tokenizer, max_batch, step_tokens):
    """Six requests (twelve more with stop strings / tokens) join while others decode and leave when done;
    every one's chunks equal its run alone, whatever batch it shared."""
    requests = list(REQUESTS)
    for prompt, params in REQUESTS[:4]:
        requests += [(prompt, p) for p in with_stops(tokenizer, prompt, params)]
    engine = FakeEngine(max_batch=max_batch, step_tokens=step_tokens)
    scheduler = Scheduler(engine)
    outs = [submit(scheduler, tokenizer, *requests[0])]
    for prompt, params in requests[1:]:  # the rest arrive one step apart, mid-run
        scheduler.step()
        outs.append(submit(scheduler, tokenizer, prompt, params))
    run_until_idle(scheduler)
    for (prompt, params), out in zip(requests, outs, strict=True):
        assert out.error is None and out.chunks == alone(tokenizer, prompt, params), (prompt, params)
    reasons = {out.chunks[-1].finish_reason for out in outs}
    assert reasons == {"length", "stop"}
    assert engine.sequences == {} and engine.removed == len(requests)
    if max_batch > 1:  # sequences shared steps, and prefill chunks shared steps with decodes
        assert max(len(s) for s in engine.steps) == max_batch
        assert any(1 in s.values() and max(s.values()) > 1 for s in engine.steps)


def test_chunked_prefill_never_stalls_the_decoding(tokenizer):
    engine = FakeEngine(max_batch=3, step_tokens=6)
    scheduler = Scheduler(engine)
    short = submit(scheduler, tokenizer, [1, 2], SamplingParams(max_tokens=20))
    scheduler.step()  # its prompt; it decodes from now on
    long_prompt = list(range(3, 40))
    long = submit(scheduler, tokenizer, long_prompt, SamplingParams(max_tokens=4))
    run_until_idle(scheduler)
    first, second = 1, 2  # the engine's sequence ids
    steps_with_long = [s for s in engine.steps if second in s]
    prefill_steps = steps_with_long[:-3]  # its last 3 steps decode
    assert all(s.get(first) == 1 for s in prefill_steps)  # the short one decoded at every step
    assert [s[second] for s in prefill_steps] == [5] * 7 + [2]  # 37 prompt tokens in chunks of 6 - 1
    assert all(sum(s.values()) <= 6 for s in engine.steps)
    assert short.chunks == alone(tokenizer, [1, 2], SamplingParams(max_tokens=20))
    assert long.chunks == alone(tokenizer, long_prompt, SamplingParams(max_tokens=4))


def test_admission_waits_for_kv_and_places_in_order(tokenizer):
    engine = FakeEngine(max_batch=2, step_tokens=8, pages=6)  # 24 tokens of KV
    scheduler = Scheduler(engine)
    big = submit(scheduler, tokenizer, list(range(1, 11)), SamplingParams(max_tokens=6))  # 16 tokens: 4 pages
    scheduler.step()
    waits = submit(scheduler, tokenizer, [2, 3, 4], SamplingParams(max_tokens=9))  # 12 tokens: 3 pages
    small = submit(scheduler, tokenizer, [5], SamplingParams(max_tokens=3))  # 1 page: fits, but is behind
    scheduler.step()
    assert scheduler.counts() == (2, 1) and not waits.chunks and not small.chunks  # FIFO: small waits too
    while not big.done:
        scheduler.step()
    scheduler.step()  # the next step admits both (3 + 1 pages, 2 places)
    assert scheduler.counts() == (0, 2) and engine.snapshot()["kv_pages_used"] == 4
    run_until_idle(scheduler)
    assert waits.chunks == alone(tokenizer, [2, 3, 4], SamplingParams(max_tokens=9))
    assert small.chunks == alone(tokenizer, [5], SamplingParams(max_tokens=3))


def test_cancel_frees_the_place_at_once(tokenizer):
    engine = FakeEngine(max_batch=1)
    scheduler = Scheduler(engine)
    flags = {"running": False, "waiting": False, "behind": False}
    running = submit(scheduler, tokenizer, [1, 2, 3], SamplingParams(max_tokens=50), lambda: flags["running"])
    waiting = submit(scheduler, tokenizer, [4], SamplingParams(max_tokens=50), lambda: flags["waiting"])
    after = submit(scheduler, tokenizer, [7, 8], SamplingParams(max_tokens=2))
    behind = submit(scheduler, tokenizer, [9], SamplingParams(max_tokens=2), lambda: flags["behind"])
    for _ in range(3):
        scheduler.step()
    assert len(running.chunks) == 3 and not running.done and scheduler.counts() == (3, 1)
    flags["behind"] = True  # a waiting request behind others leaves the queue at the next step
    scheduler.step()
    assert behind.chunks == [Chunk("", [], "cancelled")] and scheduler.counts() == (2, 1)
    flags["running"] = flags["waiting"] = True
    scheduler.step()  # ends the running one, skips the cancelled waiting one, admits and prefills `after`
    assert running.chunks[-1] == Chunk("", [], "cancelled") and len(running.chunks) == 5
    assert waiting.chunks == [Chunk("", [], "cancelled")]  # never reached the engine
    assert engine.added == 2 and engine.removed == 1 and len(after.chunks) == 1
    run_until_idle(scheduler)
    assert after.chunks == alone(tokenizer, [7, 8], SamplingParams(max_tokens=2))


def test_max_tokens_zero_and_too_long_requests(tokenizer):
    engine = FakeEngine(pages=4)  # 16 tokens of KV
    scheduler = Scheduler(engine)
    with pytest.raises(UserError, match=r"prompt \(10 tokens\) \+ max_tokens \(7\) needs more KV cache"):
        submit(scheduler, tokenizer, list(range(10)), SamplingParams(max_tokens=7))
    nothing = submit(scheduler, tokenizer, [1], SamplingParams(max_tokens=0))
    run_until_idle(scheduler)
    assert nothing.chunks == [Chunk("", [], "length")] and engine.added == 0


def test_an_engine_failure_ends_the_step_s_requests_and_the_scheduler_goes_on(tokenizer):
    engine = FakeEngine()
    scheduler = Scheduler(engine)
    first = submit(scheduler, tokenizer, [1, 2], SamplingParams(max_tokens=4))
    real_step = engine.step
    engine.step = lambda work: (_ for _ in ()).throw(RuntimeError("device lost"))
    scheduler.step()
    assert isinstance(first.error, RuntimeError) and engine.sequences == {}
    engine.step = real_step
    second = submit(scheduler, tokenizer, [1, 2], SamplingParams(max_tokens=4))
    run_until_idle(scheduler)
    assert second.chunks == alone(tokenizer, [1, 2], SamplingParams(max_tokens=4))


def test_sequential_engine_serves_one_at_a_time(tokenizer):
    """The adapter over a plain decoder (libraries without `batch_step`): the same scheduler, one
    sequence at a time, each prompt whole in one step."""
    scheduler = Scheduler(SequentialEngine(FakeDecoder()))
    outs = [submit(scheduler, tokenizer, prompt, params) for prompt, params in REQUESTS]
    scheduler.step()
    assert scheduler.counts() == (len(REQUESTS) - 1, 1)
    run_until_idle(scheduler)
    for (prompt, params), out in zip(REQUESTS, outs, strict=True):
        assert out.chunks == alone(tokenizer, prompt, params)


def test_engine_choice_and_default_kv_budget():
    """A library without the batched entry point (split, pipelined, older) gets the sequential engine;
    the default KV budget is max_batch sequences of max_seq_len, capped, but always one sequence."""
    decoder = FakeDecoder()
    decoder.manifest = {"batch": None}
    assert isinstance(engine_for(decoder, max_batch=8), SequentialEngine)
    decoder.manifest = {"kv_cache": {"dtype": "float32", "row": [2, 64],
                                     "layers": [{"kind": "full_attention"}] * 3 + [{"kind": "sliding_attention"}]},
                        "batch": {"page_tokens": 16, "max_pages": 8}}
    sequence = 2 * 64 * 4 * 2 * 3 * 16 * 8  # row x float32 x (K, V) x full layers x 128 tokens
    assert default_kv_budget(decoder, 4) == 4 * sequence
    assert default_kv_budget(decoder, 10 ** 6) == DEFAULT_KV_CAP_BYTES
    decoder.manifest["batch"]["max_pages"] = 10 ** 5  # one sequence over the cap: still room for it
    assert default_kv_budget(decoder, 8) == sequence * 10 ** 5 // 8

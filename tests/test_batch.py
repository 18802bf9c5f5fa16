"""The batch engine (`run.batch`, the libraries' `batch_step`): several sequences in one call over a paged
KV cache. Each sequence must get the logits it gets alone (`Decoder.prefill/decode`, itself checked
against transformers elsewhere), whoever shares its steps: sequences of different lengths join and leave
mid-run, prompts arrive in chunks beside others' decodes, a freed page is reused by a newcomer, and on
qwen2-sw-debug (layers 1-2 slide over 8 tokens) every sequence crosses its window inside the batch."""

from __future__ import annotations

import types

import numpy as np
import pytest

import qcompile
from qcompile.errors import UserError
from qcompile.run.batch import BatchEngine

from .conftest import CPU_TOLERANCE, max_rel_diff

MAX_SEQ_LEN, NEW_TOKENS, CHUNK = 64, 12, 7
# (prompt length, step at which it joins): the fourth joins when the first has left (max_batch 3), into
# the pages the first gave back.
ARRIVALS = [(5, 0), (19, 2), (3, 4), (11, 16)]
FAMILIES = ["qwen2-debug", "qwen2-sw-debug", "qwen3-moe-debug"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, libraries, tmp_path_factory):
    checkpoint = qcompile.init_weights(request.param, out=tmp_path_factory.mktemp("batch") / "ckpt", seed=3)
    return qcompile.load(libraries.get(request.param, max_seq_len=MAX_SEQ_LEN), weights=checkpoint)


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab, length).tolist() for length, _ in ARRIVALS]


def alone(model, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """Greedy decoding of `prompt` by itself: the logits that chose each new token, and the tokens."""
    tokens = model.generate(prompt, NEW_TOKENS)
    return model.last_step_logits, tokens.tolist()


def batched(engine: BatchEngine, all_prompts: list[list[int]], watch=lambda engine: None):
    """Greedy decoding of every prompt in one engine, arriving as ARRIVALS says: each step feeds every
    decoding sequence one token and each prefilling one the next CHUNK tokens of its prompt; a sequence
    leaves after NEW_TOKENS. Returns per prompt the logits that chose each new token, and the tokens."""
    ids, waiting = {}, {}
    logits: dict[int, list[np.ndarray]] = {i: [] for i in range(len(all_prompts))}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(all_prompts))}
    step = 0
    while step == 0 or ids or any(join >= step for _, join in ARRIVALS):
        for i, (_, join) in enumerate(ARRIVALS):
            if join == step:
                ids[i] = engine.add(len(all_prompts[i]) + NEW_TOKENS)
                waiting[i] = list(all_prompts[i])
        work = {}
        for i, seq in ids.items():
            work[seq] = waiting[i][:CHUNK] if waiting[i] else [tokens[i][-1]]
            waiting[i] = waiting[i][CHUNK:]
        out = engine.step(work)
        watch(engine)
        for i, seq in list(ids.items()):
            if not waiting[i]:  # the prompt is in: this step's logits choose the next token
                logits[i].append(out[seq])
                tokens[i].append(int(np.argmax(out[seq])))
                if len(tokens[i]) == NEW_TOKENS:
                    engine.remove(seq)
                    del ids[i]
        step += 1
    return [(np.stack(logits[i]), tokens[i]) for i in range(len(all_prompts))]


def test_every_sequence_gets_the_logits_it_gets_alone(model):
    all_prompts = prompts(model.vocab_size)
    reference = [alone(model, prompt) for prompt in all_prompts]
    engine = BatchEngine(model, max_batch=3)
    peak = {"sequences": 0}

    def watch(engine):  # at most max_batch at once; the fourth waits for a place
        peak["sequences"] = max(peak["sequences"], engine.snapshot()["sequences"])

    for (ours, our_tokens), (ref, ref_tokens) in zip(batched(engine, all_prompts, watch), reference):
        assert max_rel_diff(ours, ref) <= CPU_TOLERANCE
        assert our_tokens == ref_tokens
    assert peak["sequences"] == 3
    assert engine.snapshot()["kv_pages_used"] == 0  # every page came back


def test_sliding_layers_hold_about_a_window_per_sequence(libraries, tmp_path_factory):
    """qwen2-sw-debug: a sequence's sliding pages never exceed its window plus a step's chunk (over page
    edges), while it runs 5 + 12 tokens past its 8-token window."""
    checkpoint = qcompile.init_weights("qwen2-sw-debug", out=tmp_path_factory.mktemp("sw") / "ckpt", seed=3)
    model = qcompile.load(libraries.get("qwen2-sw-debug", max_seq_len=MAX_SEQ_LEN), weights=checkpoint)
    engine = BatchEngine(model, max_batch=3)
    most = {"pages": 0}

    def watch(engine):
        held = max((len(s.window_pages) for s in engine._sequences.values()), default=0)
        most["pages"] = max(most["pages"], held)

    batched(engine, prompts(model.vocab_size), watch)
    limit = -(-(engine.window + model.prefill_chunk - 1) // engine.page_tokens) + 1
    assert 0 < most["pages"] <= limit
    assert engine.window == 8 and engine._window.used == 0


def test_admission_follows_places_and_kv_pages(debug_library, debug_checkpoint):
    model = qcompile.load(debug_library, weights=debug_checkpoint)
    page_tokens = model.manifest["batch"]["page_tokens"]
    engine = BatchEngine(model, max_batch=2, kv_budget_bytes=4 * BatchEngine(model).page_bytes["full"])
    assert engine.snapshot()["kv_pages"] == 4
    assert not engine.can_ever_hold(5 * page_tokens)  # more pages than the whole budget
    assert not engine.can_ever_hold(MAX_SEQ_LEN + 1)
    a = engine.add(3 * page_tokens)
    assert not engine.can_add(2 * page_tokens)  # 1 page left unpromised
    with pytest.raises(UserError, match="cannot add a sequence"):
        engine.add(2 * page_tokens)
    b = engine.add(page_tokens)
    assert not engine.can_add(1)  # both places taken
    engine.remove(a)
    assert engine.can_add(3 * page_tokens)
    with pytest.raises(UserError, match="at most"):
        engine.step({b: [1] * (model.prefill_chunk + 1)})
    with pytest.raises(UserError, match="added for"):
        engine.step({b: [1] * (page_tokens + 1)})
    with pytest.raises(UserError, match="not in the batch"):
        engine.step({a: [1]})
    with pytest.raises(UserError, match="out of range"):
        engine.step({b: [model.vocab_size]})


def test_a_library_without_batch_step_is_refused_in_one_line():
    split = types.SimpleNamespace(manifest={"batch": None}, spec=types.SimpleNamespace(name="qwen2-debug"))
    with pytest.raises(UserError, match="no batched entry point"):
        BatchEngine(split)

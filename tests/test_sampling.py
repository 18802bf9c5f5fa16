"""Sampling: each logits processor gives the same filtered distribution as transformers' own on the same
logits (151,936 of them, as Qwen's), the chain in HF's order, OpenAI's penalties, seeded draws that
follow the distribution, and the parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import UserError
from qcompile.run import sampling
from qcompile.run.generation import SamplingParams
from qcompile.run.sampling import Candidates, Sampler

VOCAB = 151936


def logits_like(kind: str, seed: int = 0) -> np.ndarray:
    """float32 [VOCAB]: 'peaked' (a trained model's shape: a few tokens stand out), 'flat' (a random
    model's), 'ties' (repeated values, where top-k keeps every tie)."""
    rng = np.random.default_rng(seed)
    if kind == "peaked":
        x = rng.standard_normal(VOCAB) * 2.0
        x[rng.choice(VOCAB, 40, replace=False)] += rng.uniform(6, 14, 40)
    elif kind == "flat":
        x = rng.standard_normal(VOCAB) * 0.3
    else:
        x = rng.integers(-20, 20, VOCAB) / 4.0
    return x.astype(np.float32)


def hf(processor, logits: np.ndarray, input_ids=(0,)) -> np.ndarray:
    import torch

    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return processor(ids, torch.from_numpy(logits.copy())[None])[0].numpy()


def assert_same_distribution(ours: np.ndarray, theirs: np.ndarray, rtol: float = 1e-6) -> None:
    """The same tokens filtered (-inf) and the same values for the rest."""
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=rtol, atol=0)


KINDS = ["peaked", "flat", "ties"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0.3, 0.7, 1.5])
def test_temperature(kind, t):
    from transformers import TemperatureLogitsWarper

    x = logits_like(kind)
    assert_same_distribution(sampling.temperature(Candidates(x), t).dense(VOCAB), hf(TemperatureLogitsWarper(t), x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 20, 1000, VOCAB + 5])
def test_top_k(kind, k):
    from transformers import TopKLogitsWarper

    x = logits_like(kind)
    ours = sampling.top_k(Candidates(x), k).dense(VOCAB)
    assert_same_distribution(ours, hf(TopKLogitsWarper(k), x))
    if kind == "ties" and k < VOCAB:
        assert np.count_nonzero(np.isfinite(ours)) > k  # ties at the k-th value stay, as in HF


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95, 0.999])
def test_top_p(kind, p):
    """Includes flat logits (a random model's), where top-p keeps most of the vocabulary.

    Both keep the most probable tokens, up to where the mass of the ones before reaches p. HF sums the
    151,936 float32 probabilities from the least probable up, so a token whose predecessors' mass equals
    p to within that sum's rounding (1e-6) may fall either side of the edge: at most 2 such tokens may
    differ. Among tokens of exactly equal probability at the edge, HF keeps those torch's unstable sort
    puts last: there the kept values are compared, not the ids."""
    from transformers import TopPLogitsWarper

    x = logits_like(kind)
    ours, theirs = sampling.top_p(Candidates(x), p).dense(VOCAB), hf(TopPLogitsWarper(p), x)
    ours_kept, theirs_kept = (np.sort(v[np.isfinite(v)])[::-1] for v in (ours, theirs))
    common = min(ours_kept.size, theirs_kept.size)
    assert abs(ours_kept.size - theirs_kept.size) <= 2
    np.testing.assert_array_equal(ours_kept[:common], theirs_kept[:common])  # the same top values
    probs = np.sort(np.exp(x.astype(np.float64) - x.max()))[::-1]
    mass = np.cumsum(probs / probs.sum())
    for kept in (ours_kept.size, theirs_kept.size):  # the last kept token's predecessors hold < p
        assert mass[kept - 1] - probs[kept - 1] / probs.sum() < p + 1e-6 and mass[kept - 1] >= p - 1e-6
    if kind != "ties":
        assert_same_distribution(ours[np.isfinite(ours) == np.isfinite(theirs)],
                                 theirs[np.isfinite(ours) == np.isfinite(theirs)])
        if ours_kept.size == theirs_kept.size:
            assert_same_distribution(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p(kind, p):
    from transformers import MinPLogitsWarper

    x = logits_like(kind)
    assert_same_distribution(sampling.min_p(Candidates(x), p).dense(VOCAB), hf(MinPLogitsWarper(p), x))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits_like("peaked")
    history = [5, 17, 17, 151935, 42, int(np.argmax(x)), int(np.argmin(x))]
    ours = sampling.repetition_penalty(x, np.unique(history), penalty)
    np.testing.assert_array_equal(ours, hf(RepetitionPenaltyLogitsProcessor(penalty), x, history))


def test_the_chain_in_hfs_order():
    """Repetition penalty, temperature, top-k, top-p, min-p together, over a prompt and generated tokens."""
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    x = logits_like("peaked", seed=3)
    prompt, generated = [3, 99, 1000, 99], [int(i) for i in np.argsort(-x)[:6]]
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    sampler = Sampler(params, prompt, VOCAB)
    for token in generated:
        sampler._record(token)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8),
                                 TopKLogitsWarper(30), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)])
    theirs = hf(chain, x, prompt + generated)
    assert_same_distribution(sampler.filtered(x).dense(VOCAB), theirs)
    assert 1 < np.count_nonzero(np.isfinite(theirs)) < 30


def test_presence_and_frequency_penalties_are_openais():
    x = logits_like("flat")
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, [7, 7, 8], VOCAB)  # the prompt does not count
    for token in [8, 9, 9, 9]:
        sampler._record(token)
    expected = x.copy()
    expected[8] -= 1 * 0.25 + 0.5
    expected[9] -= 3 * 0.25 + 0.5
    np.testing.assert_allclose(sampler.penalised(x), expected, rtol=1e-6)


def test_greedy_is_the_argmax_of_the_penalised_logits():
    x = logits_like("peaked")
    best, second = np.argsort(-x)[:2]
    assert Sampler(SamplingParams(), [1, 2], VOCAB)(x) == best
    x[second] = x[best] - 0.01
    x[best] = abs(x[best])
    # The best token seen in the prompt, penalised (HF's repetition penalty) below the second.
    assert Sampler(SamplingParams(repetition_penalty=2.0), [int(best)], VOCAB)(x) == second


def test_same_seed_same_tokens():
    rows = [logits_like("flat", seed=s) for s in range(20)]

    def tokens(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed), [1], VOCAB)
        return [sampler(r) for r in rows]

    assert tokens(7) == tokens(7) and tokens(7) != tokens(8)
    assert tokens(-1) == tokens(-1)  # any integer seeds


def test_draws_follow_the_filtered_distribution():
    """20,000 draws among 5 candidates: each frequency within 5 standard deviations of its probability."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    c = Candidates(logits, np.array([10, 20, 30, 40, 50]))
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([sampling.draw(c, rng) // 10 - 1 for _ in range(n)], minlength=5)
    assert np.all(np.abs(counts / n - probs) < 5 * np.sqrt(probs * (1 - probs) / n)), (counts / n, probs)


def test_filtered_tokens_are_never_drawn():
    x = logits_like("peaked", seed=5)
    allowed = set(np.argsort(-x)[:3].tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=0), [0], VOCAB)
    assert {sampler(x) for _ in range(300)} == allowed  # all three drawn, nothing else


@pytest.mark.parametrize("fields,needle", [
    ({"top_p": 1.5}, "field 'top_p' must be in (0, 1], got 1.5"),
    ({"top_p": 0.0}, "field 'top_p' must be in (0, 1]"),
    ({"temperature": -0.1}, "field 'temperature' must be a finite number >= 0"),
    ({"temperature": float("nan")}, "field 'temperature'"),
    ({"top_k": -1}, "field 'top_k' must be an integer >= 0"),
    ({"max_tokens": 2.5}, "field 'max_tokens' must be an integer >= 0"),
    ({"min_p": 1.1}, "field 'min_p' must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "field 'repetition_penalty' must be a finite number > 0"),
    ({"presence_penalty": 2.5}, "field 'presence_penalty' must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "field 'frequency_penalty' must be in [-2, 2]"),
    ({"seed": "7"}, "field 'seed' must be an integer or null"),
    ({"stop": [""]}, "field 'stop' must be a list of non-empty strings"),
    ({"stop": "END"}, "field 'stop' must be a list"),
    ({"stop_token_ids": [-1]}, "field 'stop_token_ids' must be a list of token ids"),
    ({"top_q": 1}, "unknown field 'top_q'"),
])
def test_parameter_checks(fields, needle):
    with pytest.raises(UserError, match="^sampling: .*" + needle.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SamplingParams.from_fields(**fields)

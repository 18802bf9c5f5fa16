"""Choosing the next token from a decode step's logits: penalties, the logits warpers of Hugging Face
`generate` and a seeded draw, in numpy.

Order and semantics are transformers' (`generation/logits_process.py`): the repetition penalty, then
temperature, top-k, top-p, min-p, then a draw from the softmax of what is left. OpenAI's presence and
frequency penalties (not in transformers) are applied with the repetition penalty, before temperature,
as OpenAI defines them: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, where count[j] is
how often token j was generated so far. Temperature 0 is greedy: the argmax of the penalised logits.

Cost per token on Qwen's 151,936 logits is a few vectorised passes, no full sort: top-k takes the k-th
largest value with a partition; top-p sorts only the tokens of one slice of the logit range, the slice
where the cumulative mass crosses p. See `bench/sampling_cost.py`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .generation import SamplingParams


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The tokens still in play and their logits (float32): `ids` None means every token, in id order,
    with `logits` the full vector. Filters return a subset; the logits of survivors are unchanged."""

    logits: np.ndarray
    ids: np.ndarray | None = None

    def token(self, index: int) -> int:
        return int(index if self.ids is None else self.ids[index])

    def keep(self, mask_or_index: np.ndarray) -> Candidates:
        index = np.flatnonzero(mask_or_index) if mask_or_index.dtype == bool else mask_or_index
        return Candidates(self.logits[index], index if self.ids is None else self.ids[index])

    def dense(self, vocab_size: int) -> np.ndarray:
        """As HF's warpers return them: float32 [vocab], filtered tokens at -inf."""
        if self.ids is None:
            return self.logits
        out = np.full(vocab_size, -np.inf, np.float32)
        out[self.ids] = self.logits
        return out


# --- penalties (on the full logits, before any filtering) ---------------------------------------------

def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor: each token already in the sequence (prompt and generated,
    `seen` its distinct ids) has a negative logit multiplied by `penalty`, a positive one divided by it."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def presence_frequency_penalty(logits: np.ndarray, ids: np.ndarray, counts: np.ndarray, presence: float,
                               frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= count[j] * frequency + presence for each generated token j
    (`ids` the distinct generated tokens, `counts` how often each was generated)."""
    if (presence == 0.0 and frequency == 0.0) or ids.size == 0:
        return logits
    out = logits.copy()
    out[ids] -= (counts * np.float32(frequency) + np.float32(presence)).astype(np.float32)
    return out


# --- warpers (on candidates) --------------------------------------------------------------------------

def temperature(c: Candidates, t: float) -> Candidates:
    """HF's TemperatureLogitsWarper: logits / t."""
    return c if t == 1.0 else Candidates((c.logits / np.float32(t)).astype(np.float32), c.ids)


def top_k(c: Candidates, k: int) -> Candidates:
    """HF's TopKLogitsWarper: keep the tokens whose logit is at least the k-th largest (ties at the k-th
    value stay, as in HF). One partition, no sort."""
    n = c.logits.size
    if k <= 0 or k >= n:
        return c
    kth = np.partition(c.logits, n - k)[n - k]
    return c.keep(c.logits >= kth)


def _probabilities(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def top_p(c: Candidates, p: float, bins: int = 2048) -> Candidates:
    """HF's TopPLogitsWarper: in order of probability, keep each token while the mass of the tokens more
    probable than it is below `p` (so the most probable token always stays).

    Without sorting the vocabulary: one pass puts the tokens in `bins` equal slices of the logit range
    and sums each slice's probability. Every token in a slice above the one where the mass from the top
    crosses `p` is kept, every token below it dropped; only that slice's tokens are sorted.
    *Where tokens of exactly equal probability straddle the edge, HF keeps those its (unstable) torch
    sort happens to put last; here the lower ids. The same number of each value is kept either way."""
    if p >= 1.0:
        return c
    probs = _probabilities(c.logits)
    low, high = float(c.logits.min()), float(c.logits.max())
    scale = np.float32((bins - 1) / (high - low) if high > low else 0.0)
    slice_of = np.minimum(((c.logits - np.float32(low)) * scale).astype(np.int64), bins - 1)  # monotonic
    mass = np.bincount(slice_of, weights=probs, minlength=bins)  # float64
    above = np.cumsum(mass[::-1])[::-1] - mass  # mass of the slices above each slice
    edge = int(np.flatnonzero(above < p)[0])  # the slice where the mass from the top crosses p
    keep = slice_of > edge
    in_edge = np.flatnonzero(slice_of == edge)
    in_edge = in_edge[np.argsort(-probs[in_edge], kind="stable")]  # exact ties: the lower id first*
    before = above[edge] + np.cumsum(probs[in_edge], dtype=np.float64) - probs[in_edge]
    keep[in_edge[before < p]] = True
    return c.keep(keep)


def min_p(c: Candidates, p: float) -> Candidates:
    """HF's MinPLogitsWarper: drop tokens less probable than p times the most probable one. Probabilities
    over one softmax share the normaliser, so the test is exp(logit - max logit) < p."""
    if p <= 0.0:
        return c
    return c.keep(np.exp(c.logits - c.logits.max()) >= np.float32(p))


def draw(c: Candidates, rng: np.random.Generator) -> int:
    """One token from the softmax of the candidates' logits (inverse CDF with one uniform from `rng`)."""
    cdf = np.cumsum(np.exp(c.logits - c.logits.max()), dtype=np.float64)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return c.token(min(index, cdf.size - 1))


# --- one request's sampler ----------------------------------------------------------------------------

class Sampler:
    """Picks each next token of one sequence. Holds what the penalties need (the distinct tokens of the
    prompt and generation, the generated counts) and the request's numpy Generator, seeded by
    `params.seed` (the same seed and logits give the same tokens)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2 ** 64)
        self._seen = np.zeros(vocab_size, bool)  # in the prompt or generated: repetition penalty
        self._seen[np.asarray(prompt_ids, np.int64)] = True
        self._seen_ids = np.flatnonzero(self._seen)
        self._counts = np.zeros(vocab_size, np.int32)  # generated so far: presence/frequency penalties
        self._generated_ids = np.zeros(0, np.int64)

    def penalised(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        logits = repetition_penalty(logits, self._seen_ids, p.repetition_penalty)
        return presence_frequency_penalty(logits, self._generated_ids, self._counts[self._generated_ids],
                                          p.presence_penalty, p.frequency_penalty)

    def filtered(self, logits: np.ndarray) -> Candidates:
        """The candidates after the penalties and warpers, in HF's order."""
        p = self.params
        c = temperature(Candidates(self.penalised(logits)), p.temperature)
        return min_p(top_p(top_k(c, p.top_k), p.top_p), p.min_p)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for float32 logits [vocab]; it is recorded for the penalties."""
        if self.params.temperature == 0.0:
            token = int(np.argmax(self.penalised(logits)))
        else:
            token = draw(self.filtered(logits), self.rng)
        self._record(token)
        return token

    def _record(self, token: int) -> None:
        if not self._seen[token]:
            self._seen[token] = True
            self._seen_ids = np.append(self._seen_ids, token)
        if self._counts[token] == 0:
            self._generated_ids = np.append(self._generated_ids, token)
        self._counts[token] += 1

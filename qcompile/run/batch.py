"""Several sequences at once: the batch engine over a decoder library's `batch_step` entry point.

The KV cache is paged (`models.paged`): per layer a pool of pages of PAGE_TOKENS tokens; a sequence holds
the pages its positions need, listed in its row of a page table. Full-attention layers share one pool
size and table; sliding layers have their own, and a sequence gives back a sliding page as soon as every
later query's window has passed it, so a sliding layer holds about one window per sequence.

A sequence is added with the number of tokens it may reach (prompt + new tokens): its full-layer pages
are reserved then, so a running sequence never waits for memory; they are handed out as it grows and all
come back when it leaves. Nothing of another sequence moves when one joins, grows or leaves.

    engine = BatchEngine(decoder, max_batch=8)
    a = engine.add(len(prompt) + max_new)
    logits = engine.step({a: prompt[:64]})[a]     # a chunk of the prompt ...
    logits = engine.step({a: [token], b: [t2]})    # ... and decodes of several sequences in one call
    engine.remove(a)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tvm_ffi

from ..errors import UserError
from . import tvm_runtime


@dataclasses.dataclass
class _Sequence:
    row_tokens: int  # tokens reserved (prompt + new tokens it may reach)
    position: int = 0  # tokens fed so far
    full_pages: list[int] = dataclasses.field(default_factory=list)  # page of positions 16k .. 16k+15
    window_pages: dict[int, int] = dataclasses.field(default_factory=dict)  # page index -> pool page


def token_bytes(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes one token's keys and values take in the library's full-attention layers ("full") and in its
    sliding ones ("window")."""
    cache = manifest["kv_cache"]
    row = math.prod(cache["row"]) * np.dtype(cache["dtype"]).itemsize * 2  # K and V of one layer
    full = sum(layer["kind"] != "sliding_attention" for layer in cache["layers"])
    return {"full": row * full, "window": row * (len(cache["layers"]) - full)}


# The KV budget when none is given is capped here: room for max_batch sequences of a long context can be
# far more memory than short requests need (a request reserves only its prompt + max_tokens).
DEFAULT_KV_CAP_BYTES = 2 * 2 ** 30


def default_kv_budget(decoder: Any, max_batch: int) -> int:
    """Bytes of KV cache for `max_batch` sequences of the library's max_seq_len (its full-attention
    layers, in whole pages), capped at DEFAULT_KV_CAP_BYTES but never below one such sequence, so every
    request the context allows can run."""
    batch = decoder.manifest["batch"]
    sequence = token_bytes(decoder.manifest)["full"] * batch["page_tokens"] * batch["max_pages"]
    return max(sequence, min(max_batch * sequence, DEFAULT_KV_CAP_BYTES))


class PagePool:
    """Free pages of one pool size (page numbers 0 .. pages-1)."""

    def __init__(self, pages: int):
        self.pages = pages
        self.free = list(range(pages - 1, -1, -1))  # pop() hands out low numbers first

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, pages) -> None:
        self.free.extend(pages)

    @property
    def used(self) -> int:
        return self.pages - len(self.free)


class BatchEngine:
    """Up to `max_batch` sequences over one loaded `runtime.Decoder`'s library and weights.

    `kv_budget_bytes` bounds the full-attention layers' pools (default: `default_kv_budget`); the
    sliding layers' pools are sized for max_batch windows. `step_tokens`, the most tokens one step
    takes, is the library's prefill chunk."""

    def __init__(self, decoder: Any, *, max_batch: int = 8, kv_budget_bytes: int | None = None):
        batch = decoder.manifest.get("batch")
        if not batch:
            raise UserError(f"{decoder.spec.name}: this library has no batched entry point (a split library, "
                            f"or built by an older qcompile); it runs one sequence at a time")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise UserError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.decoder, self.spec = decoder, decoder.spec
        self.max_batch, self.vocab_size = max_batch, decoder.vocab_size
        self.max_seq_len, self.step_tokens = decoder.max_seq_len, decoder.prefill_chunk
        self.page_tokens, self.max_pages = batch["page_tokens"], batch["max_pages"]
        self._function = decoder._vm[batch["function"]]
        cache = decoder.manifest["kv_cache"]
        self._windows = [layer.get("window") if layer["kind"] == "sliding_attention" else None
                         for layer in cache["layers"]]
        # Sliding pages are kept for the widest window (the families give all sliding layers one).
        self.window = max((w for w in self._windows if w is not None), default=None)
        self.page_bytes = {kind: b * self.page_tokens for kind, b in token_bytes(decoder.manifest).items()}
        if kv_budget_bytes is None:
            kv_budget_bytes = default_kv_budget(decoder, max_batch)
        if self.page_bytes["full"] and kv_budget_bytes < self.page_bytes["full"]:
            raise UserError(f"--kv-budget {kv_budget_bytes} bytes is less than one page of the KV cache "
                            f"({self.page_bytes['full']} bytes: {self.page_tokens} tokens of every layer)")
        self._full = PagePool(kv_budget_bytes // self.page_bytes["full"] if self.page_bytes["full"] else 1)
        self._window = PagePool(max_batch * self._window_pages_per_sequence() if self.window else 1)
        rt = tvm_runtime.runtime()
        self._pools = []
        for window in self._windows:
            pages = (self._full if window is None else self._window).pages
            for _ in ("k", "v"):  # zeroed: a masked column then adds exactly 0 (`models.paged`)
                self._pools.append(rt.tensor(np.zeros((pages, self.page_tokens, *cache["row"]), cache["dtype"]),
                                             decoder.device))
        self._sequences: dict[int, _Sequence] = {}
        self._reserved = 0  # full pages promised to the sequences (held or still to take)
        self._next_id = 0

    def _window_pages_per_sequence(self) -> int:
        """Sliding pages a sequence can hold at once: its window plus a step's chunk, over page edges."""
        return -(-(self.window + self.step_tokens - 1) // self.page_tokens) + 1

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens) if self.page_bytes["full"] else 0

    # --- admission ------------------------------------------------------------------------------------

    def can_ever_hold(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` tokens (prompt + new tokens) fits an empty engine."""
        return 0 < tokens <= self.max_seq_len and self._pages_for(tokens) <= self._full.pages

    def can_add(self, tokens: int) -> bool:
        """Whether it fits now: a batch place free and full-layer pages for all its tokens unpromised."""
        return (self.can_ever_hold(tokens) and len(self._sequences) < self.max_batch
                and self._reserved + self._pages_for(tokens) <= self._full.pages)

    def add(self, tokens: int) -> int:
        """A new sequence that may reach `tokens` tokens; returns its id."""
        if not self.can_add(tokens):
            raise UserError(f"cannot add a sequence of {tokens} tokens now: {len(self._sequences)} of "
                            f"{self.max_batch} places taken, {self._full.pages - self._reserved} of "
                            f"{self._full.pages} KV pages unpromised")
        self._reserved += self._pages_for(tokens)
        seq, self._next_id = self._next_id, self._next_id + 1
        self._sequences[seq] = _Sequence(tokens)
        return seq

    def remove(self, seq: int) -> None:
        """The sequence leaves; its pages are free at once."""
        s = self._sequences.pop(seq)
        self._full.give_back(s.full_pages)
        self._window.give_back(s.window_pages.values())
        self._reserved -= self._pages_for(s.row_tokens)

    def snapshot(self) -> dict[str, Any]:
        return {"sequences": len(self._sequences), "max_batch": self.max_batch,
                "kv_pages_used": self._full.used, "kv_pages": self._full.pages,
                "kv_bytes": self._full.pages * self.page_bytes["full"] + self._window.pages * self.page_bytes["window"]}

    # --- a step ---------------------------------------------------------------------------------------

    def step(self, work: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Feed each listed sequence its next tokens (all in one call); per listed sequence, float32
        logits [vocab] of the last token fed. The listed tokens add up to at most `step_tokens`."""
        if not work:
            return {}
        total = sum(len(tokens) for tokens in work.values())
        if total > self.step_tokens:
            raise UserError(f"a step takes at most {self.step_tokens} tokens, got {total}")
        ids, positions, token_seq, logit_rows = [], [], [], []
        tables = np.zeros((2, len(work), self.max_pages), np.int32)  # unused entries: page 0 (masked)
        for row, (seq, tokens) in enumerate(work.items()):
            s = self._sequences.get(seq)
            if s is None:
                raise UserError(f"sequence {seq} is not in the batch")
            if not tokens:
                raise UserError(f"sequence {seq}: no tokens to feed")
            end = s.position + len(tokens)
            if end > s.row_tokens:
                raise UserError(f"sequence {seq} would reach {end} tokens; it was added for {s.row_tokens}")
            bad = [t for t in tokens if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is out of range 0..{self.vocab_size - 1}")
            self._grow(s, end)
            ids += tokens
            positions += range(s.position, end)
            token_seq += [row] * len(tokens)
            logit_rows.append(len(ids) - 1)
            tables[0, row, :len(s.full_pages)] = s.full_pages
            for index, page in s.window_pages.items():
                tables[1, row, index] = page
        rt, device = tvm_runtime.runtime(), self.decoder.device

        def tensor(values) -> Any:
            return rt.tensor(np.asarray(values, np.int32), device)

        logits, _ = self._function(tensor(ids), tensor(positions), tensor(token_seq), tensor(logit_rows),
                                   tensor(tables[0]), tensor(tables[1]), tvm_ffi.Shape([min(positions)]),
                                   tvm_ffi.Shape([max(positions) + 1]), self._pools, self.decoder._params)
        out = rt.numpy(logits)
        for row, (seq, tokens) in enumerate(work.items()):
            s = self._sequences[seq]
            s.position += len(tokens)
            self._drop_passed_window_pages(s)
        return {seq: out[row] for row, seq in enumerate(work)}

    def _grow(self, s: _Sequence, end: int) -> None:
        """Give `s` the pages for its positions up to end - 1 (full: all; sliding: from its window on)."""
        pages = self._pages_for(end)
        while len(s.full_pages) < pages:
            s.full_pages.append(self._full.take())  # reserved at add(): never empty here
        if self.window:
            for index in range(s.position // self.page_tokens, (end - 1) // self.page_tokens + 1):
                if index not in s.window_pages:
                    s.window_pages[index] = self._window.take()

    def _drop_passed_window_pages(self, s: _Sequence) -> None:
        """Free the sliding pages no later query of `s` sees: every position < next - window + 1."""
        if not self.window:
            return
        oldest_seen = s.position - self.window + 1  # the next query (at s.position) sees from here
        for index in [i for i in s.window_pages if (i + 1) * self.page_tokens <= oldest_seen]:
            self._window.give_back([s.window_pages.pop(index)])

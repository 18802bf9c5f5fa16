"""Text generation: sampling parameters, the token loop, streamed text chunks, stop conditions (stop
tokens, stop strings, max tokens, cancellation).

`Generation` is one request's state machine: fed the logits of each model step, it picks the next
token and says what to feed next; it holds the request's sampler, stop conditions and text, so one
sequence (`generate`, here) and a batch of them (`run.batching.Scheduler`) share the same logic.

`generate(model, tokenizer, prompt_ids, params)` checks everything it can before any work (so a caller
can refuse a request up front) and returns an iterator of `Chunk`s: the text each new token completes,
held back while a UTF-8 character is incomplete or the text might be the start of a stop string. Stop
strings and stop tokens are not part of the text (OpenAI's semantics); the chunks' text joined equals
the decode of the generated tokens (the stop token left out) cut at the stop string.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import UserError
from .sampling import Sampler
from .tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class SamplingParams:
    """How one request generates (the defaults: greedy, 16 tokens). Semantics in `run.sampling`."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # HF's, over prompt and generated tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens
    seed: int | None = None  # None: a fresh random draw
    stop: list[str] = dataclasses.field(default_factory=list)  # texts that end generation (not returned)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # besides the tokenizer's eos ids

    @classmethod
    def from_fields(cls, **fields: Any) -> SamplingParams:
        """Checked parameters from keyword arguments; an unknown name is a UserError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(f"sampling: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        params = cls(**fields)
        params.check()
        return params

    def check(self) -> None:
        """Every field's type and range (OpenAI's for the penalties, HF's for the warpers)."""
        def fail(name: str, rule: str) -> None:
            raise UserError(f"sampling: field {name!r} must be {rule}, got {getattr(self, name)!r}")

        def number(name: str, rule: str, within: Callable[[float], bool]) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not within(value):
                fail(name, rule)

        for name in ("max_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "an integer >= 0")
        number("temperature", "a finite number >= 0", lambda v: v >= 0)
        number("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        number("min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        number("repetition_penalty", "a finite number > 0", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail("seed", "an integer or null")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            fail("stop_token_ids", "a list of token ids (integers >= 0)")


@dataclasses.dataclass
class Chunk:
    text: str  # new text; "" while an incomplete UTF-8 character or a possible stop-string prefix is held back
    token_ids: list[int]  # the generated tokens this chunk accounts for
    finish_reason: str | None = None  # last chunk only: "stop" (stop token/string) | "length" | "cancelled"


class StopStrings:
    """Text in, text out, cut at the first stop string. Text that might be the start of a stop string is
    held back until the next text decides (an occurrence can only start inside the held text)."""

    def __init__(self, stop: list[str]):
        self.stop = list(stop)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to hand out, whether a stop string was reached: then nothing follows it)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            out, self.held = self.held[:min(found)], ""
            return out, True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class _Text:
    """The text of the generated tokens as it streams: detokenised, then cut at stop strings."""

    def __init__(self, stream: StreamDecoder, stop: list[str]):
        self.stream, self.stops = stream, StopStrings(stop)

    def push(self, token: int) -> tuple[str, bool]:
        return self.stops.feed(self.stream.push(token))

    def finish(self) -> str:
        """Everything still held (the generation ends without reaching a stop string)."""
        text, stopped = self.stops.feed(self.stream.flush())
        return text if stopped else text + self.stops.flush()


class Generation:
    """One request's generation as a state machine that is fed logits: it samples each next token (its
    own Sampler and seed), streams its text, and decides when the request ends (stop token, stop string,
    max tokens, cancellation). Whoever drives it runs the model: the prompt first (`prompt`), then each
    token it names (`next_token`), handing back the logits that predict the following one (`feed`).
    `generate()` drives one with a Decoder's prefill/decode; `run.batching.Scheduler` drives many at once.

    Made only for a request that passes every check (UserError otherwise), before any model work.
    `model` is what runs it: anything with `vocab_size`, `max_seq_len` and `spec.name` (a Decoder, a
    BatchEngine). `cancelled()` is asked before every model step (`ended()`)."""

    def __init__(self, model: Any, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                 cancelled: Callable[[], bool] = lambda: False):
        params.check()
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UserError("prompt: no tokens to start from (empty text)")
        if len(prompt) + params.max_tokens > model.max_seq_len:
            raise UserError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                            f"library's max_seq_len {model.max_seq_len}")
        bad = [i for i in [*prompt, *params.stop_token_ids] if not 0 <= i < model.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is out of range 0..{model.vocab_size - 1} of {model.spec.name}")
        self.prompt, self.params, self.cancelled = prompt, params, cancelled
        self._stop_ids = set(tokenizer.eos_token_ids) | set(params.stop_token_ids)
        self._text = _Text(tokenizer.stream(), params.stop)
        self._sampler = Sampler(params, prompt, model.vocab_size)
        self.generated: list[int] = []
        self.next_token: int | None = None  # the token to feed the model next (None: the prompt, or ended)
        self.finish_reason: str | None = None  # set once the last chunk has been made
        # Time spent on this request: the model's steps as the driver reports them (`spent`), and this
        # object's own work (sampling, detokenising); the prompt's steps count as prefill.
        self.prefill_seconds = self.decode_seconds = 0.0

    @property
    def tokens(self) -> int:
        """Prompt + max_tokens: the most the sequence can hold (what a KV cache must reserve)."""
        return len(self.prompt) + self.params.max_tokens

    def ended(self) -> Chunk | None:
        """Asked before each model step: the request's last chunk if it ends without that step (it was
        cancelled, or max_tokens is 0); None to go on."""
        if self.finish_reason is None and not self.generated and self.params.max_tokens == 0:
            return self._last("", [], "length")
        if self.finish_reason is None and self.cancelled():
            return self._last(self._text.finish(), [], "cancelled")
        return None

    def spent(self, seconds: float) -> None:
        """The driver's model time for one step of this request (prefill until the first token)."""
        if self.generated:
            self.decode_seconds += seconds
        else:
            self.prefill_seconds += seconds

    def feed(self, logits: np.ndarray) -> Chunk:
        """float32 logits [vocab] predicting the next token (the prompt's last row, then each decode
        step's) -> the chunk of the token chosen; its `finish_reason` is set when the request ends there,
        else `next_token` is the token to feed next."""
        start = time.perf_counter()
        token = self._sampler(logits)
        self.generated.append(token)
        self.next_token = None
        if token in self._stop_ids:
            chunk = self._last(self._text.finish(), [token], "stop", start)
        else:
            piece, stopped = self._text.push(token)
            if stopped:
                chunk = self._last(piece, [token], "stop", start)
            elif len(self.generated) == self.params.max_tokens:
                chunk = self._last(piece + self._text.finish(), [token], "length", start)
            else:
                chunk, self.next_token = Chunk(piece, [token]), token
                self.decode_seconds += time.perf_counter() - start
        return chunk

    def stats(self) -> Any:
        """This request's runtime.GenerateStats (its prompt, new tokens, prefill and decode time)."""
        from .runtime import GenerateStats  # noqa: PLC0415 (runtime imports this module lazily too)

        return GenerateStats(len(self.prompt), len(self.generated), self.prefill_seconds, self.decode_seconds)

    def _last(self, text: str, token_ids: list[int], reason: str, start: float | None = None) -> Chunk:
        if start is not None:
            self.decode_seconds += time.perf_counter() - start
        self.finish_reason, self.next_token = reason, None
        return Chunk(text, token_ids, reason)


def generate(model: Any, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
             cancelled: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
    """Generate after `prompt_ids` with `model` (a loaded Decoder: prefill(ids) -> logits [n, vocab],
    decode(token) -> logits [vocab], max_seq_len, vocab_size). Checks the request now (UserError) and
    returns the chunks' iterator; `cancelled()` is asked before the prefill and every decode step.
    Timings of the run land in `model.last_stats` (a runtime.GenerateStats) before the last chunk."""
    return _one_sequence(model, Generation(model, tokenizer, prompt_ids, params, cancelled=cancelled))


def _one_sequence(model: Any, generation: Generation) -> Iterator[Chunk]:
    """`generation` driven alone on `model`'s prefill/decode (only this generator's time is counted)."""
    def last(chunk: Chunk) -> Chunk:
        model.last_stats = generation.stats()
        return chunk

    if (end := generation.ended()) is not None:
        yield last(end)
        return
    start = time.perf_counter()
    logits = model.prefill(generation.prompt)[-1]
    generation.spent(time.perf_counter() - start)
    while True:
        chunk = generation.feed(logits)
        if chunk.finish_reason is not None:
            yield last(chunk)
            return
        yield chunk
        if (end := generation.ended()) is not None:
            yield last(end)
            return
        start = time.perf_counter()
        logits = model.decode(generation.next_token)
        generation.spent(time.perf_counter() - start)


def reply(model: Any, tokenizer: Tokenizer, prompt_ids: list[int], stream: bool, sampling: dict[str, Any]):
    """The generated text, or with `stream` an iterator of its non-empty pieces (Decoder.generate_text
    and Decoder.chat). `sampling` holds SamplingParams fields; everything is checked before returning."""
    chunks = generate(model, tokenizer, prompt_ids, SamplingParams.from_fields(**sampling))
    pieces = (chunk.text for chunk in chunks if chunk.text)
    return pieces if stream else "".join(pieces)

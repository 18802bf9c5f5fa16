"""Text generation for one sequence: sampling parameters, the token loop, streamed text chunks, stop
conditions (stop tokens, stop strings, max tokens, cancellation).

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


def generate(model: Any, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
             cancelled: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
    """Generate after `prompt_ids` with `model` (a loaded Decoder: prefill(ids) -> logits [n, vocab],
    decode(token) -> logits [vocab], max_seq_len, vocab_size). Checks the request now (UserError) and
    returns the chunks' iterator; `cancelled()` is asked before the prefill and every decode step.
    Timings of the run land in `model.last_stats` (a runtime.GenerateStats) before the last chunk."""
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
    stop_ids = set(tokenizer.eos_token_ids) | set(params.stop_token_ids)
    return _chunks(model, prompt, params, stop_ids, _Text(tokenizer.stream(), params.stop), cancelled)


def _chunks(model: Any, prompt: list[int], params: SamplingParams, stop_ids: set[int], text: _Text,
            cancelled: Callable[[], bool]) -> Iterator[Chunk]:
    from .runtime import GenerateStats  # noqa: PLC0415 (runtime imports this module lazily too)

    sampler = Sampler(params, prompt, model.vocab_size)
    generated: list[int] = []
    prefill_seconds = decode_seconds = 0.0  # time inside this generator only, not the consumer's

    def last(piece: str, token_ids: list[int], reason: str) -> Chunk:
        model.last_stats = GenerateStats(len(prompt), len(generated), prefill_seconds, decode_seconds)
        return Chunk(piece, token_ids, reason)

    if params.max_tokens == 0 or cancelled():
        yield last("", [], "length" if params.max_tokens == 0 else "cancelled")
        return
    start = time.perf_counter()
    logits = model.prefill(prompt)[-1]
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    token = sampler(logits)
    decode_seconds = time.perf_counter() - start
    while True:
        start = time.perf_counter()
        generated.append(token)
        if token in stop_ids:
            decode_seconds += time.perf_counter() - start
            yield last(text.finish(), [token], "stop")
            return
        piece, stopped = text.push(token)
        if stopped or len(generated) == params.max_tokens:
            piece = piece if stopped else piece + text.finish()
            decode_seconds += time.perf_counter() - start
            yield last(piece, [token], "stop" if stopped else "length")
            return
        decode_seconds += time.perf_counter() - start
        yield Chunk(piece, [token])
        if cancelled():
            yield last(text.finish(), [], "cancelled")
            return
        start = time.perf_counter()
        token = sampler(model.decode(token))
        decode_seconds += time.perf_counter() - start


def reply(model: Any, tokenizer: Tokenizer, prompt_ids: list[int], stream: bool, sampling: dict[str, Any]):
    """The generated text, or with `stream` an iterator of its non-empty pieces (Decoder.generate_text
    and Decoder.chat). `sampling` holds SamplingParams fields; everything is checked before returning."""
    chunks = generate(model, tokenizer, prompt_ids, SamplingParams.from_fields(**sampling))
    pieces = (chunk.text for chunk in chunks if chunk.text)
    return pieces if stream else "".join(pieces)

"""Streaming detokenisation: text appears token by token, a character whose UTF-8 bytes are split across
tokens is held until its last byte arrives, and the pieces joined equal the one-shot decode."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.run import qwen_vocab
from qcompile.run.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(text_checkpoint) -> Tokenizer:
    return Tokenizer.from_directory(text_checkpoint)


def byte_tokens(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte (the 256 single-byte tokens): every multi-byte character is split."""
    return [tok.token_id(qwen_vocab.spell(bytes([b]))) for b in data]


def pushed(tok: Tokenizer, ids: list[int]) -> list[str]:
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("text", ["好", "🦙", "a😀b", "日本語", "é"])
def test_split_characters_are_held_until_complete(tok, text):
    data = text.encode()
    pieces = pushed(tok, byte_tokens(tok, data))
    # The text after each byte is exactly the complete characters so far: nothing broken, nothing late.
    expected, done = [], 0
    for end in range(1, len(data) + 1):
        try:
            complete = data[:end].decode()
        except UnicodeDecodeError:
            expected.append("")
            continue
        expected.append(complete[done:])
        done = len(complete)
    assert pieces == [*expected, ""]
    assert "".join(pieces) == text


@pytest.mark.parametrize("text", [
    "🦙 llamas 👨‍👩‍👧‍👦 family 👍🏽 🇯🇵 ✨",
    "你好，世界！今天天气很好。𠀋𡈽𡌛 (rare CJK)",
    "Ünïcödé, नमस्ते, สวัสดี, مرحبا",
])
def test_real_encodings_stream_to_the_one_shot_decode(tok, text):
    ids = tok.encode(text)
    pieces = pushed(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1] and len([p for p in pieces if p]) > 1  # some held back, most streamed


def test_invalid_and_unfinished_bytes_come_out_as_the_one_shot_decode_renders_them(tok):
    cases = [b"\xff" + b"ok", b"ab\xf0\x9f", b"\xe4\xbd" + b"x\xe5\xa5\xbd", b"\x80\x80 end"]
    for data in cases:
        ids = byte_tokens(tok, data)
        pieces = pushed(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == data.decode("utf-8", "replace"), data


def test_random_token_sequences(tok):
    """Any token sequence (specials, unknown padding ids included) streams to its one-shot decode."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, 151936, rng.integers(1, 40)).tolist()
        if rng.random() < 0.5:  # bias towards byte tokens, where characters split
            ids = [i % 256 for i in ids]
        assert "".join(pushed(tok, ids)) == tok.decode(ids)

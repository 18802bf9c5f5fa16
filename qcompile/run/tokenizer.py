"""A checkpoint's Hugging Face tokenizer, used through the `tokenizers` library (no transformers at run
time), its chat template, and streaming detokenisation.

Files read from a checkpoint directory:
- `tokenizer.json` (HF's fast-tokenizer file), or else `vocab.json` + `merges.txt`, read as Qwen2's
  slow-tokenizer files: byte-level BPE with Qwen's pre-tokenisation, the added tokens taken from
  `tokenizer_config.json`'s `added_tokens_decoder`;
- `tokenizer_config.json` (optional): `chat_template` and the named special tokens templates see;
- `chat_template.jinja` (optional): a template file, which wins over the config's, as in transformers;
- `generation_config.json` (optional): `eos_token_id`, an id or a list, where generation stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from ..errors import UserError
from ..spec.schema import read_json_object
from . import chat_template, qwen_vocab

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
# Where generation stops when generation_config.json does not say: these tokens, where they exist.
DEFAULT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
REPLACEMENT = "\ufffd"  # what a decode gives for bytes that do not (yet) form a UTF-8 character


class StreamDecoder:
    """Token ids in, text out as soon as it is complete: a character whose UTF-8 bytes are split across
    tokens is held until its last byte arrives. The pieces joined (with `flush()`) equal the one-shot
    decode of all the ids.

    Each push decodes a short window: the ids of the last piece handed out (context, so decoders that
    treat a sequence's start specially still see the middle of one) plus the ids not yet handed out.
    The new text is what the window decodes to beyond the context; it is held while it ends in U+FFFD,
    which a decode gives for bytes that do not form a character (yet)."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._context = 0  # ids[_context:_pending]: the last piece handed out
        self._pending = 0  # ids[_pending:]: not handed out yet

    def _new_text(self) -> str:
        context = self._decode(self._ids[self._context:self._pending])
        return self._decode(self._ids[self._context:])[len(context):]

    def push(self, token_id: int) -> str:
        """Add one generated token; the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        text = self._new_text()
        if not text or text.endswith(REPLACEMENT):
            return ""
        self._context, self._pending = self._pending, len(self._ids)
        return text

    def flush(self) -> str:
        """Whatever is held, as the one-shot decode renders it (U+FFFD for bytes that never completed)."""
        text = self._new_text()
        self._context = self._pending = len(self._ids)
        return text


class Tokenizer:
    """Text <-> token ids for one checkpoint, and its chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, template: str, special_tokens: dict[str, str],
                 eos_token_ids: list[int], where: Path):
        self._backend = backend
        self.chat_template = template
        self.special_tokens = special_tokens  # bos_token, eos_token, ...: what templates see by name
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.where = where

    @staticmethod
    def present(directory: Path) -> bool:
        """Whether `directory` holds HF tokenizer files (tokenizer.json, or vocab.json + merges.txt)."""
        directory = Path(directory)
        return (directory / TOKENIZER_FILE).is_file() or (
            (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file())

    @staticmethod
    def require(directory: Path) -> None:
        """A UserError naming `directory` unless it is a directory with tokenizer files."""
        if not Path(directory).is_dir():
            raise UserError(f"{directory}: checkpoint directory not found")
        if not Tokenizer.present(directory):
            raise UserError(f"{directory}: no tokenizer files ({TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE})")

    @classmethod
    def from_directory(cls, directory: Path) -> Tokenizer:
        directory = Path(directory)
        cls.require(directory)
        config = _read_optional_json(directory / CONFIG_FILE)
        backend = _read_backend(directory, config)
        return cls(backend, template=_chat_template(directory, config), special_tokens=_special_tokens(config),
                   eos_token_ids=_eos_token_ids(directory, backend), where=directory)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing added around it. Special-token text ("<|im_start|>") is its id."""
        if not isinstance(text, str):
            raise UserError(f"prompt: expected text, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included; ids the tokenizer does not know add nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        """The id of a token written as its vocabulary text (or an added token's content), if any."""
        return self._backend.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, as transformers' apply_chat_template(tokenize=False)."""
        return chat_template.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, where=f"{self.where}: chat template")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def _read_optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, missing="") if path.is_file() else {}


def _read_backend(directory: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    path = directory / TOKENIZER_FILE
    if path.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the library raises plain Exception for a bad file)
            raise UserError(f"{path}: not a tokenizer file the tokenizers library reads "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    vocab = read_json_object(directory / VOCAB_FILE, missing=f"{directory / VOCAB_FILE}: missing")
    if not all(isinstance(i, int) for i in vocab.values()):
        raise UserError(f"{directory / VOCAB_FILE}: must map token text to integer ids")
    spec = qwen_vocab.byte_level_bpe(vocab, _read_merges(directory / MERGES_FILE), _added_tokens(directory, config))
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{directory / VOCAB_FILE}: the tokenizers library refuses these files ({e})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: one "left right" pair a line, after an optional "#version" line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise UserError(f"{path}: line {number} is not 'left right' ({line[:40]!r})")
        merges.append((pair[0], pair[1]))
    return merges


def _added_tokens(directory: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """tokenizer_config.json's added_tokens_decoder ({"151643": {"content": ..., "special": ...}})."""
    where = f"{directory / CONFIG_FILE}: field 'added_tokens_decoder'"
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise UserError(f"{where} must be an object")
    tokens = []
    for key, record in decoder.items():
        if not (key.isdigit() and isinstance(record, dict) and isinstance(record.get("content"), str)):
            raise UserError(f"{where}: entry {key!r} needs an integer id and a 'content' string")
        token = qwen_vocab.added_token(record["content"], int(key), bool(record.get("special", False)))
        tokens.append(token | {k: bool(record[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                               if k in record})
    return sorted(tokens, key=lambda t: t["id"])


def _chat_template(directory: Path, config: dict[str, Any]) -> str:
    """chat_template.jinja, else the config's chat_template (a string, or a list of {name, template}
    whose "default" is used), else Qwen's ChatML."""
    template_file = directory / TEMPLATE_FILE
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{template_file}: unreadable ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return qwen_vocab.CHATML_TEMPLATE
    if not isinstance(template, str):
        raise UserError(f"{directory / CONFIG_FILE}: field 'chat_template' must be a string or a list of "
                        f"{{'name', 'template'}} with a 'default'")
    return template


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The named special tokens set in tokenizer_config.json (a string, or an AddedToken record)."""
    named = {}
    for name in chat_template.SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            named[name] = value
    return named


def _eos_token_ids(directory: Path, backend: tokenizers.Tokenizer) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list), else <|im_end|> and <|endoftext|>."""
    path = directory / GENERATION_CONFIG_FILE
    eos = _read_optional_json(path).get("eos_token_id")
    if eos is None:
        ids = [backend.token_to_id(text) for text in DEFAULT_EOS_TOKENS]
        return [i for i in ids if i is not None]
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise UserError(f"{path}: field 'eos_token_id' must be a token id or a list of them")
    return eos

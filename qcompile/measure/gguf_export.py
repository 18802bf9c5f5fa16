"""An HF Qwen2 checkpoint (config.json + safetensors) as a float32 GGUF file, the model format llama.cpp
reads, so `bench --vs llama.cpp` runs llama.cpp on the very weights the other engines run.

Names and keys are the ones llama.cpp's own converter (`convert_hf_to_gguf.py`, class Qwen2Model) writes,
taken from the `gguf` package's constants (the package is the tree's `gguf-py`, published on PyPI):
`token_embd`, `blk.N.attn_{norm,q,k,v,output}` (q/k/v with biases), `blk.N.ffn_{norm,gate,up,down}`,
`output_norm`, and `output` when the embeddings are untied. Tensors are written as HF stores them: a
numpy `[out, in]` weight becomes GGUF dims `{in, out}` (GGUF lists dims fastest-first, the reverse of
numpy), which is llama.cpp's `{n_embd, n_out}`. Qwen2's rotary embedding is the NeoX form in both HF and
llama.cpp's qwen2 graph, so q/k are not permuted (the converter permutes only for LLaMA-style RoPE).

The weights are random, but llama.cpp needs a real tokenizer to load a model: the `tokenizer.*` keys are
copied from a vocab-only GGUF (llama.cpp ships `models/ggml-vocab-qwen2.gguf`, Qwen2's tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import UserError
from ..run.weights import tensor_files
from ..spec.model import ModelSpec

ARCH = "qwen2"
TOKENIZER_PREFIX = "tokenizer."


def gguf_module():
    """The `gguf` package (the optional `bench` extra), or a one-line error saying how to get it."""
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        raise UserError("writing a GGUF needs the 'gguf' package: pip install 'qcompile[bench]'") from None
    return gguf


def tensor_names(spec: ModelSpec) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor the GGUF holds, in llama.cpp's order."""
    if spec.family.name != ARCH:
        raise UserError(f"{spec.name}: llama.cpp comparison supports the qwen2 family only, "
                        f"not '{spec.family.name}'")
    cfg = spec.config
    if cfg.resolved_head_dim * cfg.num_attention_heads != cfg.hidden_size:
        # llama.cpp's qwen2 graph makes wq {n_embd, n_embd}: no key_length of its own
        raise UserError(f"{spec.name}: llama.cpp's qwen2 needs head_dim x num_attention_heads == hidden_size, "
                        f"here {cfg.resolved_head_dim} x {cfg.num_attention_heads} != {cfg.hidden_size}")
    g = gguf_module()
    t, names = g.MODEL_TENSOR, g.TENSOR_NAMES
    out = {"model.embed_tokens.weight": f"{names[t.TOKEN_EMBD]}.weight"}
    per_layer = [("input_layernorm.weight", t.ATTN_NORM, "weight")]
    for proj, kind in (("q", t.ATTN_Q), ("k", t.ATTN_K), ("v", t.ATTN_V)):
        per_layer += [(f"self_attn.{proj}_proj.weight", kind, "weight"),
                      (f"self_attn.{proj}_proj.bias", kind, "bias")]
    per_layer += [("self_attn.o_proj.weight", t.ATTN_OUT, "weight"),
                  ("post_attention_layernorm.weight", t.FFN_NORM, "weight"),
                  ("mlp.gate_proj.weight", t.FFN_GATE, "weight"),
                  ("mlp.up_proj.weight", t.FFN_UP, "weight"),
                  ("mlp.down_proj.weight", t.FFN_DOWN, "weight")]
    for i in range(cfg.num_hidden_layers):
        for hf, kind, suffix in per_layer:
            out[f"model.layers.{i}.{hf}"] = f"{names[kind].format(bid=i)}.{suffix}"
    out["model.norm.weight"] = f"{names[t.OUTPUT_NORM]}.weight"
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reuses token_embd for the LM head
        out["lm_head.weight"] = f"{names[t.OUTPUT]}.weight"
    return out


def tokenizer_fields(vocab: Path, vocab_size: int, where: str) -> list[tuple[str, Any, Any, Any]]:
    """The `tokenizer.*` keys of the vocab-only GGUF `vocab` as (key, value, type, array item type),
    padded to `vocab_size` tokens as llama.cpp's converter pads (`[PADi]`, type UNUSED)."""
    g = gguf_module()
    try:
        reader = g.GGUFReader(vocab)
    except (OSError, ValueError) as e:
        raise UserError(f"{vocab}: not a readable GGUF file ({e})") from None
    fields = []
    for key, field in reader.fields.items():
        if key.startswith(TOKENIZER_PREFIX):
            item = field.types[-1] if field.types[0] == g.GGUFValueType.ARRAY else None
            fields.append([key, field.contents(), field.types[0], item])
    values = {f[0]: f[1] for f in fields}
    tokens = values.get(g.Keys.Tokenizer.LIST)
    if tokens is None:
        raise UserError(f"{vocab}: no {g.Keys.Tokenizer.LIST} (not a vocab GGUF)")
    if vocab_size < len(tokens):
        raise UserError(f"{where}: vocab_size {vocab_size} is smaller than the tokenizer's {len(tokens)} tokens "
                        f"({vocab.name}); llama.cpp needs one embedding row per token")
    pad = range(len(tokens), vocab_size)
    padding = {g.Keys.Tokenizer.LIST: [f"[PAD{i}]" for i in pad],
               g.Keys.Tokenizer.TOKEN_TYPE: [int(g.TokenType.UNUSED)] * len(pad),
               g.Keys.Tokenizer.SCORES: [0.0] * len(pad)}
    for f in fields:
        if f[0] in padding:
            f[1] = list(f[1]) + padding[f[0]]
    return [tuple(f) for f in fields]


def _check_shapes(spec: ModelSpec, checkpoint: Path, names: dict[str, str]) -> dict[str, Path]:
    """Each tensor's file, after checking every tensor is there with its HF shape (read from the
    safetensors headers only)."""
    from safetensors import safe_open  # noqa: PLC0415

    files = tensor_files(checkpoint)
    expected = spec.family.hf_tensors(spec.config)
    for name in names:
        if name not in files:
            raise UserError(f"{checkpoint}: tensor '{name}' is missing")
        with safe_open(files[name], framework="numpy") as f:
            shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(expected[name]):
            raise UserError(f"{checkpoint}: tensor '{name}' has shape {list(shape)}, "
                            f"expected {list(expected[name])}")
    return files


def _tensors(names: dict[str, str], files: dict[str, Path]) -> Iterator[np.ndarray]:
    """The tensors as float32, one at a time. Each file is opened per tensor: a mapping held across
    tensors would keep every tensor read so far resident."""
    from safetensors import safe_open  # noqa: PLC0415

    for name in names:
        with safe_open(files[name], framework="numpy") as f:
            yield np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)


def write_gguf(spec: ModelSpec, checkpoint: Path, out: Path, *, vocab: Path | None,
               log: Callable[[str], None] = print) -> None:
    """Write `checkpoint` (HF Qwen2) as the float32 GGUF `out`, atomically. `vocab`: a vocab-only GGUF
    whose tokenizer keys are copied (None writes no tokenizer: llama.cpp will not load such a file; the
    tests use it to check tensors)."""
    g = gguf_module()
    cfg = spec.config
    names = tensor_names(spec)
    files = _check_shapes(spec, checkpoint, names)
    expected = spec.family.hf_tensors(cfg)
    tokenizer = tokenizer_fields(vocab, cfg.vocab_size, spec.name) if vocab is not None else []
    writer = g.GGUFWriter(None, ARCH)
    writer.add_name(Path(spec.name).name)
    writer.add_file_type(int(g.LlamaFileType.ALL_F32))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, value, vtype, item in tokenizer:
        writer.add_key_value(key, value, vtype, sub_type=item)
    for hf, name in names.items():  # header first: the data then streams tensor by tensor
        shape = tuple(expected[hf])
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, tensor in enumerate(_tensors(names, files)):
                writer.write_tensor_data(tensor)
                if (i + 1) % 50 == 0:
                    log(f"  {i + 1}/{len(names)} tensors")
            writer.close()
    finally:
        writer.close()

"""Full-size zoo models compile for the CPU with symbolic weights (the library holds no weights), and the
manifest's parameter count matches the architecture's formula."""

from __future__ import annotations

import pytest

import qcompile
from qcompile.spec.model import resolve_model


def qwen2_parameter_formula(c) -> int:
    """Embedding + per layer (q/k/v with bias, o without, SwiGLU, two norms) + final norm + untied head."""
    hidden, ffn, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    head_dim = c.head_dim or hidden // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    attention = (hidden * q + q) + 2 * (hidden * kv + kv) + q * hidden
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden + (0 if c.tie_word_embeddings else vocab * hidden)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen-72b", "qwen2-7b-sw"])
def test_full_size_model_compiles_with_symbolic_weights(model, tmp_path):
    manifest = qcompile.compile_model(model, out=tmp_path / model, log=lambda _m: None)
    config = resolve_model(model).config
    assert manifest["parameter_count"] == qwen2_parameter_formula(config)
    library_bytes = (tmp_path / model / "model.so").stat().st_size
    assert library_bytes < 50e6  # code only: the weights (>= 28 GB in float32) are not in it
    assert manifest["max_seq_len"] == config.max_position_embeddings


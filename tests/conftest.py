"""Shared fixtures: tiny HF checkpoints written by transformers itself, and libraries compiled once per
session (a tiny model compiles in ~2 s on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import qcompile  # noqa: E402
from qcompile.spec import target as targets  # noqa: E402

# Float32 logits must agree with transformers to this fraction of the logit scale (from targets/cpu.yaml).
CPU_TOLERANCE = targets.load_target("cpu").tolerance["float32"]["max_rel_diff"]

TINY_QWEN2 = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TINY_QWEN3_MOE = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def hf_classes(family: str):
    import transformers

    return {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, TINY_QWEN2),
            "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, TINY_QWEN3_MOE)}[family]


def write_hf_checkpoint(directory: Path, *, family: str = "qwen2", seed: int = 0, std: float = 0.15,
                        dtype=None, **fields) -> Path:
    """A random HF causal LM of `family` saved by transformers' own save_pretrained (config.json as HF
    writes it), over the family's tiny base config.

    Every weight and bias is N(0, std) and norm weights 1 + N(0, std): HF's default init (std 0.02, zero
    biases, unit norms) would leave the biases and norms untested and makes greedy output degenerate.
    """
    import torch

    config_class, model_class, base = hf_classes(family)
    torch.manual_seed(seed)
    model = model_class(config_class(**{**base, **fields}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, std)
            if "norm" in name:
                param.add_(1.0)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    return directory


class Libraries:
    """Compile-once cache: (model, options) -> library directory."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def get(self, model: str | Path, **options) -> Path:
        key = (str(model), tuple(sorted(options.items())))
        if key not in self.built:
            out = self.root / f"lib{len(self.built)}"
            qcompile.compile_model(model, out=out, log=lambda _m: None, **options)
            self.built[key] = out
        return self.built[key]


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> Libraries:
    return Libraries(tmp_path_factory.mktemp("libraries"))


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory) -> Path:
    """Random weights for the zoo's qwen2-debug, written by `qcompile init-weights`."""
    return qcompile.init_weights("qwen2-debug", out=tmp_path_factory.mktemp("ckpt") / "qwen2-debug")


@pytest.fixture(scope="session")
def debug_library(libraries) -> Path:
    return libraries.get("qwen2-debug", max_seq_len=64)


# A tiny qwen2 with Qwen's real vocabulary (151,936 rows, tied LM head): text in, text out.
TEXT_QWEN2 = dict(TINY_QWEN2, vocab_size=151936, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory) -> Path:
    """Random weights for TEXT_QWEN2 written by `qcompile init-weights`, which adds Qwen's tokenizer
    files (tokenizer.json, tokenizer_config.json, generation_config.json)."""
    import transformers

    model_dir = tmp_path_factory.mktemp("text-model")
    transformers.Qwen2Config(**TEXT_QWEN2).save_pretrained(model_dir)  # config.json: a MODEL
    return qcompile.init_weights(model_dir, out=tmp_path_factory.mktemp("text-ckpt") / "ckpt")


@pytest.fixture(scope="session")
def text_library(libraries, text_checkpoint) -> Path:
    """TEXT_QWEN2 compiled for the CPU, context 256 tokens."""
    return libraries.get(text_checkpoint, max_seq_len=256)


# Largest relative logit difference seen per test (the worst case of each comparison), for the summary.
MEASURED: dict[str, float] = {}


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| as a fraction of the reference's logit scale (max |ref|); recorded per test."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::", 1)[-1]
    MEASURED[test] = max(diff, MEASURED.get(test, 0.0))
    return diff


def pytest_terminal_summary(terminalreporter):
    """Print the measured logit differences vs transformers, so every run shows the figures."""
    if MEASURED:
        terminalreporter.section("max |logit diff| / logit scale vs transformers (float32, cpu)")
        for test, diff in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{diff:9.2e}  {test}")

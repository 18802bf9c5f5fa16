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


def random_vision_model(model_name: str, config_name: str, *, seed: int, std: float = 0.2, **fields):
    """transformers' `model_name` (ViTModel, CLIPVisionModel) built from `config_name(**fields)`, in eval
    mode, every weight and bias N(0, std) and norm weights 1 + N(0, std) (as write_hf_checkpoint, for the
    same reason)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(0.0, std)
            if "norm" in name:
                param.add_(1.0)
    return hf


def assert_decoder_matches(ours, hf, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """A loaded decoder vs the transformers model `hf`: the prompt's logits, `new_tokens` greedy tokens
    (identical, and not degenerate) and every decode step's logits, within the float32 tier. Returns
    the generated ids."""
    from qcompile.measure import reference

    assert max_rel_diff(ours.prefill(prompt), reference.logits(hf, prompt)) <= CPU_TOLERANCE
    new = ours.generate(prompt, new_tokens)
    np.testing.assert_array_equal(new, reference.greedy_generate(hf, prompt, new_tokens).new_ids)
    assert len(set(new.tolist())) > 2, "degenerate generation proves little"
    # the logits that chose new token i are the reference's at position len(prompt) - 1 + i
    steps = reference.logits(hf, np.concatenate([prompt, new]))[len(prompt) - 1:-1]
    assert max_rel_diff(ours.last_step_logits, steps) <= CPU_TOLERANCE
    return new


class Libraries:
    """Compile-once cache: build identity -> library directory.

    The key is the registry's (`BuildPlan.identity()`: config, target, options, toolchain; everything that
    decides the library's bytes), so checkpoints that differ only in their weights share one library, as
    the registry would share it. A zoo model also keys on its name: its manifest names it."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def get(self, model: str | Path, **options) -> Path:
        key = build_key(model, **options)
        if key not in self.built:
            out = self.root / f"lib{len(self.built)}"
            qcompile.compile_model(model, out=out, log=lambda _m: None, **options)
            self.built[key] = out
        return self.built[key]


def build_key(model: str | Path, *, target: str = targets.DEFAULT_TARGET, schedules: Path | None = None,
              **options) -> tuple[str | None, str]:
    """(zoo model name or None for a checkpoint directory, sha256 of the build identity)."""
    from qcompile.build.plan import plan_build
    from qcompile.registry import key_of
    from qcompile.spec.model import resolve_model

    plan = plan_build(resolve_model(model), targets.load_target(target), schedules=schedules, **options)
    return (None if Path(model).is_dir() else str(model)), key_of(plan.identity())


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

"""Compiled qwen2 libraries vs transformers.Qwen2ForCausalLM: logits and greedy tokens, float32, CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qcompile
from qcompile.measure import reference

from .conftest import CPU_TOLERANCE, max_rel_diff, write_hf_checkpoint

# Each case is an HF config delta over conftest.TINY_QWEN2; windows are shorter than the test sequences.
CASES = {
    "gqa-untied": {},
    "mha-tied-rope1e6": dict(num_key_value_heads=4, tie_word_embeddings=True,
                             rope_parameters={"rope_theta": 1e6, "rope_type": "default"}),
    "mqa-head-dim-32": dict(num_key_value_heads=1, head_dim=32),  # q width 128 != hidden 64
    "sliding-derived": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
                            max_window_layers=1),  # layers 1, 2 slide
    "sliding-layer-types": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                tie_word_embeddings=True,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
PROMPT_LONG = np.random.default_rng(7).integers(0, 200, 20)  # longer than every window
PROMPT_SHORT = np.array([5, 17, 99, 3])  # decode then crosses the window edge


class Case:
    """A checkpoint written by transformers, the library compiled from that directory, both loaded."""

    def __init__(self, name, root, libraries):
        self.checkpoint = write_hf_checkpoint(root / name, seed=len(name), **CASES[name])
        self.library = libraries.get(self.checkpoint, max_seq_len=64)
        self.ours = qcompile.load(self.library, weights=self.checkpoint)
        self.hf = reference.load_causal_lm(self.checkpoint)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, libraries) -> Case:
    return Case(request.param, tmp_path_factory.mktemp("hf"), libraries)


def test_hf_derives_the_layer_kinds_we_build(case):
    ours = [("sliding_attention" if w else "full_attention") for w in case.ours.spec.config.layer_windows()]
    assert ours == case.hf.config.layer_types


def test_prefill_logits_match(case):
    ours = case.ours.prefill(PROMPT_LONG)
    assert max_rel_diff(ours, reference.logits(case.hf, PROMPT_LONG)) <= CPU_TOLERANCE


def test_chunked_prefill_matches(case):
    case.ours.prefill_chunk = 3  # chunks shorter than the windows, and many of them
    try:
        ours = case.ours.prefill(PROMPT_LONG)
    finally:
        case.ours.prefill_chunk = case.ours.manifest["prefill_chunk"]
    assert max_rel_diff(ours, reference.logits(case.hf, PROMPT_LONG)) <= CPU_TOLERANCE


@pytest.mark.parametrize("prompt,new_tokens", [(PROMPT_SHORT, 12), (PROMPT_LONG, 8)],
                         ids=["short-prompt-decode-crosses-window", "long-prompt"])
def test_greedy_tokens_and_decode_logits_match(case, prompt, new_tokens):
    new = case.ours.generate(prompt, new_tokens)
    expected = reference.greedy_generate(case.hf, prompt, new_tokens).new_ids
    np.testing.assert_array_equal(new, expected)
    assert len(set(new.tolist())) > 2, "degenerate generation proves little: raise the weight std"
    # The logits that chose each token (decode steps) vs HF's over the whole sequence at those positions.
    ref = reference.logits(case.hf, np.concatenate([prompt, new]))[len(prompt) - 1:-1]
    assert max_rel_diff(case.ours.last_step_logits, ref) <= CPU_TOLERANCE


def test_sliding_build_differs_from_full_after_the_window(tmp_path, libraries):
    """Same weights, use_sliding_window on vs off: equal before position W, different after."""
    window = 6  # CASES["sliding-derived"]'s config (layers 1, 2 slide): its library is reused
    sliding = write_hf_checkpoint(tmp_path / "sliding", seed=3, num_hidden_layers=3,
                                  use_sliding_window=True, sliding_window=window, max_window_layers=1)
    full = tmp_path / "full"
    shutil.copytree(sliding, full)
    config = json.loads((full / "config.json").read_text())
    config["use_sliding_window"] = False
    del config["layer_types"]  # HF wrote the derived kinds; its full model would crash on them
    (full / "config.json").write_text(json.dumps(config))

    logits = {}
    for name, ckpt in (("sliding", sliding), ("full", full)):
        model = qcompile.load(libraries.get(ckpt, max_seq_len=64), weights=ckpt)
        logits[name] = model.prefill(PROMPT_LONG)
        assert max_rel_diff(logits[name], reference.logits(reference.load_causal_lm(ckpt), PROMPT_LONG)) \
            <= CPU_TOLERANCE
    before = np.abs(logits["sliding"][:window] - logits["full"][:window]).max()
    after = np.abs(logits["sliding"][window:] - logits["full"][window:]).max(axis=-1)
    assert before <= CPU_TOLERANCE * np.abs(logits["full"]).max()
    assert (after > 1e-2).all(), after  # every position past the window sees fewer keys


@pytest.mark.parametrize("model", ["qwen2-debug", "qwen2-sw-debug"])
def test_zoo_debug_models_match(model, tmp_path, libraries):
    """Zoo models with checkpoints from `init-weights`: transformers reads our config.json and weights."""
    ckpt = qcompile.init_weights(model, out=tmp_path / model, seed=1)
    ours = qcompile.load(libraries.get(model, max_seq_len=64), weights=ckpt)
    hf = reference.load_causal_lm(ckpt)
    new = ours.generate(PROMPT_LONG, 10)
    np.testing.assert_array_equal(new, reference.greedy_generate(hf, PROMPT_LONG, 10).new_ids)
    assert max_rel_diff(ours.last_prompt_logits, reference.logits(hf, PROMPT_LONG)) <= CPU_TOLERANCE

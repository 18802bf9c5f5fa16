"""Qwen3-MoE vs transformers.Qwen3MoeForCausalLM: whole models (logits and greedy tokens), checkpoints in
both expert layouts, and the full-size compile. The router and the sparse block alone: test_blocks.py."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qcompile
from qcompile.data import package_data
from qcompile.measure import reference
from qcompile.errors import UserError
from qcompile.spec.model import resolve_model

from .conftest import assert_decoder_matches, write_hf_checkpoint


# Config deltas over conftest.TINY_QWEN3_MOE (3 layers, 8 experts, top-2). Each feature appears in one case
# and each case compiles a library (~10 s), so unrelated features share a case. "topk2-no-norm" is the base
# config: its library is shared with the expert-layout tests below (conftest.Libraries keys on the config).
CASES = {
    "topk2-no-norm": dict(norm_topk_prob=False),
    "top1-mlp-only-layer-1": dict(num_experts_per_tok=1, norm_topk_prob=False, mlp_only_layers=[1]),  # 0, 2 sparse
    "tied-topk3-sparse-step-2": dict(tie_word_embeddings=True, num_experts_per_tok=3, decoder_sparse_step=2,
                                     norm_topk_prob=True),  # layer 1 sparse only
    "topk2-norm-bias-sliding-window": dict(attention_bias=True, use_sliding_window=True, sliding_window=5,
                                           norm_topk_prob=True),  # every layer slides; prompt > window
}
PROMPT = np.random.default_rng(11).integers(0, 200, 18)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, libraries):
    # std 0.25: at 0.15 some of these tiny MoEs repeat one token under greedy decoding
    ckpt = write_hf_checkpoint(tmp_path_factory.mktemp("moe") / request.param, family="qwen3_moe",
                               seed=len(request.param), std=0.25, **CASES[request.param])
    ours = qcompile.load(libraries.get(ckpt, max_seq_len=64), weights=ckpt)
    return ours, reference.load_causal_lm(ckpt)


def test_layer_kinds_follow_hf(case):
    ours, hf = case
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    expected = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf.model.layers]
    assert ours.spec.config.sparse_layers() == expected


def test_logits_and_greedy_tokens_match(case):
    ours, hf = case
    assert_decoder_matches(ours, hf, PROMPT, 10)


def _fuse_experts(src, dst, num_experts):
    """Rewrite a checkpoint with transformers' in-memory expert layout (gate_up_proj, down_proj)."""
    tensors = load_file(src / "model.safetensors")
    layers = {k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k}
    for p in layers:
        e = [f"{p}.mlp.experts.{i}" for i in range(num_experts)]
        tensors[f"{p}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate(
            [tensors.pop(f"{x}.gate_proj.weight"), tensors.pop(f"{x}.up_proj.weight")]) for x in e])
        tensors[f"{p}.mlp.experts.down_proj"] = np.stack([tensors.pop(f"{x}.down_proj.weight") for x in e])
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_fused_expert_checkpoint_loads_the_same(tmp_path, libraries):
    per_expert = write_hf_checkpoint(tmp_path / "per-expert", family="qwen3_moe", seed=4)
    fused = _fuse_experts(per_expert, tmp_path / "fused", num_experts=8)
    library = libraries.get(per_expert, max_seq_len=64)
    a = qcompile.load(library, weights=per_expert).prefill(PROMPT)
    b = qcompile.load(library, weights=fused).prefill(PROMPT)
    np.testing.assert_array_equal(a, b)


def test_missing_expert_tensor_is_named(tmp_path, libraries):
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", family="qwen3_moe", seed=5)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.6.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="missing tensor 'model.layers.1.mlp.experts.6.up_proj.weight'"):
        qcompile.load(libraries.get(ckpt, max_seq_len=64), weights=ckpt)


def test_zoo_debug_model_with_init_weights(tmp_path, libraries):
    ckpt = qcompile.init_weights("qwen3-moe-debug", out=tmp_path / "ck", seed=2)
    ours = qcompile.load(libraries.get("qwen3-moe-debug", max_seq_len=64), weights=ckpt)
    hf = reference.load_causal_lm(ckpt)  # transformers reads our config.json (num_local_experts)
    np.testing.assert_array_equal(ours.generate(PROMPT, 8), reference.greedy_generate(hf, PROMPT, 8).new_ids)


def moe_parameter_formula(c) -> tuple[int, int]:
    """(total, active) parameters of a Qwen3-MoE config, from the architecture."""
    hidden, hd = c.hidden_size, c.head_dim
    attention = hidden * hd * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) + 2 * hd
    expert = 3 * hidden * c.moe_intermediate_size
    sparse = sum(c.sparse_layers())
    dense = c.num_hidden_layers - sparse
    total = (c.vocab_size * hidden * (1 if c.tie_word_embeddings else 2) + hidden
             + c.num_hidden_layers * (attention + 2 * hidden) + dense * 3 * hidden * c.intermediate_size
             + sparse * (c.num_experts * hidden + c.num_experts * expert))
    return total, total - sparse * (c.num_experts - c.num_experts_per_tok) * expert


@pytest.mark.slow
def test_qwen3_30b_a3b_compiles_with_symbolic_weights(tmp_path):
    manifest = qcompile.compile_model("qwen3-30b-a3b", out=tmp_path / "lib", log=lambda _m: None)
    total, active = moe_parameter_formula(resolve_model("qwen3-30b-a3b").config)
    assert (manifest["parameter_count"], manifest["active_parameter_count"]) == (total, active)
    assert 30.4e9 < total < 30.6e9 and 3.2e9 < active < 3.4e9  # "30.5B total, 3.3B active"
    assert (tmp_path / "lib" / "model.so").stat().st_size < 50e6  # code only


@pytest.mark.parametrize("delta,needle", [
    (dict(num_experts_per_tok=9), "field 'num_experts_per_tok' (9) must be <= num_experts (8)"),
    (dict(mlp_only_layers=[3]), "field 'mlp_only_layers' has layer 3, outside 0..2"),
    (dict(decoder_sparse_step=0), "field 'decoder_sparse_step' must be positive"),
    (dict(moe_intermediate_size=-4), "field 'moe_intermediate_size' must be positive"),
    (dict(norm_topk_prob="yes"), "field 'norm_topk_prob' must be bool"),
])
def test_bad_moe_fields_are_named(tmp_path, delta, needle):
    import yaml

    entry = {"family": "qwen3_moe", "vocab_size": 64, "num_hidden_layers": 3, "num_experts": 8, **delta}
    families = yaml.safe_load(open(package_data() / "zoo.yaml"))["families"]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"families": families, "models": {"m": entry}}))
    from qcompile.spec.model import load_zoo

    with pytest.raises(UserError) as info:
        load_zoo(tmp_path / "zoo.yaml")
    assert str(info.value).startswith("zoo.yaml: model 'm': ") and needle in str(info.value)


def test_expert_count_spellings(tmp_path):
    """config.json may spell the expert count num_local_experts (transformers 5.x) or num_experts."""
    from qcompile.spec.model import load_checkpoint_config

    ckpt = write_hf_checkpoint(tmp_path / "a", family="qwen3_moe", num_experts=6, num_experts_per_tok=2)
    assert '"num_local_experts": 6' in (ckpt / "config.json").read_text()
    assert load_checkpoint_config(ckpt).config.num_experts == 6
    text = (ckpt / "config.json").read_text().replace('"num_local_experts"', '"num_experts"')
    (ckpt / "config.json").write_text(text)
    assert load_checkpoint_config(ckpt).config.num_experts == 6

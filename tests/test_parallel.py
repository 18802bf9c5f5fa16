"""Tensor parallelism: the families' plans applied (per-shard config, weight slices, divisibility errors),
and sharded libraries run as Disco workers (torch's gloo as the CPU all-reduce) against the unsharded
library and transformers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import qcompile
from qcompile.errors import UserError
from qcompile.measure import reference
from qcompile.parallel.shards import TensorParallel
from qcompile.run.weights import load_parameters
from qcompile.spec.model import resolve_model

from .conftest import CPU_TOLERANCE, max_rel_diff, write_hf_checkpoint

PROMPT = np.random.default_rng(5).integers(0, 200, 20)  # longer than qwen2-sw-debug's 8-token window
NEW_TOKENS = 8


def test_plan_decides_the_shard_config():
    spec = resolve_model("qwen3-moe-debug")
    tp = TensorParallel.for_model(spec, 2)
    assert tp.divided_fields() == ["num_key_value_heads", "num_attention_heads", "intermediate_size",
                                   "moe_intermediate_size"]
    shard = tp.shard_config(spec.config)
    c = spec.config
    assert (shard.num_attention_heads, shard.num_key_value_heads) == (c.num_attention_heads // 2,
                                                                      c.num_key_value_heads // 2)
    assert (shard.intermediate_size, shard.moe_intermediate_size) == (c.intermediate_size // 2,
                                                                      c.moe_intermediate_size // 2)
    assert shard.resolved_head_dim == c.resolved_head_dim and shard.num_experts == c.num_experts


def test_tensor_slices_follow_the_plan():
    tp = TensorParallel.for_model(resolve_model("qwen3-moe-debug"), 2)
    attn, expert = "model.layers.1.self_attn", "model.layers.0.mlp.experts.5"
    assert tp.tensor_slice(f"{attn}.q_proj.weight", (128, 64), 1).region == (slice(64, 128), slice(None))
    assert tp.tensor_slice(f"{attn}.o_proj.weight", (64, 128), 1).region == (slice(None), slice(64, 128))
    assert tp.tensor_slice(f"{expert}.down_proj.weight", (64, 32), 0).region == (slice(None), slice(0, 16))
    assert tp.tensor_slice(f"{expert}.up_proj.weight", (32, 64), 1).region == (slice(16, 32), slice(None))
    # a row-parallel bias is added once: by shard 0
    assert not tp.tensor_slice(f"{attn}.o_proj.bias", (64,), 0).zero
    assert tp.tensor_slice(f"{attn}.o_proj.bias", (64,), 1).zero
    for replicated in ("model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "lm_head.weight",
                       f"{attn}.q_norm.weight"):
        assert tp.tensor_slice(replicated, (8, 4), 1).region == (slice(None), slice(None))


def test_indivisible_fields_are_named():
    spec = resolve_model("qwen3-moe-debug")
    with pytest.raises(UserError, match="field 'num_key_value_heads' \\(2\\) is not divisible by --tensor-parallel 4"):
        TensorParallel.for_model(spec, 4)
    odd_ffn = dataclasses.replace(spec, config=dataclasses.replace(spec.config, moe_intermediate_size=31))
    with pytest.raises(UserError, match="field 'moe_intermediate_size' \\(31\\) is not divisible"):
        TensorParallel.for_model(odd_ffn, 2)
    with pytest.raises(UserError, match="applies to decoders; vit-debug is an encoder"):
        TensorParallel.for_model(resolve_model("vit-debug"), 2)


def test_shards_read_their_slices_of_the_fused_projections(tmp_path):
    """Each shard's qkv_proj is [its q heads, its kv heads (k), (v)]; its o_proj its columns of o."""
    spec = resolve_model("qwen2-debug")
    ckpt = qcompile.init_weights("qwen2-debug", out=tmp_path / "ckpt")
    tp = TensorParallel.for_model(spec, 2)
    c, shard = spec.config, tp.shard_config(spec.config)
    hd = c.resolved_head_dim
    names = ["model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.self_attn.o_proj.weight"]

    def params(cfg):
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        return [(names[0], [q + 2 * kv, c.hidden_size], "float32"), (names[1], [c.hidden_size, q], "float32")]

    whole = list(load_parameters(spec, ckpt, params(c)))
    parts = [list(load_parameters(spec, ckpt, params(shard), shard=lambda n, s, r=r: tp.tensor_slice(n, s, r)))
             for r in range(2)]
    q, kv = shard.num_attention_heads * hd, shard.num_key_value_heads * hd
    segments = [np.split(p[0], [q, q + kv]) for p in parts]  # each shard: its q, k, v rows
    rebuilt = np.concatenate([np.concatenate([s[i] for s in segments]) for i in range(3)])
    np.testing.assert_array_equal(rebuilt, whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=1), whole[1])


@pytest.fixture(scope="module", params=["qwen2-debug", "qwen2-sw-debug", "qwen3-moe-debug", "moe-bias"])
def split(request, tmp_path_factory, libraries):
    """(unsharded library, --tensor-parallel 2 library run as 2 Disco workers, transformers)."""
    root = tmp_path_factory.mktemp("tp")
    if request.param == "moe-bias":  # o_proj with a bias: row-parallel, added once (by shard 0)
        ckpt = write_hf_checkpoint(root / "ckpt", family="qwen3_moe", seed=3, std=0.25, attention_bias=True,
                                   norm_topk_prob=True)
        model = ckpt
    else:
        model, ckpt = request.param, qcompile.init_weights(request.param, out=root / "ckpt")
    whole = qcompile.load(libraries.get(model, max_seq_len=64), weights=ckpt)
    sharded = qcompile.load(libraries.get(model, max_seq_len=64, tensor_parallel=2), weights=ckpt)
    yield whole, sharded, reference.load_causal_lm(ckpt)
    sharded.close()


def test_tp2_matches_unsharded_and_transformers(split):
    whole, sharded, hf = split
    ours = sharded.prefill(PROMPT)
    assert max_rel_diff(ours, reference.logits(hf, PROMPT)) <= CPU_TOLERANCE
    assert max_rel_diff(ours, whole.prefill(PROMPT)) <= CPU_TOLERANCE
    new = sharded.generate(PROMPT, NEW_TOKENS)
    np.testing.assert_array_equal(new, whole.generate(PROMPT, NEW_TOKENS))
    np.testing.assert_array_equal(new, reference.greedy_generate(hf, PROMPT, NEW_TOKENS).new_ids)
    # the decode steps' logits too (each step's all-reduces over a growing per-shard cache)
    ref = reference.logits(hf, np.concatenate([PROMPT, new]))[len(PROMPT) - 1:-1]
    assert max_rel_diff(sharded.last_step_logits, ref) <= CPU_TOLERANCE


def test_manifest_records_the_split(libraries):
    manifest = json.loads((libraries.get("qwen2-debug", max_seq_len=64, tensor_parallel=2)
                           / "manifest.json").read_text())
    c = resolve_model("qwen2-debug").config
    assert manifest["parallel"]["tensor_parallel"] == 2
    assert manifest["parallel"]["plan"] == resolve_model("qwen2-debug").family.tensor_parallel_plan
    assert manifest["parallel"]["shard_config"] == {"num_key_value_heads": 1, "num_attention_heads": 2,
                                                    "intermediate_size": c.intermediate_size // 2}
    shapes = {p["name"]: p["shape"] for p in manifest["parameters"]}  # one shard's
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [c.hidden_size, c.hidden_size // 2]
    assert shapes["model.embed_tokens.weight"] == [c.vocab_size, c.hidden_size]  # replicated
    assert manifest["identity"]["parallel"] == manifest["parallel"]


def test_cli_runs_a_sharded_cpu_library(tmp_path, libraries):
    ckpt = qcompile.init_weights("qwen2-debug", out=tmp_path / "ckpt")
    library = libraries.get("qwen2-debug", max_seq_len=64, tensor_parallel=2)
    ids = " ".join(map(str, PROMPT[:6]))
    proc = subprocess.run([sys.executable, "-m", "qcompile", "run", str(library), "--weights", str(ckpt),
                           "--prompt-ids", ids, "--max-new-tokens", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    whole = qcompile.load(libraries.get("qwen2-debug", max_seq_len=64), weights=ckpt)
    assert json.loads(proc.stdout)["generated_ids"] == whole.generate(PROMPT[:6], 4).tolist()


def test_cli_names_the_field_that_does_not_divide(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompile", "compile", "qwen3-moe-debug", "--tensor-parallel",
                           "4", "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip().splitlines() == [
        "qcompile: error: qwen3-moe-debug: field 'num_key_value_heads' (2) is not divisible by --tensor-parallel 4"]


def test_cuda_sm90_shard_compiles_and_load_names_the_missing_collective(tmp_path, debug_checkpoint):
    out = tmp_path / "tp2-sm90"
    manifest = qcompile.compile_model("qwen2-debug", target="cuda-sm90", out=out, max_seq_len=64,
                                      tensor_parallel=2, log=lambda _m: None)
    assert manifest["parallel"]["tensor_parallel"] == 2 and manifest["target"]["device"] == "cuda"
    with pytest.raises(UserError, match="needs a TVM runtime built with NCCL .*build-tvm-runtime-nccl.sh"):
        qcompile.load(out, weights=debug_checkpoint)

"""Tensor parallelism: the families' plans applied (per-shard config, weight slices, divisibility errors),
and sharded libraries run as Disco workers (torch's gloo as the CPU all-reduce) against the unsharded
library and transformers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import qcompile
from qcompile.errors import UserError
from qcompile.measure import reference
from qcompile.parallel.shards import TensorParallel
from qcompile.parallel.stages import device_parameter_counts, partition
from qcompile.run import layouts
from qcompile.spec.model import ModelSpec
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
        return [(names[0], [q + 2 * kv, c.hidden_size], "float32", None), (names[1], [c.hidden_size, q], "float32", None)]

    whole = list(load_parameters(spec, ckpt, params(c)))
    parts = [list(load_parameters(spec, ckpt, params(shard), shard=lambda n, s, r=r: tp.tensor_slice(n, s, r)))
             for r in range(2)]
    q, kv = shard.num_attention_heads * hd, shard.num_key_value_heads * hd
    segments = [np.split(p[0], [q, q + kv]) for p in parts]  # each shard: its q, k, v rows
    rebuilt = np.concatenate([np.concatenate([s[i] for s in segments]) for i in range(3)])
    np.testing.assert_array_equal(rebuilt, whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=1), whole[1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per model: (checkpoint, transformers model, unsharded library loaded), made once."""
    made = {}

    def get(model: str, libraries):
        if model not in made:
            root = tmp_path_factory.mktemp("tp")
            if model == MOE_ALL:  # q/k/v/o with biases (o_proj's row-parallel: added once, by shard 0),
                # a tied LM head (the last stage holds the embedding too) and sliding windows
                source = ckpt = write_hf_checkpoint(root / "ckpt", family="qwen3_moe", seed=3, std=0.25,
                                                    attention_bias=True, norm_topk_prob=True,
                                                    tie_word_embeddings=True, use_sliding_window=True,
                                                    sliding_window=8)
            else:
                source, ckpt = model, qcompile.init_weights(model, out=root / "ckpt")
            made[model] = (source, ckpt, reference.load_causal_lm(ckpt),
                           qcompile.load(libraries.get(source, max_seq_len=64), weights=ckpt))
        return made[model]

    return get


# (model, tensor-parallel shards, pipeline stages): TP 2, PP 2 and TP 2 x PP 2 for each debug decoder (their
# 2 kv heads rule out TP 4), and TP 2 x PP 2 of MOE_ALL. Each case compiles a library and starts tp x pp worker
# processes (~30 s on 2 busy cores), so by default the suite runs the one that exercises every part at once:
# MOE_ALL's sliced experts, sharded q/k/v biases with GQA, the row-parallel o_proj bias, stages composed with
# the shards, a tied LM head and sliding windows across stages. qwen2's own plan runs sharded in
# test_cli_runs_a_sharded_cpu_library. QCOMPILE_ALL_SPLITS=1 runs all ten.
MOE_ALL = "moe-bias-tied-sliding"
SPLITS = [(m, tp, pp) for m in ("qwen2-debug", "qwen2-sw-debug", "qwen3-moe-debug")
          for tp, pp in ((2, 1), (1, 2), (2, 2))] + [(MOE_ALL, 2, 2)]
DEFAULT_SPLITS = {(MOE_ALL, 2, 2)}


@pytest.mark.parametrize("model,tp,pp", SPLITS, ids=[f"{m}-tp{tp}-pp{pp}" for m, tp, pp in SPLITS])
def test_split_library_matches_unsharded_and_transformers(model, tp, pp, checkpoints, libraries):
    """The split library, run as tp x pp Disco workers (gloo all-reduce), vs the unsharded library and
    transformers: prompt logits, greedy tokens and the decode steps' logits."""
    if (model, tp, pp) not in DEFAULT_SPLITS and not os.environ.get("QCOMPILE_ALL_SPLITS"):
        pytest.skip("one of the ten splits beyond the default one (QCOMPILE_ALL_SPLITS=1 runs it)")
    source, ckpt, hf, whole = checkpoints(model, libraries)
    split = qcompile.load(libraries.get(source, max_seq_len=64, tensor_parallel=tp, pipeline_stages=pp),
                          weights=ckpt)
    try:
        ours = split.prefill(PROMPT)
        assert max_rel_diff(ours, reference.logits(hf, PROMPT)) <= CPU_TOLERANCE
        assert max_rel_diff(ours, whole.prefill(PROMPT)) <= CPU_TOLERANCE
        new = split.generate(PROMPT, NEW_TOKENS)
    finally:
        split.close()
    np.testing.assert_array_equal(new, whole.generate(PROMPT, NEW_TOKENS))
    np.testing.assert_array_equal(new, reference.greedy_generate(hf, PROMPT, NEW_TOKENS).new_ids)
    ref = reference.logits(hf, np.concatenate([PROMPT, new]))[len(PROMPT) - 1:-1]
    assert max_rel_diff(split.last_step_logits, ref) <= CPU_TOLERANCE


def test_manifest_records_the_split(libraries):
    manifest = json.loads((libraries.get("qwen2-debug", max_seq_len=64, tensor_parallel=2, pipeline_stages=1)
                           / "manifest.json").read_text())
    c = resolve_model("qwen2-debug").config
    assert manifest["parallel"]["tensor_parallel"] == 2
    assert manifest["parallel"]["plan"] == resolve_model("qwen2-debug").family.tensor_parallel_plan
    assert manifest["parallel"]["shard_config"] == {"num_key_value_heads": 1, "num_attention_heads": 2,
                                                    "intermediate_size": c.intermediate_size // 2}
    # one shard's, in HF layout (float32 CPU builds store linear weights packed: `run.layouts`)
    shapes = {p["name"]: list(layouts.unpacked_shape(p["shape"], p.get("layout"))) for p in manifest["parameters"]}
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == [c.hidden_size, c.hidden_size // 2]
    assert shapes["model.embed_tokens.weight"] == [c.vocab_size, c.hidden_size]  # replicated
    assert manifest["identity"]["parallel"] == manifest["parallel"] and manifest["pipeline"] is None


def test_device_parameter_counts_match_the_built_shards(libraries):
    """The memory plan's hook counts what each device's library parameters hold."""
    for model, tp, pp in (("qwen2-debug", 2, 1), ("qwen2-sw-debug", 1, 2)):
        spec = resolve_model(model)
        split = TensorParallel.for_model(spec, tp) if tp > 1 else None
        counts = device_parameter_counts(spec, split, partition(spec, pp) if pp > 1 else None)
        manifest = json.loads((libraries.get(model, max_seq_len=64, tensor_parallel=tp, pipeline_stages=pp)
                               / "manifest.json").read_text())
        ranges = [s["parameter_range"] for s in (manifest["pipeline"] or {"stages": [
            {"parameter_range": [0, len(manifest["parameters"])]}]})["stages"]]
        assert counts == [sum(math.prod(p["shape"]) for p in manifest["parameters"][slice(*r)]) for r in ranges]


def test_manifest_records_the_stages(libraries):
    """qwen2-sw-debug (3 layers, tied LM head) in 2 stages: its own shared object and parameters each."""
    directory = libraries.get("qwen2-sw-debug", max_seq_len=64, tensor_parallel=1, pipeline_stages=2)
    manifest = json.loads((directory / "manifest.json").read_text())
    stages = manifest["pipeline"]["stages"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 3]]  # the embedding weighs as much as a layer
    assert [s["library"]["file"] for s in stages] == ["model.so", "model.stage1.so"]
    names = [p["name"] for p in manifest["parameters"]]
    first, last = (names[slice(*s["parameter_range"])] for s in stages)
    assert first[0] == "model.embed_tokens.weight" and "model.layers.1.mlp.down_proj.weight" in first
    assert "model.layers.2.mlp.down_proj.weight" in last and "model.norm.weight" in last
    assert "model.embed_tokens.weight" in last  # the tied LM head
    assert list(stages[1]["functions"]["prefill"]["inputs"]) == ["inputs", "position", "kv_cache", "packed_params"]
    config = ModelSpec.from_manifest(manifest).config  # every layer's buffers; each stage allocates its own
    assert manifest["kv_cache"]["layers"] == config.kv_cache_layout(64)
    assert stages[1]["functions"]["prefill"]["inputs"]["inputs"]["shape"] == ["n", 64]  # the hidden state


def test_bad_checkpoint_is_one_line_from_the_workers(tmp_path, libraries):
    from safetensors.numpy import load_file, save_file

    ckpt = qcompile.init_weights("qwen2-debug", out=tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(UserError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        qcompile.load(libraries.get("qwen2-debug", max_seq_len=64, tensor_parallel=2, pipeline_stages=1),
                      weights=ckpt)


def test_cli_runs_a_sharded_cpu_library(tmp_path, checkpoints, libraries):
    """qwen2-debug as two tensor-parallel shards through `qcompile run` (Disco workers, gloo all-reduce):
    qwen2's plan (fused qkv with bias, GQA) vs transformers and the unsharded library, prompt logits and
    greedy tokens."""
    _, ckpt, hf, whole = checkpoints("qwen2-debug", libraries)
    library = libraries.get("qwen2-debug", max_seq_len=64, tensor_parallel=2, pipeline_stages=1)
    proc = subprocess.run([sys.executable, "-m", "qcompile", "run", str(library), "--weights", str(ckpt),
                           "--prompt-ids", " ".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS),
                           "--logits-out", str(tmp_path / "logits.npy"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    logits = np.load(tmp_path / "logits.npy")
    assert max_rel_diff(logits, reference.logits(hf, PROMPT)) <= CPU_TOLERANCE
    assert max_rel_diff(logits, whole.prefill(PROMPT)) <= CPU_TOLERANCE
    generated = json.loads(proc.stdout)["generated_ids"]
    assert generated == whole.generate(PROMPT, NEW_TOKENS).tolist()
    assert generated == reference.greedy_generate(hf, PROMPT, NEW_TOKENS).new_ids.tolist()


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

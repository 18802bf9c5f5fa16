"""HF safetensors checkpoints -> library parameters: sharded, bf16, and errors that name the tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qcompile
from qcompile.measure import reference
from qcompile.errors import UserError

from .conftest import CPU_TOLERANCE, max_rel_diff, write_hf_checkpoint

PROMPT = np.array([1, 2, 3, 50, 60, 7, 8, 9])


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, debug_library):
    single = qcompile.init_weights("qwen2-debug", out=tmp_path / "single", seed=5)
    sharded = qcompile.init_weights("qwen2-debug", out=tmp_path / "sharded", seed=5, max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a = qcompile.load(debug_library, weights=single).prefill(PROMPT)
    b = qcompile.load(debug_library, weights=sharded).prefill(PROMPT)
    np.testing.assert_array_equal(a, b)
    hf = reference.load_causal_lm(sharded)  # transformers reads our sharded layout too
    assert max_rel_diff(b, reference.logits(hf, PROMPT)) <= CPU_TOLERANCE


def test_bfloat16_checkpoint_is_read(tmp_path, libraries):
    ckpt = write_hf_checkpoint(tmp_path / "bf16", seed=2, dtype=torch.bfloat16)
    ours = qcompile.load(libraries.get(ckpt, max_seq_len=64), weights=ckpt).prefill(PROMPT)
    hf = reference.load_causal_lm(ckpt)  # upcast to float32, as our loader does
    assert max_rel_diff(ours, reference.logits(hf, PROMPT)) <= CPU_TOLERANCE


def _edit_checkpoint(src, dst, edit):
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     "missing tensor 'model.layers.1.self_attn.k_proj.bias'"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
    (lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}),
     "tensor 'model.norm.weight' has shape [63], expected [64]"),
])
def test_bad_checkpoint_tensors_are_named(tmp_path, debug_checkpoint, debug_library, edit, needle):
    bad = _edit_checkpoint(debug_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(UserError) as info:
        qcompile.load(debug_library, weights=bad)
    assert needle in str(info.value)


def test_checkpoint_for_another_model_is_refused(tmp_path, debug_library):
    other = qcompile.init_weights("qwen2-sw-debug", out=tmp_path / "other")
    with pytest.raises(UserError, match="checkpoint's num_hidden_layers is 3, the library was built with 2"):
        qcompile.load(debug_library, weights=other)


def test_missing_checkpoint_and_missing_shard(tmp_path, debug_library):
    with pytest.raises(UserError, match="checkpoint directory not found|no config.json"):
        qcompile.load(debug_library, weights=tmp_path / "nowhere")
    sharded = qcompile.init_weights("qwen2-debug", out=tmp_path / "sharded", max_shard_bytes=40_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UserError, match="model-00002-.*missing"):
        qcompile.load(debug_library, weights=sharded)


def test_parameter_names_follow_the_weight_map(debug_library):
    names = [p["name"] for p in json.loads((debug_library / "manifest.json").read_text())["parameters"]]
    assert "model.layers.0.self_attn.qkv_proj.bias" in names  # q/k/v fused, biases included
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert "lm_head.weight" in names  # qwen2-debug is untied


LOAD_PEAK = """
import sys
from pathlib import Path

import qcompile
import tvm  # the runtime and its libraries, before the baseline is read

def rss_kb(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0])

baseline = rss_kb("VmRSS")
model = qcompile.load(sys.argv[1], weights=sys.argv[2])
print(baseline, rss_kb("VmHWM"), sum(p.numpy().nbytes for p in model._params) // 1024)
"""


def test_loading_holds_the_weights_once(tmp_path):
    """Parameters stream to the device one at a time: the peak over what the process held before the
    load stays within 1.3x the weights' bytes (it was 2x: the checkpoint's copy, read and mapped, beside
    the device's). A model of ~370 MB whose largest tensor is 17 MB, measured in its own process."""
    import subprocess
    import sys

    model = tmp_path / "model"
    write_hf_checkpoint(model, vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2)
    qcompile.compile_model(model, out=tmp_path / "lib", max_seq_len=16, log=lambda _m: None)
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path / "lib"), str(model)],
                         capture_output=True, text=True, check=True).stdout.split()
    baseline, peak, weights = map(int, out)
    assert weights > 300_000  # KiB: the measurement is not lost in the noise
    assert peak - baseline <= 1.3 * weights, (baseline, peak, weights)

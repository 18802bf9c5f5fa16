"""Quantized libraries, verified exactly: quantize a tiny checkpoint (schemes.quantize), dequantize it in
numpy (schemes.dequantize, the exact reference), load those float weights into the transformers model, and
compare its logits with the quantized library's (float32 tier, greedy tokens identical), for every family.
Also: the loader's two routes (a float checkpoint quantized while loading, a quantized checkpoint as it
is) and the bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qcompile
from qcompile.errors import UserError
from qcompile.measure import reference
from qcompile.quant import policy, schemes

from .conftest import (CPU_TOLERANCE, assert_decoder_matches, max_rel_diff, random_vision_model,
                       write_hf_checkpoint)

PROMPT = np.random.default_rng(5).integers(0, 200, 14)
GROUP = 16  # divides every tiny weight's K (64, 96, 32) and is not the default: the option is honoured


def _copy_config(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.glob("*.json"):
        if f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def dequantized_checkpoint(src: Path, dst: Path, scheme: str, group: int) -> Path:
    """The float checkpoint a quantized library's weights stand for: every policy weight replaced by
    dequantize(quantize(w))."""
    s = schemes.get(scheme)
    tensors = load_file(src / "model.safetensors")
    for name, w in tensors.items():
        if policy.is_quantized(name, w.shape):
            tensors[name] = schemes.dequantize(name, schemes.quantize(name, w, s, group), s, group)
    _copy_config(src, dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def quantized_checkpoint(src: Path, dst: Path, scheme: str, group: int) -> Path:
    """A quantized checkpoint (QCKPT): the stored tensors and quantization.json beside the config."""
    s = schemes.get(scheme)
    stored = {}
    for name, w in load_file(src / "model.safetensors").items():
        if not policy.is_quantized(name, w.shape):
            stored[name] = w
            continue
        for suffix, array in schemes.quantize(name, w, s, group).items():
            stored[name if suffix == "weight" else name.removesuffix("weight") + suffix] = array
    _copy_config(src, dst)
    record = {"scheme": scheme, "group_size": group if s.grouped else None, "format": 1}
    (dst / "quantization.json").write_text(json.dumps(record))
    save_file(stored, str(dst / "model.safetensors"), metadata={k: str(v) for k, v in record.items()})
    return dst


# (family, HF config delta, scheme, load from a quantized checkpoint rather than the float one)
# Each case compiles a library (~10 s): qwen2's q4 runs in the sliding case (layer 0 full, layer 1 sliding; the
# same packed kernels), and a float checkpoint quantized while loading in the qwen3-moe-q4 case.
DECODERS = {
    "qwen2-tied-q8-qckpt": ("qwen2", dict(tie_word_embeddings=True), "q8", True),
    "qwen2-bf16": ("qwen2", {}, "bf16", True),
    "qwen2-sliding-q4-qckpt": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
                               "q4", True),
    "qwen3-moe-q4": ("qwen3_moe", dict(norm_topk_prob=True), "q4", False),
    "qwen3-moe-q8-qckpt": ("qwen3_moe", dict(norm_topk_prob=True, attention_bias=True), "q8", True),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, libraries):
    """Case name -> (float checkpoint, quantized library), built once per module."""
    root, done = tmp_path_factory.mktemp("quant"), {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            family, fields, scheme, _ = DECODERS[name]
            # std 0.25 for the MoE, as test_qwen3_moe: smaller weights make greedy tiny MoEs repeat one token
            ckpt = write_hf_checkpoint(root / name / "float", family=family, seed=3,
                                       std=0.25 if family == "qwen3_moe" else 0.15, **fields)
            group = GROUP if schemes.get(scheme).grouped else None
            done[name] = ckpt, libraries.get(ckpt, max_seq_len=64, quantization=scheme, group_size=group)
        return done[name]

    return get


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request, built):
    _, _, scheme, from_qckpt = DECODERS[request.param]
    ckpt, library = built(request.param)
    group = GROUP if schemes.get(scheme).grouped else None
    weights = quantized_checkpoint(ckpt, ckpt.parent / "qckpt", scheme, group) if from_qckpt else ckpt
    hf = reference.load_causal_lm(dequantized_checkpoint(ckpt, ckpt.parent / "dequantized", scheme, group))
    return qcompile.load(library, weights=weights), hf, library


def test_decoder_matches_transformers_on_the_dequantized_weights(decoder):
    ours, hf, _ = decoder
    assert_decoder_matches(ours, hf, PROMPT, 8)


def test_parameters_are_the_packed_tensors(decoder):
    _, _, library = decoder
    manifest = json.loads((library / "manifest.json").read_text())
    q = manifest["quantization"]
    params = {p["name"]: p for p in manifest["parameters"]}
    assert q["scheme"] == manifest["identity"]["quantization"]["scheme"]
    if q["scheme"] in ("q8", "q4"):
        assert q["group_size"] == GROUP
        qweight, scales = params["model.embed_tokens.qweight"], params["model.embed_tokens.scales"]
        assert qweight["dtype"] == {"q8": "int8", "q4": "uint8"}[q["scheme"]]
        assert qweight["shape"] == [200, {"q8": 64, "q4": 32}[q["scheme"]]]
        assert scales == {"name": "model.embed_tokens.scales", "shape": [200, 64 // GROUP], "dtype": "float16"}
        assert not any(name.endswith("proj.weight") for name in params)
        if manifest["model"]["family"] == "qwen3_moe":  # experts [8, 2 * 32, 64] packed; the router float32
            assert params["model.layers.0.mlp.experts.gate_up_proj.scales"]["shape"] == [8, 64, 64 // GROUP]
            assert params["model.layers.0.mlp.gate.weight"]["dtype"] == "float32"
    else:
        assert params["model.embed_tokens.weight"]["dtype"] == "bfloat16"
    assert params["model.norm.weight"]["dtype"] == "float32"


VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.mark.parametrize("model_name,config_name,fields,scheme", [
    ("ViTModel", "ViTConfig", dict(image_size=16, patch_size=4, **VIT), "q4"),
    ("CLIPVisionModel", "CLIPVisionConfig", dict(image_size=18, patch_size=6, **VIT), "q8"),
])
def test_vit_matches_transformers_on_the_dequantized_weights(tmp_path, libraries, model_name, config_name,
                                                           fields, scheme):
    random_vision_model(model_name, config_name, seed=1, **fields).save_pretrained(tmp_path / "float")
    ours = qcompile.load(libraries.get(tmp_path / "float", quantization=scheme, group_size=GROUP),
                         weights=tmp_path / "float")
    dequantized = dequantized_checkpoint(tmp_path / "float", tmp_path / "dq", scheme, GROUP)
    pixels = np.random.default_rng(2).standard_normal((2, 3, fields["image_size"], fields["image_size"]))
    pixels = pixels.astype(np.float32)
    expected = reference.vision_features(dequantized, pixels)
    assert max_rel_diff(ours.encode(pixels), expected) <= CPU_TOLERANCE


# --- bad input ----------------------------------------------------------------------------------------

def test_wrong_scheme_checkpoint_is_one_line_naming_both(built, tmp_path):
    float_ckpt, library = built("qwen2-sliding-q4-qckpt")
    q8 = quantized_checkpoint(float_ckpt, tmp_path / "q8", "q8", GROUP)
    with pytest.raises(UserError, match=r"quantized q8 \(group size 16\), given to a q4 \(group size 16\) library"):
        qcompile.load(library, weights=q8)
    truncated = quantized_checkpoint(float_ckpt, tmp_path / "trunc", "q4", GROUP)
    tensors = load_file(truncated / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, str(truncated / "model.safetensors"))
    with pytest.raises(UserError, match=f"tensor '{name}' is uint8 \\[64, 47\\], expected uint8 \\[64, 48\\]"):
        qcompile.load(library, weights=truncated)


def test_quantized_checkpoint_to_a_float_library(tmp_path, debug_library, debug_checkpoint):
    qckpt = quantized_checkpoint(debug_checkpoint, tmp_path / "q4", "q4", 32)
    with pytest.raises(UserError, match=r"quantized q4 \(group size 32\), given to a float library"):
        qcompile.load(debug_library, weights=qckpt)


@pytest.mark.parametrize("options,message", [
    (dict(quantization="q3"), "--quantization must be one of q8, q4, bf16, f16, got 'q3'"),
    (dict(quantization="q4", group_size=48), "model.embed_tokens.weight: input dimension 64 is not divisible "
                                             "by --group-size 48"),
    (dict(quantization="q8", group_size=7), "--group-size must be an even number >= 2, got 7"),
    (dict(quantization="bf16", group_size=32), "--group-size applies with --quantization q8 or q4, not bf16"),
    (dict(group_size=32), "--group-size applies with --quantization q8 or q4"),
])
def test_bad_build_options(tmp_path, options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qcompile.compile_model("qwen2-debug", out=tmp_path / "lib", log=lambda _m: None, **options)
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("model,target,scheme", [("qwen2-sw-debug", "cuda-sm90", "q4"),
                                                 ("qwen3-moe-debug", "rocm-gfx942", "q8")])
def test_quantized_debug_model_cross_builds_with_device_code(tmp_path, model, target, scheme):
    """GPU builds: dlight schedules the packed kernels; the device code is checked at build time."""
    manifest = qcompile.compile_model(model, target=target, out=tmp_path / "lib", quantization=scheme,
                                      log=lambda _m: None)
    assert manifest["quantization"] == {"scheme": scheme, "group_size": 32}
    assert len(manifest["device_code"]["modules"]) == 1


def test_cli_bad_scheme_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qcompile", "compile", "qwen2-debug", "--quantization", "q5",
                           "-o", str(tmp_path / "lib")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--quantization must be one of q8, q4, bf16, f16, got 'q5'" in done.stderr
    assert not (tmp_path / "lib").exists()


def test_gpu_q8_products_get_dlights_gemv_and_matmul():
    """On GPU a q8 product is a dequantize stage + one-axis reduction: dlight's GEMV takes decode, its Matmul
    prefill (the stage inlined into shared-memory tiles: no buffer the size of a weight)."""
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from qcompile.build import builder, lowering
    from qcompile.build.plan import plan_build
    from qcompile.spec.model import resolve_model
    from qcompile.spec.target import load_target

    plan = plan_build(resolve_model("qwen2-debug"), load_target("cuda-sm90"), quantization="q8")
    mod = lowering.fused(builder.export(plan)[0], plan.target.tvm)
    taken = {}
    with plan.target.tvm:
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and "dequantize_matmul" in gv.name_hint:
                func = func.with_attr("dlight.do_not_tensorize", True)
                rule = next((r for r in (dl.gpu.Matmul(), dl.gpu.GEMV())
                             if r.apply(func, plan.target.tvm, False) is not None), None)
                assert rule is not None, gv.name_hint
                taken[type(rule).__name__] = taken.get(type(rule).__name__, 0) + 1
    assert set(taken) == {"GEMV", "Matmul"}, taken  # every product is taken; decode's by GEMV

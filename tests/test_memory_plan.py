"""The memory plan: weight bytes per scheme, KV-cache bytes per layer kind (a sliding layer holds its
window), tensor-parallel and pipeline splits, the fit against a device, and size strings. Expected numbers
are computed here from the zoo configs' literals, not by the module under test. Nothing is built."""

from __future__ import annotations

import json

import pytest

from qcompile import api
from qcompile.build.memory import fits, memory_plan, parse_memory_size
from qcompile.errors import UserError
from qcompile.spec.model import resolve_model

from .test_cli import assert_user_error, run_cli

# qwen2-debug (zoo.yaml): vocab 256, hidden 64, intermediate 128, 2 layers, 4 heads x 16, 2 KV heads, untied.
EMBEDDING_AND_HEAD = [(256, 64), (256, 64)]
LAYER_MATRICES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # q k v o gate up down
LAYER_VECTORS = 64 + 32 + 32 + 64 + 64  # q/k/v biases, two norms
MATRICES = EMBEDDING_AND_HEAD + 2 * LAYER_MATRICES
VECTORS = 2 * LAYER_VECTORS + 64  # + the final norm


def weight_bytes(plan) -> int:
    return plan["weights"]["total_bytes"]


def test_weight_bytes_per_scheme_qwen2_debug():
    spec = resolve_model("qwen2-debug")
    elements = sum(n * k for n, k in MATRICES)
    expected = {
        "float32": 4 * (elements + VECTORS),
        "float16": 2 * (elements + VECTORS),
        # grouped: the packed weight + one float16 scale per 32 weights; norms and biases in float32
        "q8": sum(n * k + n * (k // 32) * 2 for n, k in MATRICES) + 4 * VECTORS,
        "q4": sum(n * k // 2 + n * (k // 32) * 2 for n, k in MATRICES) + 4 * VECTORS,
    }
    got = {"float32": weight_bytes(memory_plan(spec, dtype="float32", max_seq_len=64)),
           "float16": weight_bytes(memory_plan(spec, dtype="float16", max_seq_len=64)),
           "q8": weight_bytes(memory_plan(spec, dtype="float32", quantization="q8", max_seq_len=64)),
           "q4": weight_bytes(memory_plan(spec, dtype="float32", quantization="q4", max_seq_len=64))}
    assert got == expected
    assert got["q4"] < got["q8"] < got["float16"] < got["float32"]
    # f16 storage of the selected weights with float32 compute: the norms and biases stay 4 bytes
    f16 = memory_plan(spec, dtype="float32", quantization="f16", max_seq_len=64)
    assert weight_bytes(f16) == 2 * elements + 4 * VECTORS


def test_sliding_layers_cache_their_window():
    spec = resolve_model("qwen2-sw-debug")  # 3 layers, 2 KV heads x 16; layers 1, 2 slide over 8 tokens
    per_token = 2 * 2 * 16 * 4  # keys + values, float32
    plan = memory_plan(spec, dtype="float32", max_seq_len=256)
    assert plan["kv_cache"]["per_layer_kind"] == {
        "full": {"layers": 1, "tokens": 256, "bytes": per_token * 256},
        "sliding 8": {"layers": 2, "tokens": 8, "bytes": 2 * per_token * 8}}
    assert plan["kv_cache"]["total_bytes"] == per_token * (256 + 16)
    short = memory_plan(spec, dtype="float32", max_seq_len=4)  # shorter than the window: 4 tokens each
    assert short["kv_cache"]["total_bytes"] == per_token * 3 * 4


def test_tensor_parallel_halves_the_sharded_parts():
    spec = resolve_model("qwen2-debug")
    one = memory_plan(spec, dtype="float32", max_seq_len=64)
    two = memory_plan(spec, dtype="float32", max_seq_len=64, tensor_parallel=2)
    replicated = 4 * (sum(n * k for n, k in EMBEDDING_AND_HEAD) + 2 * 2 * 64 + 64)  # + the norms
    sharded = 4 * 2 * (sum(n * k for n, k in LAYER_MATRICES) + 64 + 32 + 32)  # + the q/k/v biases
    assert replicated + sharded == weight_bytes(one)
    assert len(two["devices"]) == 2
    for device in two["devices"]:
        assert device["weight_bytes"] == replicated + sharded // 2
        assert device["kv_cache_bytes"] == one["devices"][0]["kv_cache_bytes"] // 2
        assert device["workspace_bytes"] < one["devices"][0]["workspace_bytes"]
    with pytest.raises(UserError, match="tensor parallel 4 does not divide num_key_value_heads"):
        memory_plan(spec, dtype="float32", max_seq_len=64, tensor_parallel=4)


def test_pipeline_stages_are_contiguous_and_hold_every_byte_once():
    spec = resolve_model("qwen3-moe-debug")
    one = memory_plan(spec, dtype="float32", max_seq_len=64)
    plan = memory_plan(spec, dtype="float32", max_seq_len=64, pipeline_stages=2)
    (a, b), (c, d) = (device["layers"] for device in plan["devices"])
    assert a == 0 and b == c and d == 4 and 0 < b < 4
    assert sum(dev["weight_bytes"] for dev in plan["devices"]) == weight_bytes(one)  # untied: nothing twice
    assert sum(dev["kv_cache_bytes"] for dev in plan["devices"]) == one["kv_cache"]["total_bytes"]


def test_qwen_72b_figures_of_the_issue():
    """q4 fits one H200 (141 GB) at 32k context; float16 does not; float16 over two fits, per device."""
    h200 = parse_memory_size("141GB")
    options = dict(target="cuda-sm90", max_seq_len=32768)
    assert fits(api.memory_plan("qwen-72b", quantization="q4", **options), h200)[0]
    ok, margin = fits(api.memory_plan("qwen-72b", **options), h200)
    assert not ok and margin < -50e9
    assert fits(api.memory_plan("qwen-72b", tensor_parallel=2, **options), h200)[0]


def test_sizes():
    assert parse_memory_size("141GB") == 141 * 10 ** 9
    assert parse_memory_size("80GiB") == 80 * 2 ** 30
    assert parse_memory_size("1.5 gb") == 1_500_000_000 and parse_memory_size("4096") == 4096
    for bad in ("141G", "lots", "-3GB", "12 parsecs"):
        with pytest.raises(UserError, match="--device-memory: .* is not a size"):
            parse_memory_size(bad)


def test_cli_fit_checks(capsys, tmp_path):
    assert_user_error(capsys, "--device-memory: '141XB' is not a size", "inspect", "qwen2-debug",
                      "--device-memory", "141XB")
    # compile checks before building: nothing is written
    assert_user_error(capsys, "memory plan: does not fit 1.0 MB: needs ", "compile", "qwen2-debug",
                      "-o", tmp_path / "lib", "--device-memory", "1MB")
    assert not (tmp_path / "lib").exists()
    code, out, _ = run_cli(capsys, "inspect", "qwen-72b", "--target", "cuda-sm90", "--quantization", "q4",
                           "--max-seq-len", "32768", "--device-memory", "141GB", "--json")
    report = json.loads(out)
    assert code == 0 and report["fits"] and report["memory_plan"]["quantization"] == "q4"
    code, out, _ = run_cli(capsys, "inspect", "qwen2-sw-debug")
    assert code == 0 and "2 sliding 8 x 8 tokens" in out


def test_library_manifest_and_inspect_carry_the_plan(capsys, debug_library):
    manifest = json.loads((debug_library / "manifest.json").read_text())
    assert manifest["memory_plan"] == memory_plan(resolve_model("qwen2-debug"), dtype="float32", max_seq_len=64,
                                                  prefill_chunk=manifest["prefill_chunk"])
    code, out, _ = run_cli(capsys, "inspect", debug_library)
    assert code == 0 and "kv cache" in out and "per device" in out

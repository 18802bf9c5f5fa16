"""Quantized checkpoints: `quantize` packs every selected weight as `schemes.quantize` does, `dequantize`
writes the float32 checkpoint those packs stand for (transformers loads it), and bad input is one line,
exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qcompile
from qcompile import api
from qcompile.errors import UserError
from qcompile.quant import schemes
from qcompile.quant.checkpoint import CheckpointTensors, check_loadable, read_quantization
from qcompile.quant.policy import is_quantized

from .conftest import write_hf_checkpoint
from .test_cli import assert_user_error, run_cli

quiet = dict(log=lambda _m: None)


def _tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (one file or shards)."""
    out = {}
    for file in directory.glob("*.safetensors"):
        out |= load_file(file)
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A transformers-written float32 qwen2 (with generation_config.json beside config.json)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "float", seed=3)


@pytest.mark.parametrize("name", ["q8", "q4", "bf16", "f16"])
def test_quantize_then_dequantize_is_the_schemes_reference(tmp_path, hf_checkpoint, name):
    scheme = schemes.get(name)
    summary = api.quantize_checkpoint(hf_checkpoint, scheme=name, out=tmp_path / "q", **quiet)
    assert read_quantization(tmp_path / "q") == (scheme, 32)
    assert json.loads((tmp_path / "q" / "quantization.json").read_text()) == {
        "scheme": name, "group_size": 32, "format": 1}
    with safe_open(tmp_path / "q" / "model.safetensors", "numpy") as f:
        assert json.loads(f.metadata()["quantization"])["scheme"] == name
    for copied in ("config.json", "generation_config.json"):
        assert (tmp_path / "q" / copied).read_bytes() == (hf_checkpoint / copied).read_bytes()

    api.dequantize_checkpoint(tmp_path / "q", out=tmp_path / "deq", **quiet)
    original, stored, back = _tensors(hf_checkpoint), _tensors(tmp_path / "q"), _tensors(tmp_path / "deq")
    assert set(back) == set(original)
    assert summary["quantized"] == sum(is_quantized(n, a.shape) for n, a in original.items()) > 0
    for n, w in original.items():
        assert back[n].dtype == np.float32
        if not is_quantized(n, w.shape):  # norms and biases: float32, untouched
            np.testing.assert_array_equal(stored[n], w)
            np.testing.assert_array_equal(back[n], w)
            continue
        expected = schemes.dequantize(n, schemes.quantize(n, w, scheme, 32), scheme, 32)
        np.testing.assert_array_equal(back[n], expected)
        prefix = n.removesuffix(".weight")
        if scheme.grouped:
            assert f"{prefix}.qweight" in stored and f"{prefix}.scales" in stored and n not in stored
        else:
            assert stored[n].dtype.name == scheme.storage

    # transformers loads the dequantized checkpoint as float32 with exactly those weights
    from qcompile.measure import reference

    model = reference.load_causal_lm(tmp_path / "deq")
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q_proj, back["model.layers.0.self_attn.q_proj.weight"])


def test_moe_experts_quantized_one_by_one_router_stays_float32(tmp_path):
    src = qcompile.init_weights("qwen3-moe-debug", out=tmp_path / "moe", seed=1, max_shard_bytes=100_000)
    assert (src / "model.safetensors.index.json").is_file()  # sharded source
    api.quantize_checkpoint(src, scheme="q4", out=tmp_path / "q", **quiet)
    stored = _tensors(tmp_path / "q")
    router = "model.layers.0.mlp.gate.weight"
    assert stored[router].dtype == np.float32 and f"{router.removesuffix('.weight')}.qweight" not in stored
    expert = "model.layers.0.mlp.experts.5.down_proj"
    assert stored[f"{expert}.qweight"].shape == (64, 16) and stored[f"{expert}.scales"].shape == (64, 1)
    reader = CheckpointTensors(tmp_path / "q")
    np.testing.assert_array_equal(reader.float32(router), CheckpointTensors(src).float32(router))


def test_output_shards_when_large(tmp_path, hf_checkpoint):
    from qcompile.quant.checkpoint import quantize_checkpoint

    quantize_checkpoint(hf_checkpoint, scheme="q8", out=tmp_path / "one")
    quantize_checkpoint(hf_checkpoint, scheme="q8", out=tmp_path / "many", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    one, many = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
    assert set(one) == set(many) and all(np.array_equal(one[n], many[n]) for n in one)
    assert read_quantization(tmp_path / "many") == (schemes.get("q8"), 32)


def test_cli_quantize_and_dequantize(capsys, tmp_path, hf_checkpoint):
    code, out, _ = run_cli(capsys, "quantize", hf_checkpoint, "--quantization", "q4", "--group-size", "16",
                           "-o", tmp_path / "q", "--json")
    assert code == 0 and json.loads(out)["group_size"] == 16
    code, out, err = run_cli(capsys, "dequantize", tmp_path / "q", "-o", tmp_path / "deq")
    assert code == 0 and "wrote the float32 weights" in out and "dequantizing tensor 1/" in err
    code, _, _ = run_cli(capsys, "dequantize", tmp_path / "q", "-o", tmp_path / "deq")  # its own output: replaced
    assert code == 0


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, hf_checkpoint):
    out = tmp_path / "out"
    assert_user_error(capsys, "must be one of q8, q4, bf16, f16", "quantize", hf_checkpoint,
                      "--quantization", "q3", "-o", out)
    assert_user_error(capsys, "mlp.down_proj.weight: input dimension 96 is not divisible by --group-size 64",
                      "quantize", hf_checkpoint, "--quantization", "q8", "--group-size", "64", "-o", out)
    api.quantize_checkpoint(hf_checkpoint, scheme="q8", out=tmp_path / "q8", **quiet)
    assert_user_error(capsys, "already quantized (q8, group size 32); quantize a float checkpoint to q4",
                      "quantize", tmp_path / "q8", "--quantization", "q4", "-o", out)
    assert_user_error(capsys, "not a quantized checkpoint", "dequantize", hf_checkpoint, "-o", out)
    assert_user_error(capsys, "not a previous qcompile output", "quantize", hf_checkpoint,
                      "--quantization", "q8", "-o", hf_checkpoint)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]  # no temporaries left


def test_a_checkpoint_of_another_scheme_is_refused_naming_both(tmp_path, hf_checkpoint):
    api.quantize_checkpoint(hf_checkpoint, scheme="q8", out=tmp_path / "q8", **quiet)
    assert check_loadable(hf_checkpoint, "q4", 32) is None  # float: quantized while loading
    assert check_loadable(tmp_path / "q8", "q8", 32) == (schemes.get("q8"), 32)
    with pytest.raises(UserError, match="holds q8 \\(group size 32\\) weights but the library is q4 \\(group"):
        check_loadable(tmp_path / "q8", "q4", 32)
    with pytest.raises(UserError, match="library is q8 \\(group size 64\\)"):
        check_loadable(tmp_path / "q8", "q8", 64)
    with pytest.raises(UserError, match="holds q8 \\(group size 32\\) weights but the library is not quantized"):
        check_loadable(tmp_path / "q8", None, 32)


def test_corrupt_or_truncated_packed_tensors_are_refused(tmp_path, hf_checkpoint):
    api.quantize_checkpoint(hf_checkpoint, scheme="q4", out=tmp_path / "q", **quiet)
    file = tmp_path / "q" / "model.safetensors"
    metadata = safe_open(file, "numpy").metadata()

    stored = load_file(file)  # a qweight whose shape disagrees with its scales
    name = "model.layers.1.mlp.down_proj.qweight"
    stored[name] = stored[name][:, :-2].copy()
    save_file(stored, str(file), metadata=metadata)
    with pytest.raises(UserError, match=f"'{name}' is uint8 \\[64, 46\\], expected uint8 \\[64, 48\\]"):
        api.dequantize_checkpoint(tmp_path / "q", out=tmp_path / "deq", **quiet)

    file.write_bytes(file.read_bytes()[:-1000])  # a truncated file
    with pytest.raises(UserError, match="unreadable safetensors file"):
        api.dequantize_checkpoint(tmp_path / "q", out=tmp_path / "deq", **quiet)
    assert not (tmp_path / "deq").exists()

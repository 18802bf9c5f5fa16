"""zoo.yaml and HF config.json validation: every mistake names the model (or file) and the field."""

from __future__ import annotations

import json

import pytest
import yaml

from qcompile.errors import UserError
from qcompile.data import package_data
from qcompile.spec.model import load_checkpoint_config, load_zoo, resolve_model

FAMILY_DEFAULTS = yaml.safe_load((package_data() / "zoo.yaml").read_text())["families"]
GOOD = dict(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def zoo_error(tmp_path, **delta) -> str:
    entry = {**GOOD, **delta}
    entry = {k: v for k, v in entry.items() if v is not ...}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"families": FAMILY_DEFAULTS, "models": {"m": entry}}))
    with pytest.raises(UserError) as info:
        load_zoo(path)
    return str(info.value)


def test_shipped_zoo_is_valid_and_complete():
    zoo = load_zoo()
    for name in ("qwen-72b", "qwen2-7b", "qwen2-7b-sw", "qwen2-0.5b", "qwen2-debug", "qwen2-sw-debug"):
        assert zoo[name].family.name == "qwen2"
    seed = zoo["qwen-72b"].config
    assert (seed.num_hidden_layers, seed.num_attention_heads, seed.hidden_size, seed.vocab_size,
            seed.max_position_embeddings, seed.intermediate_size) == (80, 64, 8192, 151851, 32768, 24576)
    assert seed.num_key_value_heads == 64 and seed.rope_theta == 1e6 and seed.rms_norm_eps == 1e-6
    assert zoo["qwen2-0.5b"].config.tie_word_embeddings
    windows = zoo["qwen2-7b-sw"].config.layer_windows()
    assert windows[:14] == [None] * 14 and windows[14:] == [4096] * 14  # upper layers slide
    assert zoo["qwen2-7b"].config.layer_windows() == [None] * 28
    sw = zoo["qwen2-sw-debug"].config
    assert sw.layer_windows() == [None, 8, 8]


@pytest.mark.parametrize("delta,needle", [
    (dict(colour="red"), "field 'colour'"),
    (dict(hidden_size="big"), "field 'hidden_size' must be int"),
    (dict(tie_word_embeddings=1), "field 'tie_word_embeddings' must be bool"),
    (dict(num_hidden_layers=0), "field 'num_hidden_layers' must be positive"),
    (dict(rms_norm_eps=-1e-6), "field 'rms_norm_eps' must be positive"),
    (dict(num_key_value_heads=3), "field 'num_key_value_heads' (3) must divide num_attention_heads (4)"),
    (dict(hidden_size=30), "field 'hidden_size' (30) must be a multiple of num_attention_heads"),
    (dict(use_sliding_window=True, sliding_window=65), "field 'sliding_window' (65) is larger"),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention"]),
     "field 'layer_types' has 1 entries"),
    (dict(layer_types=["full_attention", "local"]), "field 'layer_types' has 'local'"),
    (dict(hidden_act="gelu"), "field 'hidden_act' must be 'silu'"),
    (dict(family="llama"), "field 'family'"),
    (dict(family=...), "field 'family'"),
])
def test_bad_zoo_fields_are_named(tmp_path, delta, needle):
    message = zoo_error(tmp_path, **delta)
    assert message.startswith("zoo.yaml: model 'm': ") and needle in message, message


def test_unknown_family_default_is_named(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"families": {"qwen2": {**FAMILY_DEFAULTS["qwen2"], "typo": 1}},
                                    "models": {}}))
    with pytest.raises(UserError, match="family 'qwen2': unknown field 'typo'"):
        load_zoo(path)


def test_unknown_model_lists_the_zoo():
    with pytest.raises(UserError, match="unknown model 'qwen9'.*qwen2-debug"):
        resolve_model("qwen9")


def _hf_config(tmp_path, **fields):
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                transformers_version="5.23.0", architectures=["Qwen2ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return tmp_path


def test_checkpoint_dir_rope_spellings_and_hf_defaults(tmp_path):
    assert load_checkpoint_config(_hf_config(tmp_path)).config.rope_theta == 10000.0  # HF's default
    cfg = load_checkpoint_config(_hf_config(tmp_path, rope_theta=5e5)).config
    assert cfg.rope_theta == 5e5
    cfg = load_checkpoint_config(_hf_config(
        tmp_path, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})).config
    assert cfg.rope_theta == 1e6
    assert cfg.max_position_embeddings == 32768 and cfg.max_window_layers == 28  # HF's defaults
    with pytest.raises(UserError, match="rope_type 'yarn'"):
        load_checkpoint_config(_hf_config(tmp_path, rope_parameters={"rope_theta": 1e6, "rope_type": "yarn"}))


def test_checkpoint_layer_types_count_only_with_use_sliding_window(tmp_path):
    kinds = ["sliding_attention", "full_attention"]
    off = load_checkpoint_config(_hf_config(tmp_path, layer_types=kinds, sliding_window=4)).config
    assert off.layer_windows() == [None, None]
    on = load_checkpoint_config(_hf_config(tmp_path, layer_types=kinds, sliding_window=4,
                                           use_sliding_window=True)).config
    assert on.layer_windows() == [4, None]
    derived = load_checkpoint_config(_hf_config(tmp_path, sliding_window=4, use_sliding_window=True,
                                                max_window_layers=1)).config
    assert derived.layer_windows() == [None, 4]


def test_checkpoint_dir_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="model_type 'llama' is not supported"):
        load_checkpoint_config(_hf_config(tmp_path, model_type="llama"))
    with pytest.raises(UserError, match=r"config.json: field 'num_key_value_heads' \(3\)"):
        load_checkpoint_config(_hf_config(tmp_path, num_key_value_heads=3))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_checkpoint_config(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint_config(tmp_path / "..")

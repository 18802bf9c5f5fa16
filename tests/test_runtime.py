"""Loading is verified (hash, TVM version, CPU features) and the runtime rejects bad token input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qcompile
from qcompile.errors import UserError


@pytest.fixture
def library_copy(tmp_path, debug_library):
    return shutil.copytree(debug_library, tmp_path / "lib")


def _edit_manifest(library, edit):
    path = library / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_flipped_library_byte_is_refused(library_copy, debug_checkpoint):
    so = library_copy / "model.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x01
    so.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest.*refusing to load"):
        qcompile.load(library_copy, weights=debug_checkpoint)


def test_other_tvm_version_is_refused(library_copy, debug_checkpoint):
    _edit_manifest(library_copy, lambda m: m["versions"].update(tvm="0.26.0"))
    with pytest.raises(UserError, match="built with TVM 0.26.0, this runtime is TVM 0.27"):
        qcompile.load(library_copy, weights=debug_checkpoint)


def test_cpu_without_the_build_features_is_refused(library_copy, debug_checkpoint):
    _edit_manifest(library_copy, lambda m: m["target"]["cpu_features"].append("amx-tile-imaginary"))
    with pytest.raises(UserError, match="this CPU lacks amx-tile-imaginary"):
        qcompile.load(library_copy, weights=debug_checkpoint)


def test_missing_library_dir_and_manifest(tmp_path, debug_checkpoint):
    with pytest.raises(UserError, match="library directory not found"):
        qcompile.load(tmp_path / "nope", weights=debug_checkpoint)
    with pytest.raises(UserError, match="not a qcompile library"):
        qcompile.load(tmp_path, weights=debug_checkpoint)


def test_manifest_describes_the_build(debug_library):
    m = json.loads((debug_library / "manifest.json").read_text())
    assert m["model"]["name"] == "qwen2-debug" and m["dtype"] == "float32" and m["max_seq_len"] == 64
    assert set(m["functions"]) == {"prefill", "prefill_64", "decode", "batch_step"}
    assert m["batch"] == {"function": "batch_step", "page_tokens": 16, "max_pages": 4}  # 64 positions
    assert m["functions"]["batch_step"]["output"][0] == {"shape": ["b", 256], "dtype": "float32"}
    assert m["functions"]["prefill"]["inputs"]["input_ids"] == {"shape": ["n"], "dtype": "int32"}
    assert m["buckets"] == {"function": "prefill", "dim": "n", "sizes": [64]}  # the chunk, static
    assert m["functions"]["prefill_64"]["inputs"]["input_ids"] == {"shape": [64], "dtype": "int32"}
    assert m["functions"]["decode"]["output"][0] == {"shape": [1, 256], "dtype": "float32"}
    assert m["target"]["target"]["mcpu"] != "host" and "avx2" in m["target"]["cpu_features"]
    assert m["versions"]["tvm"].startswith("0.27") and len(m["library"]["sha256"]) == 64
    assert sum(np.prod(p["shape"]) for p in m["parameters"]) == m["parameter_count"]


@pytest.fixture(scope="module")
def model(debug_library, debug_checkpoint):
    return qcompile.load(debug_library, weights=debug_checkpoint)


def test_full_chunk_runs_the_static_bucket_with_the_same_numbers(model):
    ids = np.arange(64) % 256
    called, vm = [], model._vm

    class Spy:
        def __getitem__(self, name):
            called.append(name)
            return vm[name]

    model._vm = Spy()
    try:
        bucketed = model.prefill(ids)
        model._bucket_sizes = set()  # the symbolic-length prefill for the same chunk
        symbolic = model.prefill(ids)
    finally:
        model._vm, model._bucket_sizes = vm, {64}
    assert called == ["prefill_64", "prefill"]
    np.testing.assert_allclose(bucketed, symbolic, rtol=1e-5, atol=1e-5 * np.abs(symbolic).max())


@pytest.mark.parametrize("ids,needle", [
    ([1, 256], "token id 256 is out of range 0..255"),
    ([-1], "token id -1 is out of range"),
    ([], "non-empty 1-D sequence"),
    (["a"], "integer token ids"),
    (list(range(65)), "max_seq_len is 64"),
])
def test_bad_prompts(model, ids, needle):
    with pytest.raises(UserError, match=needle):
        model.prefill(ids)


def test_generation_bounds(model):
    with pytest.raises(UserError, match="exceeds the library's max_seq_len 64"):
        model.generate([1, 2, 3], 62)
    with pytest.raises(UserError, match="non-negative integer"):
        model.generate([1, 2, 3], -1)
    assert model.generate([1, 2, 3], 61).size == 61  # the last new token is not yet in the cache
    model.decode(5)  # ... feeding it fills the context exactly
    with pytest.raises(UserError, match="would reach 65 tokens.*max_seq_len is 64"):
        model.decode(5)


def test_prefill_restarts_the_sequence(model):
    first = model.prefill([4, 5, 6])
    model.decode(7)
    np.testing.assert_array_equal(model.prefill([4, 5, 6]), first)
    assert model.position == 3

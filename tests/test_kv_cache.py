"""The KV cache in place: per-layer buffers allocated once per load, written by every call (a sliding
layer's as a ring of its window), read by attention by position. Against transformers on the zoo's
qwen2-sw-debug (layer 0 full, layers 1-2 slide over 8 tokens), built with max_seq_len 64."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tvm_ffi

import qcompile
from qcompile import api
from qcompile.errors import UserError
from qcompile.measure import reference

from .conftest import CPU_TOLERANCE, max_rel_diff

WINDOW, MAX_SEQ_LEN = 8, 64
IDS = np.random.default_rng(11).integers(0, 256, MAX_SEQ_LEN)  # a fixed sequence, fed token by token


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return qcompile.init_weights("qwen2-sw-debug", out=tmp_path_factory.mktemp("kv") / "ckpt", seed=4)


@pytest.fixture(scope="module")
def library(libraries):
    return libraries.get("qwen2-sw-debug", max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def model(library, checkpoint):
    return qcompile.load(library, weights=checkpoint)


@pytest.fixture(scope="module")
def hf_logits(checkpoint) -> np.ndarray:
    """transformers' logits [len(IDS), vocab] over the whole sequence at once."""
    return reference.logits(reference.load_causal_lm(checkpoint), IDS)


def test_buffers_are_sized_by_layer_kind(model, library):
    """The manifest records the layout; the runtime allocates from it: full layer max_seq_len slots, a
    sliding layer its window, K and V each."""
    layout = json.loads((library / "manifest.json").read_text())["kv_cache"]
    assert layout == {"layers": [{"kind": "full_attention", "slots": MAX_SEQ_LEN}]
                      + [{"kind": "sliding_attention", "window": WINDOW, "slots": WINDOW}] * 2,
                      "dtype": "float32", "row": [2, 16]}
    assert [tuple(b.shape) for b in model._cache] == [(MAX_SEQ_LEN, 2, 16)] * 2 + [(WINDOW, 2, 16)] * 4
    assert api.inspect(library)["kv_cache"] == layout  # what `qcompile inspect` shows


def test_decode_steps_far_past_the_window_match_hf(model, hf_logits):
    """Three prompt tokens, then 60 decode steps: the rings of 8 wrap seven times; every step's logits
    against transformers' at that position."""
    first = model.prefill(IDS[:3])
    steps = np.stack([model.decode(int(token)) for token in IDS[3:]])  # logits after positions 3 .. 63
    assert max_rel_diff(first, hf_logits[:3]) <= CPU_TOLERANCE
    assert max_rel_diff(steps, hf_logits[3:]) <= CPU_TOLERANCE


@pytest.mark.parametrize("chunk", [11, 30])
def test_prefill_chunks_longer_than_the_window_match_hf(model, hf_logits, chunk):
    """Prefill in chunks longer than the window (11 and 30 > 8; 64 tokens, the last chunk shorter): a
    chunk's queries need keys its own later rows would overwrite in the ring."""
    model.prefill_chunk = chunk
    try:
        ours = model.prefill(IDS)
    finally:
        model.prefill_chunk = model.manifest["prefill_chunk"]
    assert max_rel_diff(ours, hf_logits) <= CPU_TOLERANCE


def test_a_reused_decoder_gives_a_fresh_ones_logits(model, library, checkpoint):
    """A second sequence on a Decoder whose buffers hold a whole first one (position 0 again, nothing
    cleared): the same logits, bit for bit, as a freshly loaded Decoder's."""
    model.prefill(IDS[:40])
    for token in IDS[40:]:
        model.decode(int(token))  # the buffers are full, every ring has wrapped
    second = IDS[::-1][:12]

    def run(decoder):
        return np.concatenate([decoder.prefill(second[:5])] + [decoder.decode(int(t))[None] for t in second[5:]])

    np.testing.assert_array_equal(run(model), run(qcompile.load(library, weights=checkpoint)))


def test_a_call_writes_the_buffers_in_place(model):
    """A decode call returns the very buffers it was given (no copy) with the token's key written into
    its slot (position 5: slot 5 of the full layer, slot 5 of each ring)."""
    model.prefill(IDS[:5])
    before = [model._numpy(b).view(np.uint32) for b in model._cache]  # bits: unwritten slots may hold NaNs
    _, returned = model._function("decode", 1)(model._tensor(IDS[5:6].astype(np.int32), model.device),
                                               tvm_ffi.Shape([5]), model._cache, model._params)
    assert all(r.same_as(b) for r, b in zip(returned, model._cache, strict=True))
    after = [model._numpy(b).view(np.uint32) for b in model._cache]
    for old, new in zip(before, after, strict=True):
        changed = np.flatnonzero((old != new).any(axis=(1, 2)))
        assert changed.tolist() == [5]


def test_a_library_without_a_kv_cache_layout_is_refused(library, checkpoint, tmp_path):
    """A library built by an older qcompile (its entry points took and returned a copied cache)."""
    old = shutil.copytree(library, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["kv_cache"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no 'kv_cache' in its manifest.*compile it again"):
        qcompile.load(old, weights=checkpoint)


def test_decode_needs_a_sequence(library, checkpoint):
    fresh = qcompile.load(library, weights=checkpoint)
    with pytest.raises(UserError, match="no sequence started"):
        fresh.decode(1)

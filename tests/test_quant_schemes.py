"""The packed layouts of the quantization schemes (numpy: the reference every kernel is checked against)."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import UserError
from qcompile.quant import schemes


@pytest.fixture
def weight():
    return np.random.default_rng(0).normal(0, 0.02, (3, 6, 64)).astype(np.float32)  # [experts, N, K]


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_grouped_round_trip_error_is_within_half_a_step(weight, name):
    scheme = schemes.get(name)
    stored = schemes.quantize("w", weight, scheme, 32)
    assert stored["scales"].shape == (3, 6, 2) and stored["scales"].dtype == np.float16
    assert stored["qweight"].shape == (3, 6, scheme.packed_k(64))
    back = schemes.dequantize("w", stored, scheme, 32)
    step = np.repeat(stored["scales"].astype(np.float32), 32, axis=-1)
    # Rounding to the nearest step, except where float16 rounded the scale down and |q| hit qmax.
    assert np.all(np.abs(back - weight) <= step * 0.5 + 1e-3 * np.abs(weight) + 1e-12)
    assert np.abs(back - weight).max() > 0  # it really quantized


def test_q4_byte_holds_element_j_and_j_plus_half_group():
    w = np.zeros((1, 32), np.float32)
    w[0, :16] = np.minimum(np.arange(16) - 7.0, 7.0)  # q = -7..7, then 7 again
    w[0, 16:] = 7.0  # the group's max: scale 1.0
    stored = schemes.quantize("w", w, schemes.get("q4"), 32)
    assert stored["scales"][0, 0] == 1.0
    byte = stored["qweight"][0]
    np.testing.assert_array_equal(byte & 0x0F, np.minimum(np.arange(16) - 7, 7) + 8)  # elements 0..15
    np.testing.assert_array_equal(byte >> 4, np.full(16, 15))  # elements 16..31: 7 + 8


def test_q8_is_symmetric_int8_and_zero_groups_stay_zero():
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = np.linspace(-1, 1, 32)
    stored = schemes.quantize("w", w, schemes.get("q8"), 32)
    assert stored["qweight"].dtype == np.int8 and stored["qweight"][1, 32:].min() == -127
    np.testing.assert_array_equal(stored["scales"][0], [0, 0])
    np.testing.assert_array_equal(schemes.dequantize("w", stored, schemes.get("q8"), 32)[0], 0)


@pytest.mark.parametrize("name,dtype", [("bf16", "bfloat16"), ("f16", "float16")])
def test_sixteen_bit_schemes_store_the_cast_weight(weight, name, dtype):
    stored = schemes.quantize("w", weight, schemes.get(name))
    assert stored["weight"].dtype.name == dtype
    np.testing.assert_array_equal(schemes.dequantize("w", stored, schemes.get(name)),
                                  stored["weight"].astype(np.float32))


def test_bytes_per_weight_match_llama_cpp_blocks():
    assert schemes.get("q8").bytes_per_weight(32) == 34 / 32  # Q8_0: 32 int8 + one float16 scale
    assert schemes.get("q4").bytes_per_weight(32) == 18 / 32  # Q4_0: 16 bytes + one float16 scale


def test_bad_input_names_the_tensor_or_option(weight):
    with pytest.raises(UserError, match="--quantization must be one of q8, q4, bf16, f16, got 'q3'"):
        schemes.get("q3")
    with pytest.raises(UserError, match=r"^lm_head.weight: input dimension 64 is not divisible by --group-size 48"):
        schemes.quantize("lm_head.weight", weight, schemes.get("q8"), 48)
    stored = schemes.quantize("w", weight, schemes.get("q4"), 32)
    with pytest.raises(UserError, match="^w: packed weight"):
        schemes.dequantize("w", {**stored, "qweight": stored["qweight"][..., :-1]}, schemes.get("q4"), 32)
    with pytest.raises(UserError, match="^w: holds non-finite"):
        schemes.quantize("w", np.full((2, 32), np.nan, np.float32), schemes.get("q8"))

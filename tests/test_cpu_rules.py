"""qcompile's own default CPU schedules (`build.cpu_rules`): which kernels each rule takes, that the
scheduled kernel computes what the unscheduled one does, and that builds use them where no tuning record
serves a kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import te

import qcompile
from qcompile.build import cpu_rules


def _target(mcpu: str):
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": mcpu, "num-cores": 2})


HOST = _target(tvm.target.codegen.llvm_get_system_cpu())


def _decode_projection(rows: int, depth: int, n: int = 1):
    """y[n, rows] = x[n, depth] . W[rows, depth]^T + b: the fused kernel a projection lowers to (n = 1 in a
    decode step, the chunk in a prefill bucket)."""
    x = te.placeholder((n, depth), "float32", name="x")
    w = te.placeholder((rows, depth), "float32", name="w")
    b = te.placeholder((rows,), "float32", name="b")
    k = te.reduce_axis((0, depth), name="k")
    y = te.compute((n, rows), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="NT_matmul")
    out = te.compute((n, rows), lambda i, j: y[i, j] + b[j], name="T_add")
    return te.create_prim_func([x, w, b, out])


def test_vector_lanes_follow_the_target():
    assert cpu_rules.vector_lanes(_target("skylake-avx512")) == 16
    assert cpu_rules.vector_lanes(_target("haswell")) == 8


@pytest.mark.parametrize("n,rows,depth,rule", [(1, 1152, 896, "gemv"), (1, 64, 4864, "gemv"), (1, 8, 64, "gemv"),
                                                (128, 64, 896, "gemm"), (12, 16, 96, "gemm")])
def test_rules_compute_the_same_numbers(n, rows, depth, rule):
    found = cpu_rules.default_schedule(_decode_projection(rows, depth, n), HOST)
    assert found is not None and found[0] == rule
    run = tvm.compile(found[1].mod, target=HOST).jit()["main"]
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((n, depth), (rows, depth), (rows,)))
    out = tvm.runtime.tensor(np.zeros((n, rows), np.float32))
    run(*(tvm.runtime.tensor(a) for a in (x, w, b)), out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6


@pytest.mark.parametrize("n,rows,depth", [(6, 64, 64), (1, 64, 60), (1, 6, 64)])
def test_rules_decline_other_shapes(n, rows, depth):
    """Input rows no register tile divides, a depth no vector width divides, weight rows likewise."""
    assert cpu_rules.default_schedule(_decode_projection(rows, depth, n), HOST) is None


def _rows16_projection(lead: tuple, rows: int, depth: int, epilogue: bool):
    """y[..., rows] = x[..., depth] . W^T (+ b) with W packed rows16: the kernel float32 CPU builds get."""
    from tvm.relax.frontend import nn

    from qcompile.models.packing import rows16_matmul

    class Projection(nn.Module):
        def __init__(self):
            self.w = nn.Parameter((rows // 16, depth, 16), "float32")
            self.b = nn.Parameter((rows,), "float32")

        def forward(self, x):
            y = rows16_matmul(x, self.w)
            return y + self.b if epilogue else y

    spec = {"forward": {"x": nn.spec.Tensor([*lead, depth], "float32"), "$": {"param_mode": "packed",
                                                                                   "effect_mode": "none"}}}
    mod, _ = Projection().export_tvm(spec=spec)
    from qcompile.build import lowering

    fused = lowering.fused(mod, HOST)
    func = next(f for gv, f in fused.functions_items() if "rows16_matmul" in gv.name_hint)
    return func.with_attr("global_symbol", "main")


@pytest.mark.parametrize("lead,rows,depth,epilogue", [((1,), 1152, 896, True), ((7,), 64, 96, True),
                                                      ((128,), 96, 64, False), ((3, 5), 32, 48, True),
                                                      (("n",), 64, 32, True)])
def test_rows16_rule_computes_the_same_numbers(lead, rows, depth, epilogue):
    """One row (decode), rows no tile divides (a tail tile), many rows, a batch axis (ViT), and a
    symbolic row count (a prefill chunk outside the buckets)."""
    from qcompile.run import layouts

    func = _rows16_projection(lead, rows, depth, epilogue)
    found = cpu_rules.default_schedule(func, HOST)
    assert found is not None and found[0] == "rows16"
    run = tvm.compile(found[1].mod, target=HOST).jit()["main"]
    rng = np.random.default_rng(0)
    shape = tuple(5 if d == "n" else d for d in lead)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((*shape, depth), (rows, depth), (rows,)))
    args = [x, layouts.pack(w, layouts.ROWS16, "w")] + ([b] if epilogue else [])
    out = tvm.runtime.tensor(np.zeros((*shape, rows), np.float32))
    run(*(tvm.runtime.tensor(a) for a in args), out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if epilogue else 0)
    # Each output is one float32 sum over `depth` products in order: within the textbook bound for that
    # (depth + 1) * 2^-24 * sum |x w| (+ |b|), elementwise.
    bound = (depth + 1) * 2.0 ** -24 * (np.abs(x) @ np.abs(w).T + (np.abs(b) if epilogue else 0))
    assert np.all(np.abs(out.numpy() - ref) <= bound)


def test_rows16_layout_round_trips():
    from qcompile.run import layouts

    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    packed = layouts.pack(w, layouts.ROWS16, "w")
    assert packed.shape == (2, 3, 16) and packed[1, 2, 5] == w[21, 2]  # row n at [n // 16, :, n % 16]
    np.testing.assert_array_equal(layouts.unpack(packed, layouts.ROWS16), w)
    assert layouts.unpacked_shape(packed.shape, layouts.ROWS16) == (32, 3)


def test_untuned_build_schedules_decode_projections_with_the_rule(tmp_path, debug_checkpoint, debug_library):
    manifest = qcompile.compile_model("qwen2-debug", out=tmp_path / "lib", max_seq_len=32, use_schedules=False,
                                      log=lambda _m: None)
    rules = manifest["cpu_rules"]
    assert set(rules.values()) == {"rows16", "attention"}  # every qwen2-debug weight's rows: 16 divides
    assert all(("matmul" in name) == (rule != "attention") for name, rule in rules.items())
    saved = json.loads((tmp_path / "lib" / "manifest.json").read_text())["cpu_rules"]
    assert saved == rules
    untuned = qcompile.load(tmp_path / "lib", weights=debug_checkpoint)
    tuned = qcompile.load(debug_library, weights=debug_checkpoint)  # committed schedules
    prompt = [3, 14, 15, 92]
    assert untuned.generate(prompt, 6).tolist() == tuned.generate(prompt, 6).tolist()
    ours, theirs = untuned.last_step_logits, tuned.last_step_logits  # every decode step's logits
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5


def test_a_database_tuned_before_the_rules_does_not_override_them(debug_library):
    """The committed databases were tuned when TVM's unscheduled lowering was candidate 0: their GEMV
    records never competed with the rule, so the rule schedules those kernels and the database the rest."""
    manifest = json.loads((debug_library / "manifest.json").read_text())
    rules, tuned = manifest["cpu_rules"], manifest["tuning_database"]["kernels"]["tuned"]
    assert rules and tuned and not set(rules) & set(tuned)

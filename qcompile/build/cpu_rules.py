"""qcompile's own default CPU schedules: what a kernel runs with when no tuning record serves it.

TVM's default llvm lowering schedules nothing (a decode step's matrix-vector products run as scalar
loops on one thread), and MetaSchedule's search does not find the shape a GEMV wants (its rfactor rule is
skipped when the output is longer than the reduction, so the LM head stays near 11 GB/s). These rules
give each kernel class a schedule written for it; `qcompile tune` measures that schedule as candidate 0,
so tuning only ever replaces it with something faster.

Rules (each returns None when the kernel is not of its class):
  gemv   y[1, N] = x[1, K] . W[N, K]^T (+ elementwise epilogues): the decode projections and the LM
         head. Each thread takes blocks of ROWS output rows; for a block it streams the rows' weights
         (contiguous along K) once, accumulating ROWS x LANES partial sums in registers (the reduction
         split into K/LANES steps of LANES lanes, an rfactor), then adds the lanes up and applies the
         epilogue while the block's results are hot.
"""

from __future__ import annotations

from typing import Any

RULE_ATTR = "qcompile.cpu_rule"  # block annotation: which rule scheduled the kernel (the trace keeps it)
GEMV_ROWS = 4  # output rows per register block (4 rows x LANES partial sums live in vector registers)


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector unit: 16 with AVX-512, 8 with AVX2, else 4."""
    features = set(str(f) for f in (target.attrs.get("mattr") or ()))
    try:
        from tvm.target import codegen  # noqa: PLC0415

        features |= set(codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 (a target without an LLVM CPU: the portable width)
        pass
    if "avx512f" in features:
        return 16
    return 8 if "avx2" in features or "avx" in features else 4


def _blocks(sch: Any) -> list[Any]:
    return sch.get_child_blocks(sch.get_sblock("root"))


def gemv(func: Any, target: Any) -> Any | None:
    """The schedule described above for a decode matrix-vector product, or None."""
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    try:
        blocks = _blocks(sch)
    except Exception:  # noqa: BLE001 (no root block: not a kernel written as blocks)
        return None
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1 or reductions[0] != blocks[0]:
        return None
    block = reductions[0]
    loops = sch.get_loops(block)
    extents = [_const(sch.get(loop).extent) for loop in loops]
    if len(loops) != 3 or None in extents or extents[0] != 1:
        return None
    _, rows, depth = extents
    lanes = vector_lanes(target)
    if not _reads_rows_along_k(sch, block) or depth % lanes or rows % GEMV_ROWS:
        return None
    if any(not _is_elementwise(sch, b) for b in blocks[1:]):
        return None
    batch, n, k = loops
    k_outer, k_lane = sch.split(k, [None, lanes])
    partial = sch.rfactor(k_lane, factor_axis=2)  # partial[1, N, lanes]: the lanes' running sums
    sch.annotate(partial, RULE_ATTR, "gemv")
    batch, n, k_outer, k_lane = sch.get_loops(partial)
    n_outer, n_inner = sch.split(n, [None, GEMV_ROWS])
    sch.reorder(batch, n_outer, k_outer, n_inner, k_lane)
    sch.parallel(sch.fuse(batch, n_outer))
    sch.set_scope(partial, 0, "local")
    outer = sch.get_loops(partial)[0]
    final = sch.get_sblock(sch.get(block).name_hint)
    sch.reverse_compute_at(final, outer)
    for epilogue in blocks[1:]:
        sch.reverse_compute_at(epilogue, outer)
    sch.decompose_reduction(partial, sch.get_loops(partial)[1])
    # The block's rows are independent accumulators: unrolled. The lane loop stays a plain loop that LLVM
    # vectorises (s_tir refuses to vectorise a reduction's update block: "no compact dataflow").
    sch.unroll(sch.get_loops(partial)[-2])
    return sch


def _const(expr: Any) -> int | None:
    return int(expr.value) if hasattr(expr, "value") else None


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars)  # CommReduce


def _is_elementwise(sch: Any, block: Any) -> bool:
    stmt = sch.get(block)
    return not _is_reduction(sch, block) and len(stmt.writes) == 1


def _reads_rows_along_k(sch: Any, block: Any) -> bool:
    """The weight is read W[n, k] (k innermost, contiguous), the input x[0, k]."""
    stmt = sch.get(block)
    n_var, k_var = stmt.iter_vars[1].var, stmt.iter_vars[2].var
    for region in stmt.reads:
        indices = [r.min for r in region.region]
        if len(indices) == 2 and indices[0].same_as(n_var) and indices[1].same_as(k_var):
            return True
    return False


RULES = {"gemv": gemv}


def default_schedule(func: Any, target: Any) -> tuple[str, Any] | None:
    """(rule name, schedule) of the first rule that takes this kernel, or None (TVM's default lowering
    then applies)."""
    for name, rule in RULES.items():
        sch = rule(func, target)
        if sch is not None:
            return name, sch
    return None

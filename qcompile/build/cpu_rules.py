"""qcompile's own default CPU schedules: what a kernel runs with when no tuning record serves it.

TVM's default llvm lowering schedules nothing (a decode step's matrix-vector products run as scalar
loops on one thread), and MetaSchedule's search does not find the shape a GEMV wants (its rfactor rule is
skipped when the output is longer than the reduction, so the LM head stays near 11 GB/s). These rules
give each kernel class a schedule written for it; `qcompile tune` measures that schedule as candidate 0,
so tuning only ever replaces it with something faster.

Rules (each returns None when the kernel is not of its class):
  gemv   y[1, N] = x[1, K] . W[N, K]^T (+ elementwise epilogues): the decode projections and the LM
         head. Each thread takes blocks of GEMV_ROWS output rows; for a block it streams the rows'
         weights (contiguous along K) once, accumulating rows x lanes partial sums in registers (the
         reduction split into K/lanes steps of `vector_lanes` lanes, an rfactor), then adds the lanes up
         and applies the epilogue while the block's results are hot.
  gemm   the same product for a static number of input rows n > 1 (the prefill bucket): register tiles
         of GEMM_TILE = (input rows, weight rows) with GEMM_LANES-lane partial sums each; threads take
         weight-row blocks, and each block's weights stay in L1 while every input-row block passes.
         (Measured on a 128x896 . 4864x896 product, one thread: 90 GFLOP/s with tile 4x4 and 8 lanes;
         16 lanes, or tiles of 2x8, 8x4, 4x8, ran at 42-68.)
  rows16  y[..., N] = x[..., K] . W^T with W stored `rows16` ([N/16, K, 16], `run.layouts`; the
         `rows16_matmul` kernels of float32 CPU builds), any number of rows, static or symbolic:
         register tiles of ROWS16_TILE_ROWS input rows x `vectors` runs of 16 output features; per
         input feature, the tile's weights are `vectors` contiguous 16-wide loads and every row adds
         x[row, k] (broadcast) times them: no horizontal sums, no strided loads. Threads take output
         blocks; the block's weights ([K, 16 x vectors], ~100 KB) stay in L2 while the rows pass.
         (Measured, 2 threads on an AVX-512 Xeon, 128 x 896 . 4864 x 896: 262-294 GFLOP/s for tiles
         4x2 and 6x2, twice the `gemm` rule on the HF layout; decode's 1 x 896 . 151936 x 896 reads
         32 GB/s.) Elementwise epilogues (bias, residual, activation) run on the tile while it is hot.
  gathered  the MoE experts' product over float weights [experts, r, K], each row through its own
         expert: threads over weight-row blocks, lanes-wide partial sums along K (a GEMV per row).
  attention  the two products of attention over the KV cache (`models.layers.attention_scores` and
         `attention_values`; their length is symbolic, so no tuning reaches them), each one product per
         source of keys (the buffers' filled slots, the chunk's rows): threads over (query, head) pairs;
         scores sum each dot product in lanes-wide partial sums; values accumulate a head's output row
         in registers while walking the rows in order (each row's head_dim values contiguous), instead of
         striding down a column. Elementwise epilogues (columns side by side, sum, scale, mask, cast)
         run on the threads too; so do the softmax between them (`attention_probs`), a row a thread.
"""

from __future__ import annotations

from typing import Any

RULE_ATTR = "qcompile.cpu_rule"  # block annotation: which rule scheduled the kernel (the trace keeps it)
GEMV_ROWS = 4  # output rows per register block (4 rows x lanes partial sums live in vector registers)
GEMM_TILE = (4, 4)  # (input rows, weight rows) per register tile: 16 accumulators of GEMM_LANES lanes
GEMM_LANES = 8
# Input rows per register tile of the packed rule (x `vectors` 16-wide accumulators): 6 (AVX2's 16 vector
# registers hold 6 x a 16-wide run of two); with AVX-512's 32 and a static row count (the prefill bucket,
# the ViT), 8. (Measured, qwen2-0.5b prefill of 128, 2-core AVX-512 Xeon: 744-780 ms with 8 rows, 952-998
# with 6.) A symbolic row count (a batch step of a few sequences) keeps 6: each row of a tile past the
# count is a predicated-off row, and batch steps of 1 ran 10% slower with 8.
ROWS16_TILE_ROWS, ROWS16_TILE_ROWS_AVX512_STATIC = 6, 8
# The product block of a packed weight's kernel (quant.kernels.matmul).
DEQUANTIZE_BLOCK = "dequantize_matmul"
NIBBLE_AXIS = "nibble"  # its q4 reduction axis over a byte's two nibbles
GATHERED_BLOCK = "gathered_acc"  # the product block of models.layers.gathered_matmul (float experts)
# The first block of the two attention products (models.layers.attention_scores / attention_values).
ATTENTION_BLOCKS = ("attention_scores", "attention_acc")
ATTENTION_PROBS_BLOCK = "attention_probs_max"  # the first block of models.layers.attention_probs


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


def first_block_name(func: Any) -> str | None:
    """The name of a kernel's first block (None: not written as blocks)."""
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    try:
        return sch.get(_blocks(sch)[0]).name_hint
    except Exception:  # noqa: BLE001 (no root block)
        return None


def gemv(func: Any, target: Any) -> Any | None:
    """The decode matrix-vector schedule described above, or None."""
    return _nt_matmul(func, rows_per_block=1, weight_rows=GEMV_ROWS, lanes=vector_lanes(target), rule="gemv")


def gemm(func: Any, target: Any) -> Any | None:
    """The prefill matrix-matrix schedule described above, or None (one input row: that is `gemv`)."""
    return _nt_matmul(func, rows_per_block=GEMM_TILE[0], weight_rows=GEMM_TILE[1], lanes=GEMM_LANES,
                      rule="gemm")


def _nt_matmul(func: Any, *, rows_per_block: int, weight_rows: int, lanes: int, rule: str) -> Any | None:
    """y[n, N] = x[n, K] . W[N, K]^T (+ elementwise epilogues) with static shapes, scheduled as register
    tiles of (rows_per_block input rows) x (weight_rows weight rows) x lanes partial sums. n == 1 for
    rows_per_block 1 (gemv), n > 1 and divisible by rows_per_block otherwise."""
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
    # A packed weight's product walks K in several reduction loops (quant.kernels.reduce_axes), the
    # innermost over consecutive bytes; a float one in one loop.
    packed = sch.get(block).name_hint == DEQUANTIZE_BLOCK
    if None in extents or (len(loops) != 3 and not (packed and len(loops) > 3)):
        return None
    n, rows, depth = extents[0], extents[1], extents[-1]
    if (n == 1) != (rows_per_block == 1) or n % rows_per_block or rows % weight_rows or depth % lanes:
        return None
    if not _reads_rows_along_k(sch, block) or any(not _is_elementwise(sch, b) for b in blocks[1:]):
        return None
    k_outer, k_lane = sch.split(loops[-1], [None, lanes])
    partial = sch.rfactor(k_lane, factor_axis=2)  # partial[n, N, lanes]: the lanes' running sums
    sch.annotate(partial, RULE_ATTR, rule)
    i, j, *k_outer, k_lane = sch.get_loops(partial)
    i_outer, i_inner = sch.split(i, [None, rows_per_block])
    j_outer, j_inner = sch.split(j, [None, weight_rows])
    # q4: both nibbles of the bytes a tile row loads are used in the tile (one load and widening each).
    nibbles = [loop for loop in k_outer if sch.get(loop).loop_var.name == NIBBLE_AXIS]
    k_outer = [loop for loop in k_outer if loop not in nibbles]
    # Threads take weight-row blocks; under one, every input-row block reuses its weights from L1.
    sch.reorder(j_outer, i_outer, *k_outer, i_inner, j_inner, *nibbles, k_lane)
    sch.parallel(j_outer)
    sch.set_scope(partial, 0, "local")
    tile = sch.get_loops(partial)[1]  # i_outer: one register tile's results are complete under it
    sch.reverse_compute_at(sch.get_sblock(sch.get(block).name_hint), tile)
    for epilogue in blocks[1:]:
        sch.reverse_compute_at(epilogue, tile)
    sch.decompose_reduction(partial, sch.get_loops(partial)[2])
    # The tile's rows and weight rows are independent accumulators: unrolled. The lane loop stays a plain
    # loop that LLVM vectorises (s_tir refuses to vectorise a reduction's update: "no compact dataflow").
    update = sch.get_loops(partial)
    for loop in update[-3 - len(nibbles):-1]:  # input rows, weight rows (, nibbles)
        sch.unroll(loop)
    return sch


def _const(expr: Any) -> int | None:
    return int(expr.value) if hasattr(expr, "value") else None


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars)  # CommReduce


def _is_elementwise(sch: Any, block: Any) -> bool:
    stmt = sch.get(block)
    return not _is_reduction(sch, block) and len(stmt.writes) == 1


def _reads_rows_along_k(sch: Any, block: Any) -> bool:
    """The weight is read W[n, k] (k innermost, contiguous), the input x[0, k]; a packed weight
    W[n, f(k)] with its innermost reduction variable in f."""
    from tvm.tirx.analysis import undefined_vars  # noqa: PLC0415

    stmt = sch.get(block)
    n_var, k_var = stmt.iter_vars[1].var, stmt.iter_vars[-1].var
    for region in stmt.reads:
        indices = [r.min for r in region.region]
        if len(indices) != 2 or not indices[0].same_as(n_var):
            continue
        if indices[1].same_as(k_var):
            return True
        if len(stmt.iter_vars) > 3 and any(v.same_as(k_var) for v in undefined_vars(indices[1])):
            return True
    return False


def attention(func: Any, target: Any) -> Any | None:
    """The attention-product schedule described above, or None. A kernel holds one product per source of
    keys (the KV buffers' filled slots, the chunk's own rows: `models.layers`), each scheduled alike,
    then elementwise blocks (columns side by side / the sum, scale, mask, cast)."""
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    try:
        blocks = _blocks(sch)
    except Exception:  # noqa: BLE001 (no root block: not a kernel written as blocks)
        return None
    first = sch.get(blocks[0]).name_hint
    if first == ATTENTION_PROBS_BLOCK:  # softmax over each row of scores: rows in parallel, each block
        for block in blocks:
            sch.parallel(sch.fuse(*sch.get_loops(block)[:2]))
        sch.annotate(blocks[0], RULE_ATTR, "attention")
        return sch
    if first not in ATTENTION_BLOCKS:
        return None
    names = [sch.get(b).name_hint for b in blocks if _is_reduction(sch, b)]
    epilogues = [b for b in blocks if not _is_reduction(sch, b)]
    if first == "attention_acc":  # [n, h, d] += probs[h, n, j] * v[j, kv, d] over the rows j
        for name in names:
            block = sch.get_sblock(name)
            i, head, dim, row = sch.get_loops(block)
            sch.reorder(i, head, row, dim)
            pairs = sch.fuse(i, head)
            sch.parallel(pairs)
            sch.annotate(block, RULE_ATTR, "attention")
            accumulator = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(accumulator, pairs)
            sch.decompose_reduction(block, sch.get_loops(block)[1])
    else:  # [h, n, j] = q[n, h, :] . k[j, kv, :]
        lanes = vector_lanes(target)
        for name in names:
            block = sch.get_sblock(name)
            head, i, row, dim = sch.get_loops(block)
            if _const(sch.get(dim).extent) is None or _const(sch.get(dim).extent) % lanes:
                return None
            # Each dot product over head_dim in `lanes`-wide partial sums (an rfactor), added up per row.
            dim_outer, dim_lane = sch.split(dim, [None, lanes])
            partial = sch.rfactor(dim_lane, factor_axis=3)
            sch.annotate(partial, RULE_ATTR, "attention")
            sch.set_scope(partial, 0, "local")
            head, i, row, dim_outer, dim_lane = sch.get_loops(partial)
            sch.reorder(head, i, row, dim_outer, dim_lane)
            sch.parallel(sch.fuse(head, i))
            row = sch.get_loops(partial)[1]
            sch.reverse_compute_at(sch.get_sblock(name), row)
            sch.decompose_reduction(partial, sch.get_loops(partial)[2])
    for epilogue in epilogues:
        sch.parallel(sch.fuse(*sch.get_loops(epilogue)[:2]))
    return sch


def rows16(func: Any, target: Any) -> Any | None:
    """The rows16 matrix-product schedule described above, or None."""
    from tvm import s_tir  # noqa: PLC0415

    from ..run.layouts import PACK_LANES  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    try:
        blocks = _blocks(sch)
    except Exception:  # noqa: BLE001 (no root block: not a kernel written as blocks)
        return None
    if sch.get(blocks[0]).name_hint != "rows16_matmul":
        return None
    block = blocks[0]
    *batch, rows, column, depth = sch.get_loops(block)  # batch loops (ViT's images) stay outermost:
    # fusing them into the rows and splitting the fused loop into tiles computed wrong results for a
    # symbolic batch (TVM 0.27), so each image's rows are tiled on their own.
    n = _const(sch.get(column).extent)
    # Two 16-wide runs per tile where a register holds 16 floats (6 x 2 accumulators of 32 registers);
    # one on narrower units (AVX2: a run is two registers already).
    vectors = 2 if vector_lanes(target) >= 16 and n % (2 * PACK_LANES) == 0 else 1
    row_count = _const(sch.get(rows).extent)
    tile_rows = 1 if row_count == 1 else ROWS16_TILE_ROWS_AVX512_STATIC \
        if row_count is not None and vector_lanes(target) >= 16 else ROWS16_TILE_ROWS
    col_outer, col_vector, col_lane = sch.split(column, [None, vectors, PACK_LANES])
    row_outer, row_inner = sch.split(rows, [None, tile_rows])
    sch.reorder(*batch, col_outer, row_outer, depth, row_inner, col_vector, col_lane)
    sch.parallel(col_outer)
    sch.annotate(block, RULE_ATTR, "rows16")
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, row_outer)
    for epilogue in blocks[1:]:  # elementwise epilogues on the finished tile; others run after
        trial = sch.copy()
        try:
            trial.reverse_compute_at(epilogue, trial.get_loops(accumulators)[len(batch) + 1])
        except Exception:  # noqa: BLE001 (reads more than the tile: e.g. SwiGLU's split halves)
            break
        sch = trial
    sch.unroll(row_inner)
    sch.unroll(col_vector)
    sch.vectorize(col_lane)
    sch.decompose_reduction(block, depth)
    outer = sch.get(col_outer)
    for later in _blocks(sch):  # epilogues left at the root: their outer loop on the threads
        loops = sch.get_loops(later)
        if loops and not any(sch.get(loop).same_as(outer) for loop in loops) \
                and all(int(iv.iter_type) == 0 for iv in sch.get(later).iter_vars):
            sch.parallel(loops[0])
    return sch


def gathered(func: Any, target: Any) -> Any | None:
    """The MoE experts' product (`models.layers.gathered_matmul`, float weights): out[i, j] = sum_k
    x[i, k] * W[expert[i], j, k]. Every row reads its own expert's matrix, so rows share no weights and
    each is a GEMV: threads over blocks of GEMV_ROWS weight rows, each dot product in lanes-wide partial
    sums (an rfactor, as `gemv`), the cast epilogue on the block while it is hot."""
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    try:
        blocks = _blocks(sch)
    except Exception:  # noqa: BLE001 (no root block: not a kernel written as blocks)
        return None
    if sch.get(blocks[0]).name_hint != GATHERED_BLOCK:
        return None
    block = blocks[0]
    i, j, k = sch.get_loops(block)
    lanes = vector_lanes(target)
    depth, rows = _const(sch.get(k).extent), _const(sch.get(j).extent)
    if depth is None or depth % lanes or rows is None or rows % GEMV_ROWS:
        return None
    k_outer, k_lane = sch.split(k, [None, lanes])
    partial = sch.rfactor(k_lane, factor_axis=2)  # partial[m, r, lanes]
    sch.annotate(partial, RULE_ATTR, "gathered")
    i, j, k_outer, k_lane = sch.get_loops(partial)
    j_outer, j_inner = sch.split(j, [None, GEMV_ROWS])
    # Threads take weight-row blocks; under one, each input row (its own expert) in turn. (Fusing the
    # row and block loops into one parallel loop computed wrong results with the epilogues moved in.)
    sch.reorder(j_outer, i, k_outer, j_inner, k_lane)
    sch.parallel(j_outer)
    sch.set_scope(partial, 0, "local")
    row = sch.get_loops(partial)[1]
    sch.reverse_compute_at(sch.get_sblock(GATHERED_BLOCK), row)
    shape = [r.extent for r in sch.get(block).writes[0].region]
    for epilogue in blocks[1:]:  # the cast, and elementwise ops of the same shape fused after it
        if not _is_elementwise(sch, epilogue) or \
                [str(r.extent) for r in sch.get(epilogue).writes[0].region] != [str(e) for e in shape]:
            break
        sch.reverse_compute_at(epilogue, row)
    sch.decompose_reduction(partial, sch.get_loops(partial)[2])
    sch.unroll(sch.get_loops(partial)[-2])
    return sch


RULES = {"rows16": rows16, "gemv": gemv, "gemm": gemm, "attention": attention, "gathered": gathered}


def default_schedule(func: Any, target: Any) -> tuple[str, Any] | None:
    """(rule name, schedule) of the first rule that takes this kernel, or None (TVM's default lowering
    then applies)."""
    for name, rule in RULES.items():
        sch = rule(func, target)
        if sch is not None:
            return name, sch
    return None

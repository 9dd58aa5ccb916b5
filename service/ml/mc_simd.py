"""The fused CPU path's matmuls: register-tiled float32 GEMM micro-kernels written as LLVM vector IR.

The MC engine's matmuls are small and oddly shaped: a block of a few hundred rows times a layer
of 13 to a few hundred inputs and outputs, e.g. ``[800, 13] @ [13, 50]`` for the UCI net. A BLAS
is tuned for large square products; on such shapes it spends its time packing and dispatching
(MKL: 44-56 GFLOP/s on ``[800, 13] @ [13, 50]`` on an AMD EPYC where ``[6400, 64] @ [64, 64]`` runs at
80-90). These kernels skip all that, since a layer's weights (at most a few tens of KiB) stay in
the core's L1 cache anyway:

* :func:`gemm` computes ``C [n, m] = A [n, k] @ B [k, m]`` tile by tile: a few rows by a few
  vectors of columns, one accumulator per row and vector held in a register over the whole ``k``
  loop, each step one broadcast of ``A[r, q]`` per row and one load of ``B[q, j:j+lanes]`` per
  vector, fused multiply-adds. The tiles are emitted as LLVM IR (``<lanes x float>`` and
  ``llvm.fma``) through numba intrinsics, compiled for the host's vector unit like the rest of
  numba's code.
* :func:`dot_rows` computes a layer with at most 4 outputs as dot products along the rows (a
  vector tile would use at most 4 of its lanes); :func:`layer_dot` computes such a last layer
  straight from the registers of the tiles of the layer before it, where that layer fits one tile
  (with 8 lanes, tiles of 2 rows by up to 7 vectors: the layer's columns reloaded per row, each
  load folded into its FMA, so that 14 accumulators fit AVX2's 16 registers).
* The masks' random words are drawn here too (:func:`splitmix_words`, with a flag bit per byte
  that needs its low byte drawn): as 512-bit vector code, which numba's loop vectorizer does not
  emit on Intel's AVX-512 parts.

Two vector widths are compiled in, and every kernel takes the one to use (``lanes``): 16 floats
(512 bits, AVX-512: 32 vector registers, so tiles of up to 24 accumulators) and 8 floats (256
bits, AVX2: 16 registers, tiles of up to 12). :data:`LANES` is the one the engine uses: 16 where
numba compiles for AVX-512, else 8. On an Intel Xeon (Emerald Rapids) 16 lanes ran the engine's
``[800, 64] @ [64, 64]`` 1.9x as fast as 8 (two 512-bit FMA units: ~150 GFLOP/s on one core); a
vector of 16 where the target has only 256-bit registers is split in two by LLVM, correct but no
faster.

The weights come padded: ``B`` has :func:`padded` (m, lanes) columns, so that every vector load
of a row stays inside it; the lanes past ``m`` are computed and never stored. Sums are
accumulated in float32 in order over ``k``, one fused multiply-add each, so the results differ
from a BLAS's by rounding only (relative 1e-7 to 1e-6), and not at all between the two widths
(but for the dot products, summed across lanes).
"""

from __future__ import annotations

import contextlib

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

NARROW, WIDE = 8, 16  # floats per vector: 256 and 512 bits
DOT_OUTPUTS = 4  # layers with at most this many outputs take dot_rows
WORD_STEP = 8  # splitmix_words draws and tests this many uint64 words at a time (512 bits): one flag word

# The tiles per width: (rows, vectors), widest first, a tile's accumulators (rows · vectors) and
# its column loads (vectors) within the vector registers: 32 with AVX-512, 16 with AVX2. A tile
# of fewer than 8 accumulators would wait on the FMAs' latency (4 cycles, 2 units).
_WIDE_SHAPES = ((6, 4), (8, 3), (12, 2), (16, 1))
_NARROW_SHAPES = ((4, 3), (4, 2), (12, 1))
_SHAPES = {WIDE: _WIDE_SHAPES, NARROW: _NARROW_SHAPES}
# layer_dot's tiles hold whole rows of the layer. With 8 lanes also 4 to 7 vectors (up to 56
# columns, the UCI net's 50 units) in tiles of 2 rows: up to 14 accumulators, the columns' loads
# folded into the FMAs as memory operands, rather than storing the layer and going over it again.
_NARROW_DOT_SHAPES = _NARROW_SHAPES + ((2, 4), (2, 5), (2, 6), (2, 7))
_DOT_SHAPES = {WIDE: _WIDE_SHAPES, NARROW: _NARROW_DOT_SHAPES}
_F32 = ir.FloatType()
_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)


def _target_is_avx512() -> bool:
    """Whether numba compiles for AVX-512 (its target features: NUMBA_CPU_FEATURES, else the host's)."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return "+avx512f" in str(features).split(",")


_AVX512 = _target_is_avx512()
LANES = WIDE if _AVX512 else NARROW  # the width the engine uses
_REGISTERS = 32 if _AVX512 else 16
# the tiles' (empty) inline asm (see _emit_tile) goes through LLVM's assembler, which numba leaves out
llvmlite.binding.initialize_native_asmparser()


_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)


def _index(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    """``value`` in every lane of a vector of ``lanes``."""
    kind = ir.VectorType(value.type, lanes)
    first = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    return builder.shuffle_vector(first, ir.Constant(kind, ir.Undefined), zeros)


def _vector_at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, kind: ir.VectorType) -> ir.Value:
    return builder.bitcast(builder.gep(base, [offset]), kind.as_pointer())


def _sum_lanes(builder: ir.IRBuilder, vector: ir.Value, lanes: int) -> ir.Value:
    """The sum of a vector's lanes: halves added pairwise (lanes 0..width/2 hold the partial sums)."""
    width = lanes
    while width > 1:
        width //= 2
        upper = [i + width if i < width else i for i in range(lanes)]
        shifted = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, lanes), upper))
        vector = builder.fadd(vector, shifted)
    return builder.extract_element(vector, ir.Constant(_I32, 0))


def _emit_tile(builder: ir.IRBuilder, lanes: int, rows: int, vectors: int, args: list[ir.Value], dot: bool,
               one_output: bool = False) -> None:
    """Emit one tile ``(a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold, w2,
    ldw2, outs, out2, ldo, bias2, relu2)`` (addresses; strides in elements): for ``rows`` rows and
    ``vectors`` vectors of ``lanes`` columns,

        ``C[r, j] = act(bias[j] + Σ_q A[r, q] · B[q, j]) · (mask[r · ldm + j] >= threshold)``,

    ``act`` the ReLU where ``relu`` is nonzero, else the identity; ``mask`` bytes (0/1 as the
    kernels of :mod:`service.ml.mc_kernels` compare them). The last vector stores only its first
    ``last`` lanes (1 to lanes); every vector of ``bias`` and ``mask`` is loaded whole.

    With ``dot`` the tile holds whole rows of C and, instead of storing them, computes the next
    (last, narrow) layer from its registers: ``out2[r, o] = act2(bias2[o] + Σ_j w2[o, j] · C[r, j])``
    for ``o < outs`` (at most DOT_OUTPUTS), ``w2`` zero past the columns of C: per row and output
    the products summed across the vectors (pairwise: short dependency chains), then across the
    lanes, the rows' sums folded together (:func:`_sum_rows`). With ``one_output`` the tile is
    for ``outs`` = 1 only: no test of ``outs``, the sums kept in registers."""
    a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold = args[:13]
    w2, ldw2, outs, out2, ldo, bias2, relu2 = args[13:]
    a, b, c, bias, w2, out2, bias2 = (builder.inttoptr(p, _F32.as_pointer()) for p in (a, b, c, bias, w2, out2, bias2))
    mask = builder.inttoptr(mask, _I8.as_pointer())
    floats = ir.VectorType(_F32, lanes)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats] * 3), f"llvm.fma.v{lanes}f32")
    zero = ir.Constant(floats, [0.0] * lanes)
    biases = [builder.load(_vector_at(builder, bias, _index(v * lanes), floats), align=4) for v in range(vectors)]
    # the sums start at the bias: bias + Σ_q, one rounding fewer than adding it after
    sums = [[cgutils.alloca_once_value(builder, biases[v]) for v in range(vectors)] for _ in range(rows)]
    # Where the accumulators, the columns and a broadcast do not all fit the vector registers, each
    # row loads the columns again, through a pointer LLVM cannot see is the same (passed through an
    # empty inline asm, row after row), so that it folds each load into its FMA instead of keeping
    # the columns and spilling them to the stack.
    shared = rows * vectors + vectors + 1 <= _REGISTERS
    same = ir.FunctionType(b.type, [b.type])
    with cgutils.for_range(builder, depth) as loop:
        q = loop.index
        b_row = builder.gep(b, [builder.mul(q, ldb)])
        columns = [builder.load(_vector_at(builder, b_row, _index(v * lanes), floats), align=4)
                   for v in range(vectors)] if shared else []
        for r in range(rows):
            x = _splat(builder, builder.load(builder.gep(a, [builder.add(builder.mul(_index(r), lda), q)])), lanes)
            if not shared:
                b_row = b_row if r == 0 else builder.asm(same, "", "=r,0", [b_row], False)
                columns = [builder.load(_vector_at(builder, b_row, _index(v * lanes), floats), align=4)
                           for v in range(vectors)]
            for v in range(vectors):
                builder.store(builder.call(fma, [x, columns[v], builder.load(sums[r][v])]), sums[r][v])

    def floor_of(flag: ir.Value) -> ir.Value:  # ReLU as max(x, floor): floor 0, or -inf (the identity)
        return builder.select(builder.icmp_signed("!=", flag, _index(0)),
                              ir.Constant(_F32, 0.0), ir.Constant(_F32, float("-inf")))

    def at_least(x: ir.Value, floor: ir.Value) -> ir.Value:  # max(x, floor): one vmaxps
        return builder.select(builder.fcmp_ordered(">", x, floor), x, floor)

    floor = _splat(builder, floor_of(relu), lanes)
    kept_of = _kept_test(builder, threshold, lanes)
    lane_numbers = ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes)))
    stored = builder.icmp_unsigned("<", lane_numbers, _splat(builder, builder.trunc(last, _I32), lanes))
    store_some = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [floats, _F32.as_pointer(), _I32, stored.type]),
        f"llvm.masked.store.v{lanes}f32.p0")
    floor2 = _splat(builder, floor_of(relu2), lanes)
    # with dot: per output, each row's products summed over its vectors (filled row by row, so
    # that only one row's values are live at a time)
    outputs = (1 if one_output else DOT_OUTPUTS) if dot else 0
    products: list[list[ir.Value]] = [[] for _ in range(outputs)]

    def for_output(o: int):  # noqa: ANN202 (a context manager)
        return contextlib.nullcontext() if one_output else builder.if_then(builder.icmp_signed("<", _index(o), outs))
    for r in range(rows):
        c_row = builder.gep(c, [builder.mul(_index(r), ldc)])
        mask_row = builder.gep(mask, [builder.mul(_index(r), ldm)])
        values = []
        for v in range(vectors):
            x = builder.select(kept_of(builder.gep(mask_row, [_index(v * lanes)])),
                               at_least(builder.load(sums[r][v]), floor), zero)
            values.append(x)
            if dot:
                continue
            at = builder.gep(c_row, [_index(v * lanes)])
            if v < vectors - 1:
                builder.store(x, builder.bitcast(at, floats.as_pointer()), align=4)
            else:  # the last vector: only its first `last` lanes
                builder.call(store_some, [x, at, ir.Constant(_I32, 4), stored])
        for o in range(outputs):
            with for_output(o):
                w_row = builder.gep(w2, [builder.mul(_index(o), ldw2)])
                w = [builder.load(_vector_at(builder, w_row, _index(v * lanes), floats), align=4) for v in range(vectors)]
                # pairs of vectors (a product and an FMA), then the pairs added pairwise
                terms = [builder.fmul(values[v], w[v]) if v + 1 == vectors
                         else builder.call(fma, [values[v + 1], w[v + 1], builder.fmul(values[v], w[v])])
                         for v in range(0, vectors, 2)]
                while len(terms) > 1:
                    terms = [builder.fadd(*terms[i : i + 2]) if i + 1 < len(terms) else terms[i]
                             for i in range(0, len(terms), 2)]
                if one_output:
                    products[o].append(terms[0])
                else:  # through memory: the value leaves the if's block
                    products[o].append(cgutils.alloca_once_value(builder, zero))
                    builder.store(terms[0], products[o][r])
    for o in range(outputs):
        with for_output(o):
            bias_o = _splat(builder, builder.load(builder.gep(bias2, [_index(o)])), lanes)
            row_sums = products[o] if one_output else [builder.load(p) for p in products[o]]
            for total, rows_in in _sum_rows(builder, row_sums, lanes):
                total = at_least(builder.fadd(total, bias_o), floor2)
                for lane, r in enumerate(rows_in):
                    if r is not None:
                        at = builder.gep(out2, [builder.add(builder.mul(_index(r), ldo), _index(o))])
                        builder.store(builder.extract_element(total, ir.Constant(_I32, lane)), at)


def _kept_test(builder: ir.IRBuilder, threshold: ir.Value, lanes: int):  # noqa: ANN202
    """``kept(address)``: the ``lanes`` mask bytes at ``address`` (i8 pointer) >= ``threshold``
    (0 to 255), as a vector of i1. With AVX-512 the bytes are compared as they are (into a mask
    register); with AVX2 widened to 32-bit lanes first (one load that widens, one compare), which
    leaves the select a plain AND rather than byte compares, an inversion and a widening."""
    if _AVX512:
        limit = _splat(builder, builder.trunc(threshold, _I8), lanes)
        kind = ir.VectorType(_I8, lanes)
        return lambda at: builder.icmp_unsigned(">=", builder.load(builder.bitcast(at, kind.as_pointer()), align=1),
                                                limit)
    below = _splat(builder, builder.trunc(builder.sub(threshold, _index(1)), _I32), lanes)  # >= t is > t - 1
    kind, wide = ir.VectorType(_I8, lanes), ir.VectorType(_I32, lanes)
    return lambda at: builder.icmp_signed(">", builder.zext(builder.load(builder.bitcast(at, kind.as_pointer()),
                                                                         align=1), wide), below)


def _sum_rows(builder: ir.IRBuilder, vectors: list[ir.Value], lanes: int) -> list[tuple[ir.Value, list[int | None]]]:
    """The sums of the lanes of each of ``vectors`` (one per row), several rows to a vector: pairs
    of vectors are folded into one (each row's halves added, the rows side by side) until each row
    is one lane. Returns ``(vector, rows)``: lane ``i`` of the vector holds the sum of row
    ``rows[i]`` (None: a lane that holds no row). Each row's lanes are added in the pairs of
    :func:`_sum_lanes` (the same sums), with about a third of its shuffles and adds for 6 rows."""
    groups: list[tuple[ir.Value, list[int | None]]] = [(vector, [r]) for r, vector in enumerate(vectors)]
    width = lanes  # lanes per row
    while width > 1:
        half, folded = width // 2, []
        for i in range(0, len(groups), 2):
            a, rows_a = groups[i]
            b, rows_b = groups[i + 1] if i + 1 < len(groups) else (a, [None] * len(groups[i][1]))
            count = len(rows_a)  # rows per vector: count · width == lanes
            low = [side * lanes + t * width + j for side in (0, 1) for t in range(count) for j in range(half)]
            high = [index + half for index in low]
            kind = ir.VectorType(_I32, lanes)
            folded.append((builder.fadd(builder.shuffle_vector(a, b, ir.Constant(kind, low)),
                                        builder.shuffle_vector(a, b, ir.Constant(kind, high))), rows_a + rows_b))
        groups, width = folded, half
    return groups


@njit(inline="always")
def _case(lanes, rows, vectors):  # noqa: ANN001, ANN202 (numba)
    """The number a tile's variant goes by in the jump tables of :func:`_rows` and ``_dots``."""
    return (lanes * 100 + rows) * 100 + vectors


ONE_OUTPUT = 1_000_000  # added to a layer_dot case: the tiles for a last layer of one output


def _rows_function(module: ir.Module, lanes: int, tall: int, vectors: int, dot: bool, one_output: bool) -> ir.Function:
    """The LLVM function ``(n, a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold,
    w2, ldw2, outs, out2, ldo, bias2, relu2)`` that runs ``n`` rows of :func:`_emit_tile`'s tile
    (``vectors`` vectors, with ``dot`` or not): tiles of ``tall`` rows, then one row at a time;
    emitted once per module. A function of its own, not inlined: a loop of plain tiles in a small
    stack frame, with nothing of its caller's held in registers (inlined into a kernel's jump
    table, the tiles spilled that function's values around them), and each tile's epilogue free
    to overlap the next tile's loop."""
    name = f"mcdrop_rows_{lanes}_{tall}_{vectors}_{int(dot)}_{int(one_output)}"
    if name in module.globals:
        return module.globals[name]
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [_I64] * 21), name)
    function.linkage = "internal"
    function.attributes.add("noinline")
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    n, a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold, *rest = function.args
    w2, ldw2, outs, out2, ldo, bias2, relu2 = rest
    size = _index(4)  # bytes per float

    def tile_at(r: ir.Value, rows: int) -> None:
        def at(base: ir.Value, stride: ir.Value, unit: ir.Value | None = size) -> ir.Value:
            step = builder.mul(r, stride)
            return builder.add(base, builder.mul(step, unit) if unit is not None else step)

        _emit_tile(builder, lanes, rows, vectors,
                   [at(a, lda), lda, b, ldb, at(c, ldc), ldc, depth, last, bias, relu, at(mask, ldm, None), ldm,
                    threshold, w2, ldw2, outs, at(out2, ldo), ldo, bias2, relu2], dot, one_output)

    whole = builder.udiv(n, _index(tall))
    with cgutils.for_range(builder, whole) as loop:
        tile_at(builder.mul(loop.index, _index(tall)), tall)
    with cgutils.for_range_slice(builder, builder.mul(whole, _index(tall)), n, _index(1)) as (r, _):
        tile_at(r, 1)
    builder.ret_void()
    return function


def _rows(dot: bool):  # noqa: ANN202 (a numba intrinsic)
    """The intrinsic ``rows(case, n, a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm,
    threshold, w2, ldw2, outs, out2, ldo, bias2, relu2)``: ``n`` rows (from ``a``, ``c``, ``mask``
    and ``out2``) of the tile of :func:`_emit_tile` (with ``dot`` or not) for ``_case(lanes, rows,
    vectors)``, one of ``_SHAPES`` (with ``dot``: ``_DOT_SHAPES``, and ``+ ONE_OUTPUT`` for
    ``outs`` = 1), by :func:`_rows_function`'s loop; any other case does nothing. A jump table picks
    the function."""
    cases = [(lanes, rows, vectors, one) for lanes, shapes in (_DOT_SHAPES if dot else _SHAPES).items()
             for rows, vectors in shapes for one in ((False, True) if dot else (False,))]

    @intrinsic
    def rows(typingctx, case, n, a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold,  # noqa: ANN001
             w2, ldw2, outs, out2, ldo, bias2, relu2):  # noqa: ANN001, ANN202, ARG001
        signature = types.void(*([types.intp] * 22))

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            case, rest = args[0], list(args[1:])
            done = builder.append_basic_block("rows.done")
            switch = builder.switch(case, done)
            for lanes, tall, vectors, one in cases:
                block = builder.append_basic_block(f"rows.{lanes}.{tall}.{vectors}.{int(one)}")
                switch.add_case(_index(_case.py_func(lanes, tall, vectors) + (ONE_OUTPUT if one else 0)), block)
                builder.position_at_end(block)
                builder.call(_rows_function(builder.module, lanes, tall, vectors, dot, one), rest)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return signature, codegen

    return rows


# Each compiled into the kernel that calls it: layer's tiles store C, layer_dot's feed the last layer.
_ROWS, _ROWS_DOT = _rows(dot=False), _rows(dot=True)


def _emit_dots(builder: ir.IRBuilder, lanes: int, rows: int, args: list[ir.Value]) -> None:
    """``C[r] = Σ_q A[r, q] · w[q]``, ``q < depth``, for ``rows`` rows of ``(a, lda, w, c, ldc,
    depth)`` (addresses; strides in floats): a vector of partial sums per row over whole vectors of
    ``q`` (independent chains), summed across its lanes, then the last ``depth % lanes`` terms in order."""
    a, lda, w, c, ldc, depth = args
    floats = ir.VectorType(_F32, lanes)
    chunks = builder.udiv(depth, _index(lanes))
    rest = builder.mul(chunks, _index(lanes))
    a, w, c = (builder.inttoptr(p, _F32.as_pointer()) for p in (a, w, c))
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats] * 3), f"llvm.fma.v{lanes}f32")
    sums = [cgutils.alloca_once_value(builder, ir.Constant(floats, [0.0] * lanes)) for _ in range(rows)]
    with cgutils.for_range(builder, chunks) as loop:
        q = builder.mul(loop.index, _index(lanes))
        weights = builder.load(_vector_at(builder, w, q, floats), align=4)
        for r in range(rows):
            x = builder.load(_vector_at(builder, a, builder.add(builder.mul(_index(r), lda), q), floats), align=4)
            builder.store(builder.call(fma, [x, weights, builder.load(sums[r])]), sums[r])
    for r in range(rows):
        result = cgutils.alloca_once_value(builder, _sum_lanes(builder, builder.load(sums[r]), lanes))
        a_row = builder.gep(a, [builder.mul(_index(r), lda)])
        with cgutils.for_range_slice(builder, rest, depth, _index(1)) as (q, _):
            term = builder.fmul(builder.load(builder.gep(a_row, [q])), builder.load(builder.gep(w, [q])))
            builder.store(builder.fadd(builder.load(result), term), result)
        builder.store(builder.load(result), builder.gep(c, [builder.mul(_index(r), ldc)]))


_DOT_ROWS = 4
_DOTS = [(lanes, rows) for lanes in _SHAPES for rows in (_DOT_ROWS, 1)]


@intrinsic
def _dots(typingctx, case, a, lda, w, c, ldc, depth):  # noqa: ANN001, ANN202, ARG001
    """The intrinsic ``_dots(case, a, lda, w, c, ldc, depth)``: :func:`_emit_dots` for the
    ``_case(lanes, rows, 1)`` of one of ``_DOTS`` (any other does nothing)."""
    signature = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        case, rest = args[0], list(args[1:])
        done = builder.append_basic_block("dots.done")
        switch = builder.switch(case, done)
        for lanes, rows in _DOTS:
            block = builder.append_basic_block(f"dots.{lanes}.{rows}")
            switch.add_case(_index(_case.py_func(lanes, rows, 1)), block)
            builder.position_at_end(block)
            _emit_dots(builder, lanes, rows, rest)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


_WORDS = ir.VectorType(_I64, WORD_STEP)


def _emit_flags(builder: ir.IRBuilder, x: ir.Value, repeated: ir.Value, flags: ir.Value, step: ir.Value) -> None:
    """For the vector ``x`` of WORD_STEP words: ``flags[step]`` (a uint64) gets bit ``b`` set
    where byte ``b`` of the vector equals the byte of ``repeated`` (the pattern in every lane): the
    bytes compared at once (into a mask of their bits: ``vpmovmskb``) and stored every step, without
    a branch (about one step in 4 has such a byte at p = 0.05, which the predictor cannot learn)."""
    byte_vector = ir.VectorType(_I8, 8 * WORD_STEP)
    equal = builder.icmp_unsigned("==", builder.bitcast(x, byte_vector), builder.bitcast(repeated, byte_vector))
    builder.store(builder.bitcast(equal, ir.IntType(8 * WORD_STEP)), builder.gep(flags, [step]))


def _splitmix(builder: ir.IRBuilder, z: ir.Value) -> ir.Value:
    """splitmix64's output mix of ``z`` (``key + (counter + 1) · golden``), lane by lane."""
    kind = z.type

    def constant(value: int) -> ir.Constant:
        return ir.Constant(kind, [value] * kind.count)

    z = builder.mul(builder.xor(z, builder.lshr(z, constant(30))), constant(_MIX1))
    z = builder.mul(builder.xor(z, builder.lshr(z, constant(27))), constant(_MIX2))
    return builder.xor(z, builder.lshr(z, constant(31)))


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _counters(builder: ir.IRBuilder, key: ir.Value, first: ir.Value) -> ir.Value:
    """``key + (first + i + 1) · golden`` for the lanes i < WORD_STEP: splitmix64's state."""
    counters = builder.add(_splat(builder, first, WORD_STEP), ir.Constant(_WORDS, list(range(1, WORD_STEP + 1))))
    golden = ir.Constant(_WORDS, [_GOLDEN] * WORD_STEP)
    return builder.add(_splat(builder, key, WORD_STEP), builder.mul(counters, golden))


@intrinsic
def _splitmix_words(typingctx, words, count, key, base, pattern, flags):  # noqa: ANN001, ANN202, ARG001
    """``_splitmix_words(words, count, key, base, pattern, flags)`` (addresses of two uint64
    arrays): ``words[i] = splitmix64(key, base + i)`` for ``i < count - count % WORD_STEP`` (the
    generator of :mod:`service.ml.mc_kernels`), in whole vectors of WORD_STEP words; where
    ``flags`` is not 0, also a uint64 per vector, bit ``b`` set where its byte ``b`` equals the byte
    repeated in ``pattern`` (:func:`_emit_flags`). Written out as vector IR because
    numba's loop vectorizer stops at 256 bits on Intel's AVX-512 parts: 512-bit multiplies drew the
    words 2.2x as fast there (Emerald Rapids), and the test of each vector costs little while it is
    in registers."""
    signature = types.void(types.intp, types.intp, types.uint64, types.uint64, types.uint64, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        words, count, key, base, pattern, flags = args
        searching = builder.icmp_unsigned("!=", flags, _index(0))
        words, flags = (builder.inttoptr(p, _I64.as_pointer()) for p in (words, flags))
        repeated = _splat(builder, pattern, WORD_STEP)
        z = cgutils.alloca_once_value(builder, _counters(builder, key, base))
        step = ir.Constant(_WORDS, [(WORD_STEP * _GOLDEN) % 2**64] * WORD_STEP)
        steps = builder.udiv(count, _index(WORD_STEP))
        with builder.if_else(searching) as (search, plain):
            for find in (True, False):  # the loop twice, with and without the test
                with search if find else plain, cgutils.for_range(builder, steps) as loop:
                    x = builder.load(z)
                    builder.store(builder.add(x, step), z)
                    at = builder.mul(loop.index, _index(WORD_STEP))
                    x = _splitmix(builder, x)
                    builder.store(x, builder.bitcast(builder.gep(words, [at]), _WORDS.as_pointer()), align=8)
                    if find:
                        _emit_flags(builder, x, repeated, flags, loop.index)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def lowest_bit(typingctx, value):  # noqa: ANN001, ANN202, ARG001
    """The index of the lowest set bit of a nonzero uint64 (one ``tzcnt``)."""
    signature = types.intp(types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, [_I64, ir.IntType(1)]),
                                               "llvm.cttz.i64")
        return builder.call(count, [args[0], ir.Constant(ir.IntType(1), 1)])

    return signature, codegen


@njit(inline="always")
def splitmix64(key, counter):  # noqa: ANN001, ANN201 (numba)
    """splitmix64 (Steele, Lea & Flood 2014) of ``counter`` under ``key`` (uint64)."""
    z = key + (counter + np.uint64(1)) * np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def splitmix_words(words, count, key, base, pattern, flags):  # noqa: ANN001, ANN201 (numba)
    """``words[i] = splitmix64(key, base + i)`` for ``i < count`` (uint64); where ``flags`` (uint64)
    is not empty (at least :func:`flag_words` (count)), also bit ``b`` of ``flags[s]`` set where
    byte ``b`` of words ``WORD_STEP · s`` onwards (``8 · WORD_STEP`` bytes) equals the byte
    repeated in ``pattern``, clear elsewhere (the last one's bytes past ``count`` words included)."""
    whole = count - count % WORD_STEP
    _splitmix_words(words.ctypes.data, whole, key, base, pattern, flags.ctypes.data if flags.size else 0)
    if whole < count:
        last = np.uint64(0)
        top = pattern & np.uint64(255)
        for i in range(whole, count):
            words[i] = splitmix64(key, base + np.uint64(i))
            for b in range(8 if flags.size else 0):  # as _emit_flags: bit 8 · (i - whole) + b, byte b equal to top
                if (words[i] >> np.uint64(8 * b)) & np.uint64(255) == top:
                    last |= np.uint64(1) << np.uint64(8 * (i - whole) + b)
        if flags.size:
            flags[whole // WORD_STEP] = last


@njit(inline="always")
def flag_words(count):  # noqa: ANN001, ANN201 (numba)
    """The flags :func:`splitmix_words` writes for ``count`` words: one per WORD_STEP of them."""
    return (count + WORD_STEP - 1) // WORD_STEP


@njit(inline="always")
def padded(columns, lanes):  # noqa: ANN001, ANN201 (numba)
    """The columns a :func:`gemm` weight matrix ``B`` needs for ``columns`` outputs: a whole number
    of vectors of ``lanes``."""
    return (columns + lanes - 1) // lanes * lanes


@njit(inline="always")
def _group(left, most):  # noqa: ANN001, ANN202 (numba)
    """How many of the ``left`` vectors of columns the next tile takes: ``most``, but never leaving
    one alone when it can be helped (3 + 2 rather than 4 + 1)."""
    if left >= most and left != most + 1:
        return most
    return min(left, most - 1) if left > 1 else 1


@njit(inline="always")
def _tile_rows(lanes, vectors, dot):  # noqa: ANN001, ANN202 (numba)
    """The rows of the tile of ``_SHAPES`` (with ``dot``: ``_DOT_SHAPES``) for this width and
    number of vectors."""
    if lanes == WIDE:
        for rows, count in _WIDE_SHAPES:
            if count == vectors:
                return rows
    elif dot:
        for rows, count in _NARROW_DOT_SHAPES:
            if count == vectors:
                return rows
    else:
        for rows, count in _NARROW_SHAPES:
            if count == vectors:
                return rows
    return 1


@njit(**_FLAGS)
def layer(a, b, bias, relu, mask, threshold, c, lanes):  # noqa: ANN001, ANN201 (numba)
    """A Linear and what follows it, into ``c [n, m]`` (float32, C-contiguous):
    ``c = act(a [n, k] @ b [k, :m] + bias) · (mask >= threshold)``, in vectors of ``lanes`` (NARROW
    or WIDE).

    ``b``: the weights with at least :func:`padded` (m, lanes) columns (see the module's docstring);
    ``bias``: at least ``m`` floats; ``relu``: nonzero for the ReLU; ``mask``: uint8, unit ``r · m
    + j`` of the block at byte ``r · m + j``, at least ``n · m + lanes`` bytes (the last vector of
    a row is loaded whole), or empty for no mask (``threshold`` is then ignored)."""
    n, k = a.shape
    m = c.shape[1]
    if lanes != NARROW and lanes != WIDE:
        raise ValueError("layer: lanes is NARROW or WIDE")
    if c.shape[0] != n or b.shape[0] != k or b.shape[1] < padded(m, lanes) or bias.size < m:
        raise ValueError("layer: shapes do not fit (b needs padded(m, lanes) columns, bias m)")
    ldm = m
    if mask.size == 0:  # every row reads the same bytes, all kept at threshold 0
        mask, ldm, threshold = np.zeros(padded(m, lanes), dtype=np.uint8), 0, 0
    elif mask.size < n * m + lanes:
        raise ValueError("layer: the mask needs n * m + lanes bytes")
    if bias.size < padded(m, lanes):  # whole vectors of it are loaded
        whole = np.zeros(padded(m, lanes), dtype=np.float32)
        whole[:m] = bias[:m]
        bias = whole
    lda, ldb = k, b.shape[1]
    a0, b0, c0, bias0, mask0 = a.ctypes.data, b.ctypes.data, c.ctypes.data, bias.ctypes.data, mask.ctypes.data
    vectors = (m + lanes - 1) // lanes
    most = _WIDE_SHAPES[0][1] if lanes == WIDE else _NARROW_SHAPES[0][1]
    size = 4  # bytes per float
    j = 0
    while j < vectors:  # column groups, each over all the rows (a block's rows of a stay in cache)
        group = _group(vectors - j, most)
        last = min(lanes, m - lanes * (j + group - 1))
        tall = _tile_rows(lanes, group, False)
        pb, pbias, pc = b0 + size * lanes * j, bias0 + size * lanes * j, c0 + size * lanes * j
        _ROWS(_case(lanes, tall, group), n, a0, lda, pb, ldb, pc, m, k, last, pbias, relu, mask0 + lanes * j, ldm,
              threshold, 0, 0, 0, 0, 0, 0, 0)
        j += group


@njit(inline="always")
def fits_one_tile(columns, lanes):  # noqa: ANN001, ANN201 (numba)
    """Whether a layer of ``columns`` outputs fits one of :func:`layer_dot`'s tiles (``_DOT_SHAPES``)."""
    return (columns + lanes - 1) // lanes <= (_WIDE_SHAPES[0][1] if lanes == WIDE else _NARROW_DOT_SHAPES[-1][1])


@njit(**_FLAGS)
def layer_dot(a, b, m, bias, relu, mask, threshold, w2, bias2, relu2, out, lanes):  # noqa: ANN001, ANN201 (numba)
    """A Linear and what follows it (as :func:`layer`, ``m`` outputs, at most one tile's vectors:
    :func:`fits_one_tile`), then a narrow last Linear on its outputs straight from the registers:
    ``out [n, outs] = act2(h @ w2[:, :m]ᵀ + bias2)``, ``h = act(a @ b[:, :m] + bias) · (mask >=
    threshold)`` never stored. ``w2``: ``[outs, >= padded(m, lanes)]``, zeros past column ``m``;
    ``outs`` at most DOT_OUTPUTS; ``relu2`` nonzero for a ReLU after it. Each output sums its
    products across the vectors, then across the lanes: another order than :func:`dot_rows`'s
    (rounding only)."""
    n, k = a.shape
    outs = out.shape[1]
    if lanes != NARROW and lanes != WIDE:
        raise ValueError("layer_dot: lanes is NARROW or WIDE")
    if (not fits_one_tile(m, lanes) or b.shape[0] != k or b.shape[1] < padded(m, lanes) or bias.size < m
            or out.shape[0] != n or outs > DOT_OUTPUTS or w2.shape[0] != outs or w2.shape[1] < padded(m, lanes)
            or bias2.size < outs):
        raise ValueError("layer_dot: shapes do not fit (m in one tile, b and w2 padded(m, lanes) columns)")
    ldm = m
    if mask.size == 0:
        mask, ldm, threshold = np.zeros(padded(m, lanes), dtype=np.uint8), 0, 0
    elif mask.size < n * m + lanes:
        raise ValueError("layer_dot: the mask needs n * m + lanes bytes")
    if bias.size < padded(m, lanes):
        whole = np.zeros(padded(m, lanes), dtype=np.float32)
        whole[:m] = bias[:m]
        bias = whole
    vectors = (m + lanes - 1) // lanes
    tall = _tile_rows(lanes, vectors, True)
    last = m - lanes * (vectors - 1)
    lda, ldb, ldw2 = k, b.shape[1], w2.shape[1]
    a0, b0, bias0, mask0 = a.ctypes.data, b.ctypes.data, bias.ctypes.data, mask.ctypes.data
    w0, out0, bias20 = w2.ctypes.data, out.ctypes.data, bias2.ctypes.data
    case = _case(lanes, tall, vectors) + (ONE_OUTPUT if outs == 1 else 0)
    _ROWS_DOT(case, n, a0, lda, b0, ldb, 0, 0, k, last, bias0, relu, mask0, ldm, threshold, w0, ldw2, outs, out0, outs,
              bias20, relu2)


@njit(**_FLAGS)
def gemm(a, b, c, lanes):  # noqa: ANN001, ANN201 (numba)
    """``c [n, m] = a [n, k] @ b [k, :m]``: :func:`layer` without bias, activation or mask."""
    layer(a, b, np.zeros(padded(c.shape[1], lanes), dtype=np.float32), 0, np.empty(0, dtype=np.uint8), 0, c, lanes)


@njit(**_FLAGS)
def dot_rows(a, w, c, lanes):  # noqa: ANN001, ANN201 (numba)
    """``c [n, m] = a [n, k] @ w [m, :k]ᵀ`` as ``n · m`` dot products (for m <= DOT_OUTPUTS; ``w``
    may have padding columns past ``k``): whole vectors of ``lanes`` of ``k`` by the ``_dots``
    tiles, 4 rows at a time, then the last ``k % lanes`` terms."""
    n, k = a.shape
    m = c.shape[1]
    if lanes != NARROW and lanes != WIDE:
        raise ValueError("dot_rows: lanes is NARROW or WIDE")
    if c.shape[0] != n or w.shape[0] != m or w.shape[1] < k:
        raise ValueError("dot_rows: shapes do not fit")
    a0, w0, c0 = a.ctypes.data, w.ctypes.data, c.ctypes.data
    size = 4  # bytes per float
    tall, single = _case(lanes, _DOT_ROWS, 1), _case(lanes, 1, 1)
    for j in range(m):
        pw = w0 + size * j * w.shape[1]
        r = 0
        while r + _DOT_ROWS <= n:
            _dots(tall, a0 + size * r * k, k, pw, c0 + size * (r * m + j), m, k)
            r += _DOT_ROWS
        while r < n:
            _dots(single, a0 + size * r * k, k, pw, c0 + size * (r * m + j), m, k)
            r += 1


# Where the kernels' arrays start: a cache line. numpy's allocator promises 16 bytes and numba's 32,
# so a row of weights (a multiple of 32 or 64 bytes long) would otherwise start mid-line in some
# processes and not in others, and then half or all of its vector loads straddle two cache lines
# (each such load costs two): on an AMD EPYC (AVX2) layer_dot on the UCI net's [800, 13] @ [13, 50]
# took 195 µs per 8 blocks with weights 16 bytes past a line and 157 µs on one, in the same process.
ALIGN = 64


def aligned_zeros(shape: tuple[int, ...] | int, dtype: type = np.float32) -> np.ndarray:
    """A C-contiguous array of zeros that starts on an ALIGN-byte boundary."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


@njit(inline="always")
def aligned_floats(count):  # noqa: ANN001, ANN201 (numba)
    """``np.empty(count, float32)`` (in numba code) that starts on an ALIGN-byte boundary."""
    raw = np.empty(count + ALIGN // 4, dtype=np.float32)
    start = (ALIGN - raw.ctypes.data % ALIGN) % ALIGN // 4
    return raw[start : start + count]


def padded_weights(weight_t: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """``Wᵀ [k, m]`` as :func:`gemm` takes it: ``[k, padded(m, lanes)]``, zeros in the extra
    columns, starting on a cache line (ALIGN)."""
    k, m = weight_t.shape
    out = aligned_zeros((k, padded(m, lanes)))
    out[:, :m] = weight_t
    return out

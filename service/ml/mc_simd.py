"""The fused CPU path's matmuls: register-tiled float32 GEMM micro-kernels written as LLVM vector IR.

The MC engine's matmuls are small and oddly shaped: a block of a few hundred rows times a layer
of 13 to a few hundred inputs and outputs, e.g. ``[800, 13] @ [13, 50]`` for the UCI net. A BLAS
is tuned for large square products; on such shapes it spends its time packing and dispatching
(MKL: 44-56 GFLOP/s on ``[800, 13] @ [13, 50]`` on an AMD EPYC where ``[6400, 64] @ [64, 64]`` runs at
80-90). These kernels skip all that, since a layer's weights (at most a few tens of KiB) stay in
the core's L1 cache anyway:

* :func:`gemm` computes ``C [n, m] = A [n, k] @ B [k, m]`` tile by tile: 4 rows by up to 3
  vectors of 8 lanes, 12 accumulators held in registers over the whole ``k`` loop, each step one
  broadcast of ``A[r, q]`` per row and one load of ``B[q, j:j+8]`` per vector, fused
  multiply-adds. The tiles are emitted as LLVM IR (``<8 x float>`` and ``llvm.fma``) through
  numba intrinsics, so they are compiled for the host's vector unit like the rest of numba's code
  (AVX2 and AVX-512 alike; 16 vector registers are enough).
* :func:`dot_rows` computes a layer with at most 4 outputs as dot products along the rows (a
  vector tile would use at most 4 of its 8 lanes).

The weights come padded: ``B`` has :func:`padded` (m) columns, so that every vector load of a row
stays inside it; the lanes past ``m`` are computed and never stored. Sums are accumulated in
float32 in order over ``k``, one fused multiply-add each, so the results differ from a BLAS's by
rounding only (relative 1e-7 to 1e-6).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # floats per vector
TILE_ROWS = 4
MOST_VECTORS = 3  # a tile's vectors: TILE_ROWS · MOST_VECTORS accumulators, + the loads: 16 registers
DOT_OUTPUTS = 4  # layers with at most this many outputs take dot_rows

_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
_F32 = ir.FloatType()
_I64 = ir.IntType(64)
_VECTOR = ir.VectorType(_F32, LANES)
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_BYTES, _INTS = ir.VectorType(_I8, LANES), ir.VectorType(_I32, LANES)


def _index(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    undefined = ir.Constant(_VECTOR, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


def _splat_bool(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    kind = ir.VectorType(ir.IntType(1), LANES)
    first = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(kind, ir.Undefined), ir.Constant(_INTS, [0] * LANES))


def _splat_float(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    first = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(_VECTOR, ir.Undefined), ir.Constant(_INTS, [0] * LANES))


def _splat_int(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    first = builder.insert_element(ir.Constant(_INTS, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(_INTS, ir.Undefined), ir.Constant(_INTS, [0] * LANES))


def _vector_at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value) -> ir.Value:
    return builder.bitcast(builder.gep(base, [offset]), _VECTOR.as_pointer())


def _emit_tile(builder: ir.IRBuilder, rows: int, vectors: int, args: list[ir.Value]) -> None:
    """Emit one tile ``(a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold)``
    (addresses; strides in elements): for ``rows`` rows and ``vectors`` vectors of columns,

        ``C[r, j] = act(bias[j] + Σ_q A[r, q] · B[q, j]) · (mask[r · ldm + j] >= threshold)``,

    ``act`` the ReLU where ``relu`` is nonzero, else the identity; ``mask`` bytes (0/1 as the
    kernels of :mod:`service.ml.mc_kernels` compare them). The last vector stores only its first
    ``last`` lanes (1 to LANES); every vector of ``bias`` and ``mask`` is loaded whole."""
    a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold = args
    a, b, c, bias = (builder.inttoptr(p, _F32.as_pointer()) for p in (a, b, c, bias))
    mask = builder.inttoptr(mask, _I8.as_pointer())
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3),
                                         f"llvm.fma.v{LANES}f32")
    zero = ir.Constant(_VECTOR, [0.0] * LANES)
    biases = [builder.load(_vector_at(builder, bias, _index(v * LANES)), align=4) for v in range(vectors)]
    # the sums start at the bias: bias + Σ_q, one rounding fewer than adding it after
    sums = [[cgutils.alloca_once_value(builder, biases[v]) for v in range(vectors)] for _ in range(rows)]
    with cgutils.for_range(builder, depth) as loop:
        q = loop.index
        b_row = builder.gep(b, [builder.mul(q, ldb)])
        columns = [builder.load(_vector_at(builder, b_row, _index(v * LANES)), align=4) for v in range(vectors)]
        for r in range(rows):
            x = _splat(builder, builder.load(builder.gep(a, [builder.add(builder.mul(_index(r), lda), q)])))
            for v in range(vectors):
                builder.store(builder.call(fma, [x, columns[v], builder.load(sums[r][v])]), sums[r][v])
    # ReLU as max(x, floor): floor 0, or -inf (the identity) where relu is 0
    floor = _splat_float(builder, builder.select(builder.icmp_signed("!=", relu, _index(0)),
                                                 ir.Constant(_F32, 0.0), ir.Constant(_F32, float("-inf"))))
    limit = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_BYTES, ir.Undefined), builder.trunc(threshold, _I8), ir.Constant(_I32, 0)),
        ir.Constant(_BYTES, ir.Undefined), ir.Constant(_INTS, [0] * LANES))  # threshold <= 255
    lanes = builder.icmp_unsigned("<", ir.Constant(_INTS, list(range(LANES))),
                                  _splat_int(builder, builder.trunc(last, _I32)))
    store_some = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_VECTOR, _F32.as_pointer(), _I32, lanes.type]),
        f"llvm.masked.store.v{LANES}f32.p0")
    maximum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 2),
                                             f"llvm.maxnum.v{LANES}f32")
    for r in range(rows):
        c_row = builder.gep(c, [builder.mul(_index(r), ldc)])
        mask_row = builder.gep(mask, [builder.mul(_index(r), ldm)])
        for v in range(vectors):
            x = builder.call(maximum, [builder.load(sums[r][v]), floor])
            keep = builder.bitcast(builder.gep(mask_row, [_index(v * LANES)]), _BYTES.as_pointer())
            kept = builder.icmp_unsigned(">=", builder.load(keep, align=1), limit)
            x = builder.select(kept, x, zero)
            at = builder.gep(c_row, [_index(v * LANES)])
            if v < vectors - 1:
                builder.store(x, builder.bitcast(at, _VECTOR.as_pointer()), align=4)
            else:  # the last vector: only its first `last` lanes
                builder.call(store_some, [x, at, ir.Constant(_I32, 4), lanes])


# The tiles _tile compiles in: 4 rows (or 1, for the rows left over) by 3, 2 or 1 vectors.
_TILES = [(rows, vectors) for rows in (TILE_ROWS, 1) for vectors in range(MOST_VECTORS, 0, -1)]


@intrinsic
def _tile(typingctx, rows, vectors, a, lda, b, ldb, c, ldc, depth, last, bias, relu, mask, ldm, threshold):  # noqa: ANN001, ANN202, ARG001
    """The intrinsic ``_tile(rows, vectors, a, lda, ...)``: the tile of :func:`_emit_tile` for ``rows``
    and ``vectors`` (one of ``_TILES``; any other does nothing), each variant compiled in once."""
    signature = types.void(*([types.intp] * 15))

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        rows, vectors, rest = args[0], args[1], list(args[2:])
        for tile_rows, tile_vectors in _TILES:
            chosen = builder.and_(builder.icmp_signed("==", rows, _index(tile_rows)),
                                  builder.icmp_signed("==", vectors, _index(tile_vectors)))
            with builder.if_then(chosen):
                _emit_tile(builder, tile_rows, tile_vectors, rest)
        return context.get_dummy_value()

    return signature, codegen


def _dots(rows: int):  # noqa: ANN202 (a numba intrinsic)
    """The intrinsic ``dots(a, lda, w, c, ldc, depth)`` (addresses and strides in floats):
    ``C[r] = Σ_q A[r, q] · w[q]``, ``q < depth``, for ``rows`` rows: a vector of partial sums per
    row over whole vectors of ``q`` (independent chains), summed across its lanes, then the last
    ``depth % LANES`` terms in order."""

    @intrinsic
    def dots(typingctx, a, lda, w, c, ldc, depth):  # noqa: ANN001, ANN202, ARG001
        signature = types.void(*([types.intp] * 6))

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            a, lda, w, c, ldc, depth = args
            chunks = builder.udiv(depth, _index(LANES))
            rest = builder.mul(chunks, _index(LANES))
            a, w, c = (builder.inttoptr(p, _F32.as_pointer()) for p in (a, w, c))
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3),
                                                 f"llvm.fma.v{LANES}f32")
            sums = [cgutils.alloca_once_value(builder, ir.Constant(_VECTOR, [0.0] * LANES)) for _ in range(rows)]
            with cgutils.for_range(builder, chunks) as loop:
                q = builder.mul(loop.index, _index(LANES))
                weights = builder.load(_vector_at(builder, w, q), align=4)
                for r in range(rows):
                    x = builder.load(_vector_at(builder, a, builder.add(builder.mul(_index(r), lda), q)), align=4)
                    builder.store(builder.call(fma, [x, weights, builder.load(sums[r])]), sums[r])
            for r in range(rows):
                total = builder.load(sums[r])
                width = LANES
                while width > 1:  # halves added pairwise: lanes 0..width/2 hold the partial sums
                    width //= 2
                    upper = [i + width if i < width else i for i in range(LANES)]
                    shifted = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(ir.IntType(32), LANES), upper))
                    total = builder.fadd(total, shifted)
                result = cgutils.alloca_once_value(builder, builder.extract_element(total, ir.Constant(ir.IntType(32), 0)))
                a_row = builder.gep(a, [builder.mul(_index(r), lda)])
                with cgutils.for_range_slice(builder, rest, depth, _index(1)) as (q, _):
                    term = builder.fmul(builder.load(builder.gep(a_row, [q])), builder.load(builder.gep(w, [q])))
                    builder.store(builder.fadd(builder.load(result), term), result)
                builder.store(builder.load(result), builder.gep(c, [builder.mul(_index(r), ldc)]))
            return context.get_dummy_value()

        return signature, codegen

    return dots


_DOTS_4, _DOTS_1 = _dots(4), _dots(1)


_WORDS = ir.VectorType(_I64, LANES)


@intrinsic
def _words_with_byte(typingctx, words, count, pattern, found):  # noqa: ANN001, ANN202, ARG001
    """``n = words_with_byte(words, count, pattern, found)`` (addresses of uint64 and int64 arrays):
    writes to ``found`` the indices ``i < count - count % LANES``, in order, of the words with a byte
    equal to the byte repeated in ``pattern``, and returns how many. Eight words per step, tested at
    once and their indices compressed into ``found`` (one instruction with AVX-512)."""
    signature = types.intp(types.intp, types.intp, types.uint64, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        words, count, pattern, found = args
        words, found = (builder.inttoptr(p, _I64.as_pointer()) for p in (words, found))
        compress = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_WORDS, [_WORDS, ir.VectorType(ir.IntType(1), LANES), _WORDS]),
            f"llvm.experimental.vector.compress.v{LANES}i64")
        population = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I8, [_I8]), "llvm.ctpop.i8")
        sevens = ir.Constant(_WORDS, [0x7F7F7F7F7F7F7F7F] * LANES)
        first = builder.insert_element(ir.Constant(_WORDS, ir.Undefined), pattern, ir.Constant(_I32, 0))
        repeated = builder.shuffle_vector(first, ir.Constant(_WORDS, ir.Undefined), ir.Constant(_INTS, [0] * LANES))
        steps = ir.Constant(_WORDS, list(range(LANES)))
        total = cgutils.alloca_once_value(builder, _index(0))
        with cgutils.for_range(builder, builder.udiv(count, _index(LANES))) as loop:
            at = builder.mul(loop.index, _index(LANES))
            x = builder.xor(builder.load(builder.bitcast(builder.gep(words, [at]), _WORDS.as_pointer()), align=8), repeated)
            # a byte's high bit set in `any` exactly where x has a zero byte
            any_ = builder.or_(builder.or_(builder.add(builder.and_(x, sevens), sevens), x), sevens)
            hit = builder.icmp_unsigned("!=", any_, ir.Constant(_WORDS, [0xFFFFFFFFFFFFFFFF] * LANES))
            first_index = builder.insert_element(ir.Constant(_WORDS, ir.Undefined), at, ir.Constant(_I32, 0))
            indices = builder.add(builder.shuffle_vector(first_index, ir.Constant(_WORDS, ir.Undefined),
                                                         ir.Constant(_INTS, [0] * LANES)), steps)
            n = builder.load(total)
            packed = builder.call(compress, [indices, hit, ir.Constant(_WORDS, ir.Undefined)])
            builder.store(packed, builder.bitcast(builder.gep(found, [n]), _WORDS.as_pointer()), align=8)
            hits = builder.zext(builder.call(population, [builder.bitcast(hit, _I8)]), _I64)
            builder.store(builder.add(n, hits), total)
        return builder.load(total)

    return signature, codegen


_SEVENS = np.uint64(0x7F7F7F7F7F7F7F7F)


@njit(inline="always")
def equal_bytes(word, pattern):  # noqa: ANN001, ANN201 (numba)
    """The high bit of every byte of ``word`` (uint64) equal to the byte repeated in ``pattern``,
    exactly: 0 where there is none (as the vector test of ``_words_with_byte``)."""
    x = word ^ pattern  # a zero byte where they are equal
    return ~(((x & _SEVENS) + _SEVENS) | x | _SEVENS)


@njit(inline="always")
def words_with_byte(words, count, pattern, found):  # noqa: ANN001, ANN201 (numba)
    """The indices ``i < count`` of the words of ``words`` (uint64) with a byte equal to the byte
    repeated in ``pattern``, in order, into ``found`` (int64, at least ``count + LANES``: whole
    vectors of indices are stored); returns how many."""
    whole = count - count % LANES
    n = _words_with_byte(words.ctypes.data, whole, pattern, found.ctypes.data)
    for i in range(whole, count):
        if equal_bytes(words[i], pattern) != np.uint64(0):
            found[n] = i
            n += 1
    return n


@njit(inline="always")
def padded(columns):  # noqa: ANN001, ANN201 (numba)
    """The columns a :func:`gemm` weight matrix ``B`` needs for ``columns`` outputs: a whole number
    of vectors."""
    return (columns + LANES - 1) // LANES * LANES


@njit(**_FLAGS)
def layer(a, b, bias, relu, mask, threshold, c):  # noqa: ANN001, ANN201 (numba)
    """A Linear and what follows it, into ``c [n, m]`` (float32, C-contiguous):
    ``c = act(a [n, k] @ b [k, :m] + bias) · (mask >= threshold)``.

    ``b``: the weights with at least :func:`padded` (m) columns (see the module's docstring);
    ``bias``: at least ``m`` floats; ``relu``: nonzero for the ReLU; ``mask``: uint8, unit ``r · m
    + j`` of the block at byte ``r · m + j``, at least ``n · m + LANES`` bytes (the last vector of
    a row is loaded whole), or empty for no mask (``threshold`` is then ignored)."""
    n, k = a.shape
    m = c.shape[1]
    if c.shape[0] != n or b.shape[0] != k or b.shape[1] < padded(m) or bias.size < m:
        raise ValueError("layer: shapes do not fit (b needs padded(m) columns, bias m)")
    ldm = m
    if mask.size == 0:  # every row reads the same bytes, all kept at threshold 0
        mask, ldm, threshold = np.zeros(padded(m), dtype=np.uint8), 0, 0
    elif mask.size < n * m + LANES:
        raise ValueError("layer: the mask needs n * m + LANES bytes")
    if bias.size < padded(m):  # whole vectors of it are loaded
        whole = np.zeros(padded(m), dtype=np.float32)
        whole[:m] = bias[:m]
        bias = whole
    lda, ldb = k, b.shape[1]
    a0, b0, c0, bias0, mask0 = a.ctypes.data, b.ctypes.data, c.ctypes.data, bias.ctypes.data, mask.ctypes.data
    vectors = (m + LANES - 1) // LANES
    size = 4  # bytes per float
    r = 0
    while r < n:
        rows = TILE_ROWS if r + TILE_ROWS <= n else 1
        j = 0
        while j < vectors:
            left = vectors - j
            group = MOST_VECTORS if left >= MOST_VECTORS and left != 4 else min(left, 2)  # 4 = 2 + 2, 7 = 3 + 2 + 2
            last = min(LANES, m - LANES * (j + group - 1))
            pa, pb, pc = a0 + size * r * lda, b0 + size * LANES * j, c0 + size * (r * m + LANES * j)
            pbias, pmask = bias0 + size * LANES * j, mask0 + r * ldm + LANES * j
            _tile(rows, group, pa, lda, pb, ldb, pc, m, k, last, pbias, relu, pmask, ldm, threshold)
            j += group
        r += rows


@njit(**_FLAGS)
def gemm(a, b, c):  # noqa: ANN001, ANN201 (numba)
    """``c [n, m] = a [n, k] @ b [k, :m]``: :func:`layer` without bias, activation or mask."""
    layer(a, b, np.zeros(padded(c.shape[1]), dtype=np.float32), 0, np.empty(0, dtype=np.uint8), 0, c)


@njit(**_FLAGS)
def dot_rows(a, w, c):  # noqa: ANN001, ANN201 (numba)
    """``c [n, m] = a [n, k] @ w [m, k]ᵀ`` as ``n · m`` dot products (for m <= DOT_OUTPUTS): whole
    vectors of ``k`` by the ``dots`` tiles, 4 rows at a time, then the last ``k % LANES`` terms."""
    n, k = a.shape
    m = c.shape[1]
    if c.shape[0] != n or w.shape[0] != m or w.shape[1] != k:
        raise ValueError("dot_rows: shapes do not fit")
    a0, w0, c0 = a.ctypes.data, w.ctypes.data, c.ctypes.data
    size = 4  # bytes per float
    for j in range(m):
        pw = w0 + size * j * k
        r = 0
        while r + TILE_ROWS <= n:
            _DOTS_4(a0 + size * r * k, k, pw, c0 + size * (r * m + j), m, k)
            r += TILE_ROWS
        while r < n:
            _DOTS_1(a0 + size * r * k, k, pw, c0 + size * (r * m + j), m, k)
            r += 1


def padded_weights(weight_t: np.ndarray) -> np.ndarray:
    """``Wᵀ [k, m]`` as :func:`gemm` takes it: ``[k, padded(m)]``, zeros in the extra columns."""
    k, m = weight_t.shape
    out = np.zeros((k, padded(m)), dtype=np.float32)
    out[:, :m] = weight_t
    return out


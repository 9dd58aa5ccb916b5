"""The fused path's matmul kernels (service.ml.mc_simd): every tile shape and tail of both vector
widths against float64 numpy (a width the host lacks still runs, split by LLVM), the fused bias,
ReLU and mask, the dot-product layer, and the shapes they refuse."""

import numpy as np
import pytest
from numba import njit

from service.ml import mc_kernels, mc_simd

RNG = np.random.default_rng(0)
WIDTHS = pytest.mark.parametrize("lanes", [mc_simd.NARROW, mc_simd.WIDE])


def _operands(n: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return RNG.standard_normal((n, k)).astype(np.float32), RNG.standard_normal((k, m)).astype(np.float32)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    # float32 sums of k terms, against float64: a few ulps of the largest partial sum
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@WIDTHS
# vector groups (4 + 3 + 2, 3 + 2 + 2, ...) and tails of both widths
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 15, 16, 17, 24, 25, 32, 33, 49, 50, 56, 64, 65, 81, 100, 145])
@pytest.mark.parametrize("k", [1, 13, 64])
def test_gemm_matches_float64(k, m, lanes):
    for n in (1, 3, 4, 5, 6, 7, 9, 13, 17, 64):  # whole tiles (4 to 16 rows), rows left over, both
        a, w = _operands(n, k, m)
        c = np.full((n, m), np.nan, dtype=np.float32)
        mc_simd.gemm(a, mc_simd.padded_weights(w, lanes), c, lanes)
        _close(c, a.astype(np.float64) @ w)


@pytest.mark.parametrize("m", [10, 50, 64, 100])
def test_both_widths_give_the_same_bits(m):
    # Every output is the same chain of fused multiply-adds over k, whatever the tile: equal bits.
    a, w = _operands(203, 37, m)
    results = []
    for lanes in (mc_simd.NARROW, mc_simd.WIDE):
        c = np.empty((203, m), dtype=np.float32)
        mc_simd.gemm(a, mc_simd.padded_weights(w, lanes), c, lanes)
        results.append(c)
    assert np.array_equal(results[0], results[1])


@WIDTHS
def test_gemm_writes_only_its_output(lanes):
    # The last vector of a row is stored lane by lane: nothing past m, nor past the last row.
    a, w = _operands(5, 6, 11)
    buffer = np.full(5 * 11 + 40, 7.0, dtype=np.float32)
    mc_simd.gemm(a, mc_simd.padded_weights(w, lanes), buffer[: 5 * 11].reshape(5, 11), lanes)
    assert (buffer[5 * 11 :] == 7.0).all()
    _close(buffer[: 5 * 11].reshape(5, 11), a.astype(np.float64) @ w)


@WIDTHS
@pytest.mark.parametrize("rate", [0.05, 0.5])
@pytest.mark.parametrize("relu", [0, 1])
def test_layer_fuses_bias_relu_and_mask(rate, relu, lanes):
    n, k, m = 37, 13, 50
    a, w = _operands(n, k, m)
    bias = RNG.standard_normal(m).astype(np.float32)
    top, low, threshold = mc_kernels.mask_parameters(round((1 - rate) * 2**16))
    words = np.empty(mc_kernels.words_for(n, m) + 2, dtype=np.uint64)
    first = mc_kernels.draw(words, 5 * m, n * m, np.uint64(3), np.uint64(4), top, low)  # rows from 5: mid-word
    mask = words.view(np.uint8)[first:]
    c = np.empty((n, m), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w, lanes), mc_kernels.tiled_bias(bias), relu, mask, threshold, c, lanes)
    z = a.astype(np.float64) @ w + bias
    if relu:
        z = np.maximum(z, 0.0)
    kept = mask[: n * m].reshape(n, m) >= threshold
    _close(c, z * kept)
    assert 0 < kept.mean() < 1 and (c[~kept] == 0).all()


@WIDTHS
def test_layer_without_a_mask_keeps_every_unit(lanes):
    a, w = _operands(9, 4, 20)
    bias = np.arange(20, dtype=np.float32)
    c = np.empty((9, 20), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w, lanes), bias, 1, np.empty(0, dtype=np.uint8), 255, c, lanes)
    _close(c, np.maximum(a.astype(np.float64) @ w + bias, 0.0))


@WIDTHS
def test_layer_pads_a_short_bias(lanes):
    # A bias of exactly m floats (m not a whole number of vectors) is read through a padded copy.
    a, w = _operands(6, 3, 300)
    bias = RNG.standard_normal(300).astype(np.float32)
    c = np.empty((6, 300), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w, lanes), bias, 0, np.empty(0, dtype=np.uint8), 0, c, lanes)
    _close(c, a.astype(np.float64) @ w + bias)


@WIDTHS
@pytest.mark.parametrize("k", [1, 7, 8, 13, 16, 17, 50, 64, 70])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 6, 64])
def test_dot_rows_matches_float64(n, k, m, lanes):
    a, w = _operands(n, k, m)
    c = np.full((n, m), np.nan, dtype=np.float32)
    mc_simd.dot_rows(a, np.ascontiguousarray(w.T), c, lanes)
    _close(c, a.astype(np.float64) @ w)


# (n, k, m, outs) that fit one tile of the width: 64 outputs only with 16 lanes; with 8 lanes 25 to
# 56 outputs take the tiles of 2 rows (4 to 7 vectors), odd n leaving a row for the one-row tile
LAYER_DOT_CASES = [(lanes, *case) for lanes in (mc_simd.NARROW, mc_simd.WIDE)
                   for case in [(800, 13, 50, 1), (37, 13, 50, 3), (9, 5, 7, 4), (100, 20, 64, 2), (13, 3, 24, 1),
                                (1, 1, 1, 1), (7, 9, 30, 2), (5, 4, 40, 4), (3, 13, 41, 1), (11, 6, 56, 3)]
                   if mc_simd.fits_one_tile(case[2], lanes)]


@pytest.mark.parametrize(("lanes", "n", "k", "m", "outs"), LAYER_DOT_CASES)
@pytest.mark.parametrize("relu2", [0, 1])
def test_layer_dot_computes_the_last_layer_from_the_tiles(n, k, m, outs, relu2, lanes):
    a, w = _operands(n, k, m)
    bias, w2 = RNG.standard_normal(m).astype(np.float32), RNG.standard_normal((outs, m)).astype(np.float32)
    bias2 = RNG.standard_normal(outs).astype(np.float32)
    top, low, threshold = mc_kernels.mask_parameters(round(0.7 * 2**16))
    words = np.empty(mc_kernels.words_for(n, m) + 2, dtype=np.uint64)
    first = mc_kernels.draw(words, 3 * m, n * m, np.uint64(5), np.uint64(6), top, low)
    mask = words.view(np.uint8)[first:]
    out = np.full((n, outs), np.nan, dtype=np.float32)
    mc_simd.layer_dot(a, mc_simd.padded_weights(w, lanes), m, mc_kernels.tiled_bias(bias), 1, mask, threshold,
                      mc_simd.padded_weights(w2, lanes), bias2, relu2, out, lanes)
    h = np.maximum(a.astype(np.float64) @ w + bias, 0.0) * (mask[: n * m].reshape(n, m) >= threshold)
    want = h @ w2.T + bias2
    _close(out, np.maximum(want, 0.0) if relu2 else want)


def test_layer_dot_needs_one_tile_and_padded_weights():
    a, w = _operands(4, 5, 60)
    out = np.empty((4, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="one tile"):  # 60 outputs: 8 vectors of 8, one more than a tile
        mc_simd.layer_dot(a, mc_simd.padded_weights(w, 8), 60, np.zeros(64, dtype=np.float32), 0,
                          np.empty(0, dtype=np.uint8), 0, np.zeros((1, 64), dtype=np.float32),
                          np.zeros(1, dtype=np.float32), 0, out, 8)
    a, w = _operands(4, 5, 30)
    with pytest.raises(ValueError, match="padded"):  # w2 not padded to 32 columns
        mc_simd.layer_dot(a, mc_simd.padded_weights(w, 16), 30, np.zeros(32, dtype=np.float32), 0,
                          np.empty(0, dtype=np.uint8), 0, np.zeros((1, 30), dtype=np.float32),
                          np.zeros(1, dtype=np.float32), 0, out, 16)


def test_shapes_that_do_not_fit_are_refused():
    a, w = _operands(4, 5, 10)
    c = np.empty((4, 10), dtype=np.float32)
    narrow, wide = mc_simd.NARROW, mc_simd.WIDE
    with pytest.raises(ValueError, match="padded"):
        mc_simd.gemm(a, w, c, narrow)  # 10 columns, not padded(10, 8) = 16
    with pytest.raises(ValueError, match="padded"):
        mc_simd.gemm(a, mc_simd.padded_weights(w, narrow), np.empty((4, 17), dtype=np.float32), narrow)
    with pytest.raises(ValueError, match="padded"):
        mc_simd.gemm(a[:, :4], mc_simd.padded_weights(w, narrow), c, narrow)  # k differs
    with pytest.raises(ValueError, match="lanes"):
        mc_simd.gemm(a, mc_simd.padded_weights(w, wide), c, 4)  # no such width
    with pytest.raises(ValueError, match="mask"):
        mc_simd.layer(a, mc_simd.padded_weights(w, wide), np.zeros(10, dtype=np.float32), 0,
                      np.zeros(4 * 10 + 8, dtype=np.uint8), 1, c, wide)  # no room for the last whole vector
    with pytest.raises(ValueError, match="do not fit"):
        mc_simd.dot_rows(a, w, np.empty((4, 1), dtype=np.float32), narrow)
    with pytest.raises(ValueError, match="lanes"):
        mc_simd.dot_rows(a, np.ones((1, 5), dtype=np.float32), np.empty((4, 1), dtype=np.float32), 32)


def test_padding():
    assert [mc_simd.padded(m, 8) for m in (1, 8, 9, 50, 64)] == [8, 8, 16, 56, 64]
    assert [mc_simd.padded(m, 16) for m in (1, 16, 17, 50, 64)] == [16, 16, 32, 64, 64]
    w = np.ones((3, 10), dtype=np.float32)
    p = mc_simd.padded_weights(w, 8)
    assert p.shape == (3, 16) and (p[:, :10] == 1).all() and (p[:, 10:] == 0).all()
    assert mc_simd.padded_weights(w, 16).shape == (3, 16)


@njit
def _aligned_floats_at(count):  # noqa: ANN001, ANN202 (numba)
    floats = mc_simd.aligned_floats(count)
    return floats.ctypes.data, floats.size


def test_the_kernels_arrays_start_on_a_cache_line():
    # a vector load that straddles two cache lines costs two: weights, blocks and layers start on one
    for _ in range(20):  # numpy's and numba's allocators leave 16 and 32 bytes past a line as often as not
        for shape, dtype in (((3, 10), np.float32), (7, np.float32), ((5,), np.uint8), ((2, 3), np.float64)):
            array = mc_simd.aligned_zeros(shape, dtype)
            assert array.ctypes.data % mc_simd.ALIGN == 0 and array.flags.c_contiguous
            assert array.shape == (shape if isinstance(shape, tuple) else (shape,)) and not array.any()
            assert array.dtype == dtype
        assert mc_simd.padded_weights(np.ones((3, 10), dtype=np.float32), 8).ctypes.data % mc_simd.ALIGN == 0
        for count in (1, 13, 800 * 50):
            address, size = _aligned_floats_at(count)
            assert address % mc_simd.ALIGN == 0 and size == count


def test_the_engine_width_follows_the_target():
    # 16 lanes where numba compiles for AVX-512 (an AVX2 target gets 8: the child process of
    # tests/ml/test_mc_whole.py::test_an_avx2_target_gives_the_same_samples), and the plans use it
    from service.ml import mc
    from service.ml.nets import NetworkSpec, build_network

    assert mc_simd.LANES == (mc_simd.WIDE if mc_simd._target_is_avx512() else mc_simd.NARROW)
    net = build_network(NetworkSpec(13, 1, (50,), (0.05,)), seed=0)
    assert mc._compiled(net).fused.whole.lanes == mc_simd.LANES


def _splitmix64(key: int, counters: np.ndarray) -> np.ndarray:
    """splitmix64 in numpy (wrapping uint64 arithmetic), the published constants."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (counters + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 5000, 5003])
@pytest.mark.parametrize("search", [True, False])
def test_splitmix_words_are_drawn_and_flagged_in_order(count, search):
    from numba import njit

    @njit
    def draw(words, count, key, base, pattern, flags):
        mc_simd.splitmix_words(words, count, key, base, pattern, flags)

    key, base, byte = 0x1234_5678_9ABC_DEF0, 2**40 + 3, 12
    words = np.full(count + 3, 7, dtype=np.uint64)  # words past count are left alone
    flags = np.full(mc_simd.flag_words.py_func(count) if search else 0, 0xFFFF, dtype=np.uint64)
    draw(words, count, np.uint64(key), np.uint64(base), np.uint64(byte * 0x0101010101010101), flags)
    want = _splitmix64(key, np.arange(base, base + count, dtype=np.uint64))
    assert (words[:count] == want).all() and (words[count:] == 7).all()
    if search:  # bit b of flag s: byte b of words 8 s .. 8 s + 7; none past the last word
        padded_bytes = np.zeros(8 * mc_simd.WORD_STEP * flags.size, dtype=np.uint8)
        padded_bytes[: 8 * count] = want.view(np.uint8)
        equal = (padded_bytes == byte) & (np.arange(padded_bytes.size) < 8 * count)
        assert (np.unpackbits(flags.view(np.uint8), bitorder="little").astype(bool) == equal).all()
        assert count < 5000 or equal.sum() > 100  # ~1 byte in 256


@pytest.mark.parametrize("value", [1, 2**63, 0b1011000, 2**64 - 1])
def test_lowest_bit_is_the_index_of_the_lowest_set_bit(value):
    from numba import njit

    @njit
    def lowest(value):
        return mc_simd.lowest_bit(value)

    assert lowest(np.uint64(value)) == (value & -value).bit_length() - 1

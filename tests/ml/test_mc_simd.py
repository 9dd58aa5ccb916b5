"""The fused path's matmul kernels (service.ml.mc_simd): every tile shape and tail against float64
numpy, the fused bias, ReLU and mask, the dot-product layer, and the shapes they refuse."""

import numpy as np
import pytest

from service.ml import mc_kernels, mc_simd

RNG = np.random.default_rng(0)


def _operands(n: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return RNG.standard_normal((n, k)).astype(np.float32), RNG.standard_normal((k, m)).astype(np.float32)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    # float32 sums of k terms, against float64: a few ulps of the largest partial sum
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 9, 64])  # whole tiles of 4 rows, rows left over, both
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 24, 25, 32, 33, 50, 56, 64, 65, 100])  # vector groups, tails
@pytest.mark.parametrize("k", [1, 13, 64])
def test_gemm_matches_float64(n, k, m):
    a, w = _operands(n, k, m)
    c = np.full((n, m), np.nan, dtype=np.float32)
    mc_simd.gemm(a, mc_simd.padded_weights(w), c)
    _close(c, a.astype(np.float64) @ w)


def test_gemm_writes_only_its_output():
    # The last vector of a row is stored lane by lane: nothing past m, nor past the last row.
    a, w = _operands(5, 6, 11)
    buffer = np.full(5 * 11 + 40, 7.0, dtype=np.float32)
    mc_simd.gemm(a, mc_simd.padded_weights(w), buffer[: 5 * 11].reshape(5, 11))
    assert (buffer[5 * 11 :] == 7.0).all()
    _close(buffer[: 5 * 11].reshape(5, 11), a.astype(np.float64) @ w)


@pytest.mark.parametrize("rate", [0.05, 0.5])
@pytest.mark.parametrize("relu", [0, 1])
def test_layer_fuses_bias_relu_and_mask(rate, relu):
    n, k, m = 37, 13, 50
    a, w = _operands(n, k, m)
    bias = RNG.standard_normal(m).astype(np.float32)
    top, low, threshold = mc_kernels.mask_parameters(round((1 - rate) * 2**16))
    words = np.empty(mc_kernels.words_for(n, m) + 1, dtype=np.uint64)
    first = mc_kernels.draw(words, 5 * m, n * m, np.uint64(3), np.uint64(4), top, low)  # rows from 5: mid-word
    mask = words.view(np.uint8)[first:]
    c = np.empty((n, m), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w), mc_kernels.tiled_bias(bias), relu, mask, threshold, c)
    z = a.astype(np.float64) @ w + bias
    if relu:
        z = np.maximum(z, 0.0)
    kept = mask[: n * m].reshape(n, m) >= threshold
    _close(c, z * kept)
    assert 0 < kept.mean() < 1 and (c[~kept] == 0).all()


def test_layer_without_a_mask_keeps_every_unit():
    a, w = _operands(9, 4, 20)
    bias = np.arange(20, dtype=np.float32)
    c = np.empty((9, 20), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w), bias, 1, np.empty(0, dtype=np.uint8), 255, c)
    _close(c, np.maximum(a.astype(np.float64) @ w + bias, 0.0))


def test_layer_pads_a_short_bias():
    # A bias of exactly m floats (m not a whole number of vectors) is read through a padded copy.
    a, w = _operands(6, 3, 300)
    bias = RNG.standard_normal(300).astype(np.float32)
    c = np.empty((6, 300), dtype=np.float32)
    mc_simd.layer(a, mc_simd.padded_weights(w), bias, 0, np.empty(0, dtype=np.uint8), 0, c)
    _close(c, a.astype(np.float64) @ w + bias)


@pytest.mark.parametrize("k", [1, 7, 8, 13, 50, 64, 70])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 6, 64])
def test_dot_rows_matches_float64(n, k, m):
    a, w = _operands(n, k, m)
    c = np.full((n, m), np.nan, dtype=np.float32)
    mc_simd.dot_rows(a, np.ascontiguousarray(w.T), c)
    _close(c, a.astype(np.float64) @ w)


def test_shapes_that_do_not_fit_are_refused():
    a, w = _operands(4, 5, 10)
    c = np.empty((4, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="padded"):
        mc_simd.gemm(a, w, c)  # 10 columns, not padded(10) = 16
    with pytest.raises(ValueError, match="padded"):
        mc_simd.gemm(a[:, :4], mc_simd.padded_weights(w), c)  # k differs
    with pytest.raises(ValueError, match="mask"):
        mc_simd.layer(a, mc_simd.padded_weights(w), np.zeros(10, dtype=np.float32), 0,
                      np.zeros(4 * 10, dtype=np.uint8), 1, c)  # no room for the last whole vector
    with pytest.raises(ValueError, match="do not fit"):
        mc_simd.dot_rows(a, w, np.empty((4, 1), dtype=np.float32))


def test_padding():
    assert [mc_simd.padded(m) for m in (1, 8, 9, 50, 64)] == [8, 8, 16, 56, 64]
    w = np.ones((3, 10), dtype=np.float32)
    p = mc_simd.padded_weights(w)
    assert p.shape == (3, 16) and (p[:, :10] == 1).all() and (p[:, 10:] == 0).all()


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 5000, 5003])
def test_words_with_a_byte_are_found_in_order(count):
    from numba import njit

    @njit
    def find(words, count, pattern, found):
        return mc_simd.words_with_byte(words, count, pattern, found)

    words = RNG.integers(0, 2**64, size=count + 3, dtype=np.uint64)  # words past count are not looked at
    words[count:] = np.uint64(0x0C0C0C0C0C0C0C0C)
    found = np.full(count + mc_simd.LANES, -1, dtype=np.int64)
    n = find(words, count, np.uint64(0x0C0C0C0C0C0C0C0C), found)
    expected = np.nonzero((words[:count].view(np.uint8).reshape(-1, 8) == 12).any(axis=1))[0]
    assert n == len(expected) and (found[:n] == expected).all()
    assert count < 5000 or n > 100  # ~1 word in 32 has the byte

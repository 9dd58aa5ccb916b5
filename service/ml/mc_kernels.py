"""Fused CPU kernels of the MC dropout engine (numba): dropout masks drawn and applied in one pass.

On a CPU a torch dropout step is several passes over the activations (draw words, compare, convert
to float, multiply, then bias and activation), each one out of cache for T·B rows. These kernels
do a block of rows in one pass that stays in cache, with the masks drawn by a counter-based
generator:

* Unit ``j`` of global row ``g`` (row = sample · B + input) is unit ``u = g · width + j`` of the
  layer; it reads byte ``u % 8`` of the word ``splitmix64(key, u // 8)``: a value depends only on
  the key and its position, never on how the rows are split into blocks or threads, and no
  random bits go unused at the end of a row.
* The keep rule is the engine's 16-bit one (:mod:`service.ml.mc`): keep probability
  ``k / 2**16`` and drop threshold ``D = 2**16 - k``; a 16-bit lane ``L = 256 c + r`` is kept when
  ``L >= D``. The byte ``c`` decides unless it equals ``D >> 8``; only then (1 draw in 256) are
  the eight low bits ``r`` drawn, from ``splitmix64(key2, byte index)``. So every unit is kept
  with probability exactly ``k / 2**16``, independently, with 8.03 random bits on average.

splitmix64 (Steele, Lea & Flood 2014, the seeding generator of xoshiro) passes BigCrush on a
plain counter; two keys per dropout layer are drawn from the engine's private ``torch.Generator``,
so a seed still reproduces the samples.

Two more kernels serve the engine's callers: :func:`transpose_bias_activation` puts a narrow last
layer computed as W @ hᵀ back in row order, and :func:`classification_summary` summarises a few
rows' logits in one pass (:func:`service.ml.mc.summarize_classification`).

The kernels compile on first use (``cache=True`` keeps the machine code in ``__pycache__``, or in
numba's per-user cache where that is read-only); :func:`warm_up` pays that at process start.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from service.ml import mc_simd, numba_cache

_BYTE = np.uint64(255)
_LOW_BYTES = np.uint64(0x0101010101010101)

# Activations the kernel applies itself; others are applied by torch between two kernel calls.
IDENTITY = 0
RELU = 1

_FLAGS = dict(nogil=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)


@njit(inline="always")
def draw(words, first, units, key, key2, top, low):
    """Fill ``words`` with the words of units ``first .. first + units`` (global unit indices, byte
    ``u % 8`` of word ``u // 8``); bytes equal to ``top`` are settled by their low byte against
    ``low`` (set to 255 if kept, 0 if dropped). Returns the first unit's byte offset in ``words``:
    unit ``first + i`` is kept when byte ``offset + i`` is >= the threshold (``mask_parameters``).

    The words come with a flag bit per byte equal to ``top`` (1 in 256), 64 to a flag word; only
    those bytes draw a low byte, visited in order."""
    start = first // 8
    offset = first - 8 * start
    count = (offset + units + 7) // 8
    if count > words.size:  # the loops run without bounds checks
        raise ValueError("the words buffer is too small: see words_for")
    base = np.uint64(start)
    pattern = np.uint64(top) * _LOW_BYTES
    settle = low != 0  # else the threshold is a multiple of 256: the high byte decides alone
    flags = np.empty(mc_simd.flag_words(count) if settle else 0, dtype=np.uint64)
    mc_simd.splitmix_words(words, count, key, base, pattern, flags)
    for s in range(flags.size):
        equal = flags[s]  # bit b: byte b of words 8 s .. 8 s + 7 equals top
        while equal != 0:
            b = mc_simd.lowest_bit(equal)
            i = mc_simd.WORD_STEP * s + b // 8
            shift = np.uint64(8 * (b % 8))
            unit = (base + np.uint64(i)) * np.uint64(8) + np.uint64(b % 8)
            kept = np.uint64(np.intp(mc_simd.splitmix64(key2, unit) & _BYTE) >= low)  # no branch: 1 in 5 dropped
            words[i] = (words[i] & ~(_BYTE << shift)) | ((_BYTE * kept) << shift)
            equal &= equal - np.uint64(1)
    return offset


@njit(**_FLAGS)
def broadcast_dropout(prefix, out, words, row0, key, key2, top, low, threshold):
    """``out[r] = prefix[(row0 + r) % P] * mask[row0 + r]`` (0/1 masks; the scale is elsewhere),
    ``P`` = ``prefix``'s rows: the batch, or the batch repeated (``tiled_rows``).

    Rows and masks are gone over flat, in runs of whole prefixes: long loops however narrow the
    layer (a row of 13 units alone is too short for the vector loop)."""
    rows, width = out.shape
    units = rows * width
    offset = draw(words, row0 * width, units, key, key2, top, low)
    bytes_ = words.view(np.uint8)[offset : offset + units]
    flat = out.reshape(-1)
    source = prefix.reshape(-1)
    period = source.size
    limit = np.int32(threshold)  # bytes compared as int32: the loops run ~1.6x faster than with uint8
    k = 0
    p = (row0 % prefix.shape[0]) * width
    while k < units:  # slices, indexed from 0 by range(): numba then checks no negative indices
        n = min(period - p, units - k)
        dst, src, keep = flat[k : k + n], source[p : p + n], bytes_[k : k + n]
        for i in range(n):
            dst[i] = src[i] * np.float32(np.int32(keep[i]) >= limit)
        k += n
        p = 0


@njit(**_FLAGS)
def bias_activation_dropout(h, bias, activation, words, row0, key, key2, top, low, threshold):
    """In place: ``h = activation(h + bias) * mask``; an empty ``words``: no dropout.

    ``bias`` is the layer's bias repeated a whole number of times (``tiled_bias``), so that the
    rows are gone over flat, in runs of its length, as in :func:`broadcast_dropout`."""
    rows, width = h.shape
    units = rows * width
    flat = h.reshape(-1)
    period = bias.size
    zero = np.float32(0.0)
    relu = activation == RELU
    if words.size == 0:
        for k in range(0, units, period):
            n = min(period, units - k)
            dst = flat[k : k + n]
            if relu:
                for i in range(n):
                    dst[i] = max(dst[i] + bias[i], zero)
            else:
                for i in range(n):
                    dst[i] = dst[i] + bias[i]
        return
    offset = draw(words, row0 * width, units, key, key2, top, low)
    bytes_ = words.view(np.uint8)[offset : offset + units]
    limit = np.int32(threshold)  # bytes compared as int32: the loops run ~1.6x faster than with uint8
    for k in range(0, units, period):
        n = min(period, units - k)
        dst, keep = flat[k : k + n], bytes_[k : k + n]
        if relu:
            for i in range(n):
                dst[i] = max(dst[i] + bias[i], zero) * np.float32(np.int32(keep[i]) >= limit)
        else:
            for i in range(n):
                dst[i] = (dst[i] + bias[i]) * np.float32(np.int32(keep[i]) >= limit)


@njit(**_FLAGS)
def transpose_bias_activation(src, bias, activation, out):
    """``out [rows, n] = activation(srcᵀ + bias)`` from ``src [n, rows]``: a narrow last layer
    computed as W @ hᵀ, put back in row order with its bias (``bias[:n]``) and ReLU in one pass
    (torch's transposing copy alone took ~1.8x as long, for [10, 6400] on an Intel Xeon)."""
    n, rows = src.shape
    zero = np.float32(0.0)
    if activation == RELU:
        for r in range(rows):
            for j in range(n):
                out[r, j] = max(src[j, r] + bias[j], zero)
    else:
        for r in range(rows):
            for j in range(n):
                out[r, j] = src[j, r] + bias[j]


# The summary kernel keeps IEEE semantics (no fastmath): it must match torch's float64 steps.
_SUMMARY_FLAGS = dict(nogil=True, error_model="numpy", cache=True, boundscheck=False)


@njit(**_SUMMARY_FLAGS)
def classification_summary(logits, mean, std, predictive, expected, mutual, label):
    """The MC summary of logits ``[T, B, C]`` in one pass per input, in float64, as
    :func:`service.ml.mc.summarize_classification` computes it with torch ops: per sample the
    softmax (max-shifted) and its entropy (0 log 0 = 0), then over the samples the mean
    probabilities, their population std (two passes), the entropy of the mean, the mean entropy,
    their difference clamped at 0 and the first argmax. Fills the outputs (``mean``, ``std``
    ``[B, C]``; ``predictive``, ``expected``, ``mutual``, ``label`` ``[B]``) and returns True;
    returns False at the first logit that is not finite (the caller then takes torch's path)."""
    samples, rows, classes = logits.shape
    probabilities = np.empty((samples, classes))
    for b in range(rows):
        entropy_sum = 0.0
        for c in range(classes):
            mean[b, c] = 0.0
        for t in range(samples):
            top = -np.inf
            for c in range(classes):
                value = np.float64(logits[t, b, c])
                if not np.isfinite(value):
                    return False
                top = max(top, value)
            normaliser = 0.0
            for c in range(classes):
                e = np.exp(np.float64(logits[t, b, c]) - top)
                probabilities[t, c] = e
                normaliser += e
            log_normaliser = np.log(normaliser)
            entropy = 0.0
            for c in range(classes):
                p = probabilities[t, c] / normaliser
                probabilities[t, c] = p
                entropy -= p * ((np.float64(logits[t, b, c]) - top) - log_normaliser)
                mean[b, c] += p
            entropy_sum += entropy
        best, total = 0, 0.0
        for c in range(classes):
            q = mean[b, c] / samples
            mean[b, c] = q
            if q > 0.0:
                total -= q * np.log(q)
            if q > mean[b, best]:
                best = c
        for c in range(classes):
            spread = 0.0
            for t in range(samples):
                d = probabilities[t, c] - mean[b, c]
                spread += d * d
            std[b, c] = np.sqrt(spread / samples)
        predictive[b] = total
        expected[b] = entropy_sum / samples
        mutual[b] = max(total - expected[b], 0.0)
        label[b] = best
    return True


# Rows and biases are repeated to at least this many units, so that the kernels' flat loops run
# in long stretches (see broadcast_dropout).
RUN_UNITS = 256


def tiled_rows(prefix: np.ndarray) -> np.ndarray:
    """``prefix [P, width]`` repeated whole to at least RUN_UNITS units (itself if it has them)."""
    repeats = -(-RUN_UNITS // max(1, prefix.size))
    return prefix if repeats <= 1 else np.ascontiguousarray(np.tile(prefix, (repeats, 1)))


def tiled_bias(bias: np.ndarray) -> np.ndarray:
    """A layer's bias ``[width]`` repeated whole to at least RUN_UNITS units (contiguous float32)."""
    return np.ascontiguousarray(np.tile(bias.astype(np.float32), -(-RUN_UNITS // max(1, bias.size))))


def words_for(rows: int, width: int) -> int:
    """Words a kernel call over ``rows`` rows of ``width`` units needs (a block may start mid-word)."""
    return (rows * width + 7) // 8 + 1


def mask_parameters(keep_count: int) -> tuple[int, int, int]:
    """``(top, low, threshold)`` of keep probability ``keep_count / 2**16``: a unit is kept when its
    byte is >= threshold, except a byte equal to ``top`` with ``low`` > 0, kept when its low byte is
    >= low. For 256 <= keep_count < 2**16 (a threshold of at most 255 fits a byte)."""
    if not supports_keep_count(keep_count):
        raise ValueError(f"keep count {keep_count} is outside what the fused kernels draw")
    drop = (1 << 16) - keep_count
    top, low = drop >> 8, drop & 255
    return top, low, top if low == 0 else top + 1


def supports_keep_count(keep_count: int) -> bool:
    """Whether the kernels draw this keep probability: all but p > 0.9961 (and p = 0, no dropout)."""
    return 256 <= keep_count < (1 << 16)


def warm_up() -> None:
    """Compile (or load from the cache) every kernel signature the engine calls."""
    words = np.zeros(words_for(2, 3), dtype=np.uint64)
    prefix = np.ones((1, 3), dtype=np.float32)
    out = np.empty((2, 3), dtype=np.float32)
    key = np.uint64(1)
    broadcast_dropout(prefix, out, words, 0, key, key, 128, 0, 128)
    bias = tiled_bias(np.zeros(3, dtype=np.float32))
    bias_activation_dropout(out, bias, RELU, words, 0, key, key, 12, 205, 13)
    bias_activation_dropout(out, bias, IDENTITY, words[:0], 0, key, key, 0, 0, 0)
    transpose_bias_activation(out, bias, RELU, np.empty((3, 2), dtype=np.float32))
    logits = np.zeros((2, 1, 3), dtype=np.float32)
    classification_summary(logits, np.empty((1, 3)), np.empty((1, 3)), np.empty(1), np.empty(1), np.empty(1),
                           np.empty(1, dtype=np.int64))



# Their machine code holds mc_simd's (draw): flushed from numba's cache when either file changes.
numba_cache.refresh("mc_kernels", [broadcast_dropout, bias_activation_dropout, transpose_bias_activation,
                                   classification_summary], [__file__, mc_simd.__file__])

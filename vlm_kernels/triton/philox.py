"""Philox4x32-10 and Gumbel noise as ``@triton.jit`` helpers, bit-identical to ``csrc/common/philox.h``.

Contract (see the header): element ``i`` of a tensor takes word ``i % 4`` of the Philox4x32-10 call at
counter ``i // 4`` (counter words ``(lo32, hi32, 0, 0)``, key ``(seed lo32, seed hi32)``), the four
words ``tl.randint4x(seed, i // 4)`` returns; the word gives the uniform ``u`` (``tl.rand``'s mapping,
0 lifted to one step) and the noise is ``-vlm_logf(-vlm_logf(u))``, a fixed sequence of correctly
rounded fp32 fused multiply-adds.

* :func:`gumbel_noise4` gives the noise of the four elements ``4c .. 4c + 3`` of a tile of counters
  ``c`` (one Philox call per four elements); :func:`interleave4` lays four such tiles out as the
  elements in memory order. :func:`gumbel_noise` is the per-element form (any offsets, 4x the Philox
  work) for layouts whose groups of four straddle tiles.
* Every fp32 operation of the noise is explicit: ``tl.fma`` (a single rounding on every backend) or a
  multiply/add whose result is only ever bit-cast or fed to ``tl.fma``'s multiplicands, so contraction
  cannot change a bit. Kernels that call these helpers are still launched with ``enable_fp_fusion=False``
  (a launch keyword since Triton 2.2), which costs nothing here and keeps any future edit honest.
* Pass the seed as its two key words, signed int32 kernel arguments from :func:`seed_words` (one
  argument type for every seed, and no int64 argument in [2**31, 2**32), which the 3.8 interpreter
  mishandles), listed in ``do_not_specialize`` so a seed word equal to 1 compiles no kernel of its own.
* Triton's interpreter evaluates ``tl.fma`` as ``x * y + z`` in the argument dtype (two roundings);
  :func:`_install_exact_interpreter_fma` replaces it with a correctly rounded fp32 fma when the
  interpreter is on, so interpreted kernels give the GPU's bits.

The Philox rounds are written out here rather than taken from ``tl.randint4x``: older Triton releases
drop the high word of 64-bit offsets, and each 32 x 32 -> 64 product is written as one widening multiply
(one ``IMAD.WIDE.U32`` on sm_90 for both halves). Needs ``tl.join`` (Triton 3.0+).
"""

from __future__ import annotations

import os

import numpy as np
import triton
import triton.language as tl

# vlm_logf's constants (philox.h): log1p(f) ~ f + f^2 (-1/2 + f P(f)), P of degree 6, for the mantissa
# m = 1 + f in [sqrt(1/2), sqrt(2)); each is exactly the fp32 value of its literal.
LOG_P0 = tl.constexpr(0.086988375)
LOG_P1 = tl.constexpr(-0.14265683)
LOG_P2 = tl.constexpr(0.14914519)
LOG_P3 = tl.constexpr(-0.16577788)
LOG_P4 = tl.constexpr(0.19963127)
LOG_P5 = tl.constexpr(-0.25001332)
LOG_P6 = tl.constexpr(0.3333391)
LN2 = 0.6931471824645996  # fp32 ln 2 (0x3f317218)
LN2_2M23 = tl.constexpr(LN2 / 8388608)  # LN2 * 2^-23, exact in fp32


def seed_words(seed: int) -> tuple[int, int]:
    """The Philox key words (lo32, hi32) of a 64-bit ``seed`` (taken modulo 2**64), each as the signed
    int32 with the same bits: kernel arguments that Triton always types as i32."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = s & 0xFFFFFFFF, s >> 32
    return tuple(w - (1 << 32) if w >= (1 << 31) else w for w in (lo, hi))


@triton.jit
def _mul_wide(a, M: tl.constexpr):
    """(high, low) 32-bit words of the 64-bit product of uint32 ``a`` and the constant ``M``."""
    p = a.to(tl.uint64) * M
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox4(c0, c1, k0, k1):
    """Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1), all uint32: its four output words."""
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(10):
        hi_b, lo_b = _mul_wide(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_wide(c0, 0xD2511F53)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def uniform_from_bits(bits):
    """uint32 Philox word -> fp32 uniform in [0, 1): tl.rand's mapping."""
    r = bits.to(tl.int32, bitcast=True)
    r = r ^ (r >> 31)  # r < 0 ? -r - 1 : r
    return r.to(tl.float32) * 4.6566127342e-10


@triton.jit
def neg_vlm_logf(x):
    """-vlm_logf(x) for x = 0 or positive normal fp32: the fma sequence of philox.h.

    The exponent is kept as th = e * 2^23 (the high bits of b - 0x3f3504f3): float(th) is exact and
    float(th) * (LN2 * 2^-23) == e * LN2 exactly, so this is philox.h's fma(float(e), LN2, r) bit for bit
    with one integer op fewer; the negation is folded into the last fma (-fma(a, b, c) == fma(a, -b, -c)).
    """
    b = x.to(tl.int32, bitcast=True)
    th = (b - 0x3F3504F3) & -8388608  # e << 23, e = floor((b - 0x3f3504f3) / 2^23)
    f = (b - th).to(tl.float32, bitcast=True) - 1.0  # m - 1, m in [sqrt(1/2), sqrt(2)): exact
    p = tl.fma(f, LOG_P0, LOG_P1)
    p = tl.fma(p, f, LOG_P2)
    p = tl.fma(p, f, LOG_P3)
    p = tl.fma(p, f, LOG_P4)
    p = tl.fma(p, f, LOG_P5)
    p = tl.fma(p, f, LOG_P6)
    p = tl.fma(p, f, -0.5)
    r = tl.fma(p, f * f, f)  # log1p(f); f * f only feeds a multiplicand
    return tl.fma(th.to(tl.float32), -LN2_2M23, r * -1.0)


@triton.jit
def noise_from_bits(bits):
    """Gumbel(0, 1) noise -vlm_logf(-vlm_logf(u)) of a Philox word; always finite."""
    return neg_vlm_logf(neg_vlm_logf(uniform_from_bits(bits)))


@triton.jit
def _keys(seed_lo, seed_hi):
    return seed_lo.to(tl.int32).to(tl.uint32, bitcast=True), seed_hi.to(tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def _counter_words(counter):
    c64 = counter.to(tl.int64)
    return c64.to(tl.uint32), (c64 >> 32).to(tl.uint32)


@triton.jit
def gumbel_noise4(seed_lo, seed_hi, counter):
    """fp32 noise (g0, g1, g2, g3) of the elements 4 * counter + j, for a tile of non-negative counters
    (any int type) under the seed whose key words are ``seed_lo``/``seed_hi`` (see :func:`seed_words`)."""
    k0, k1 = _keys(seed_lo, seed_hi)
    c0, c1 = _counter_words(counter)
    w0, w1, w2, w3 = philox4(c0, c1, k0, k1)
    return noise_from_bits(w0), noise_from_bits(w1), noise_from_bits(w2), noise_from_bits(w3)


@triton.jit
def gumbel_noise(seed_lo, seed_hi, offset):
    """fp32 noise of the elements at ``offset`` (any tile of non-negative offsets, any int type): one
    Philox call per element, its word ``offset % 4`` kept. For layouts whose groups of four straddle
    tiles; :func:`gumbel_noise4` does a quarter of the Philox work."""
    k0, k1 = _keys(seed_lo, seed_hi)
    off = offset.to(tl.int64)
    c0, c1 = _counter_words(off >> 2)
    w0, w1, w2, w3 = philox4(c0, c1, k0, k1)
    j = (off & 3).to(tl.int32)
    w = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
    return noise_from_bits(w)


@triton.jit
def interleave4(a0, a1, a2, a3):
    """Four [R, N] tiles -> one [R, 4N] tile whose column 4n + j is a_j[:, n] (the memory order of the
    groups of four). In registers: the joined axes stay inside a thread."""
    R: tl.constexpr = a0.shape[0]
    N: tl.constexpr = a0.shape[1]
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [R, 4 * N])


# ----------------------------------------------------------------------------------------------------
# The interpreter's fma.


def fma_f32_exact(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Correctly rounded fp32 fma of fp32 arrays: x * y is exact in float64, the float64 sum is rounded to
    odd (its exact error from TwoSum), then rounded to fp32 once -- no double rounding (53 >= 24 + 2)."""
    x64, y64, z64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (x, y, z))
    with np.errstate(invalid="ignore", over="ignore"):
        p = x64 * y64
        s = p + z64
        bp = s - p
        err = (p - (s - bp)) + (z64 - bp)
        inexact = np.isfinite(err) & (err != 0) & ((s.view(np.int64) & 1) == 0)
        s = np.where(inexact, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def _install_exact_interpreter_fma() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no interpreter in this Triton
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_fma", None)
    if original is None or getattr(original, "_vlm_exact", False):
        return

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return original(self, x, y, z)
        x_d, y_d, z_d = np.broadcast_arrays(x.data, y.data, z.data)
        return interpreter.TensorHandle(fma_f32_exact(x_d, y_d, z_d), z.dtype.scalar)

    create_fma._vlm_exact = True
    builder.create_fma = create_fma


_install_exact_interpreter_fma()

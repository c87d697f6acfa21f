"""Philox4x32-10 and Gumbel noise as ``@triton.jit`` helpers, bit-identical to ``csrc/common/philox.h``.

Contract (see the header): for element ``offset`` of a tensor and a 64-bit ``seed``, the Philox
counter is ``(offset lo32, offset hi32, 0, 0)`` and the key ``(seed lo32, seed hi32)``; the first output
word gives the uniform ``u`` (``tl.rand``'s mapping, 0 lifted to one step) and the noise is
``-vlm_logf(-vlm_logf(u))``, a fixed sequence of fp32 multiplies and adds.

Bit-exactness needs two things from every kernel that calls :func:`gumbel_noise`:

* launch it with ``enable_fp_fusion=False`` (a launch keyword since Triton 2.2): by default Triton
  contracts ``a * b + c`` into an FMA, whose single rounding differs from the header's ``fmul`` then
  ``fadd``;
* pass the seed as its two key words, signed int32 kernel arguments from :func:`seed_words` (one
  argument type for every seed, and no int64 argument in [2**31, 2**32), which the 3.8 interpreter
  mishandles), listed in ``do_not_specialize`` so a seed word equal to 1 compiles no kernel of its own.

The Philox rounds are written out here rather than taken from ``tl.philox``/``tl.randint``: older
Triton releases drop the high word of 64-bit offsets in ``tl.randint``, and this way every release
from 3.2 on runs the same integer ops.
"""

from __future__ import annotations

import triton
import triton.language as tl


def seed_words(seed: int) -> tuple[int, int]:
    """The Philox key words (lo32, hi32) of a 64-bit ``seed`` (taken modulo 2**64), each as the signed
    int32 with the same bits: kernel arguments that Triton always types as i32."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = s & 0xFFFFFFFF, s >> 32
    return tuple(w - (1 << 32) if w >= (1 << 31) else w for w in (lo, hi))


@triton.jit
def philox_first(c0, c1, k0, k1):
    """First output word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1); all uint32."""
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def vlm_logf(x):
    """Natural log of positive normal fp32 values: the op sequence of ``vlm_logf`` in philox.h."""
    b = x.to(tl.int32, bitcast=True)
    e = (b - 0x3F3504F3) >> 23  # arithmetic shift: the mantissa lands in [sqrt(1/2), sqrt(2))
    m = (b - (e << 23)).to(tl.float32, bitcast=True)
    f = m - 1.0
    p = f * -0.072297103703022 + 0.12446440011262894
    p = p * f + -0.13166923820972443
    p = p * f + 0.1424783170223236
    p = p * f + -0.166270911693573
    p = p * f + 0.19999174773693085
    p = p * f + -0.2500067949295044
    p = p * f + 0.3333335816860199
    z = f * f
    r = (f - 0.5 * z) + (z * f) * p
    ef = e.to(tl.float32)
    return ef * 0.693359375 + (r + ef * -2.12194440e-4)


@triton.jit
def uniform_from_bits(bits):
    """uint32 Philox word -> fp32 uniform in [4.66e-10, 1): tl.rand's mapping with 0 lifted to one step."""
    r = bits.to(tl.int32, bitcast=True)
    r = tl.where(r < 0, ~r, r)  # ~r == -r - 1 without the overflow at INT32_MIN
    r = tl.maximum(r, 1)
    return r.to(tl.float32) * 4.6566127342e-10


@triton.jit
def gumbel_noise(seed_lo, seed_hi, offset):
    """fp32 Gumbel(0, 1) noise for the element offsets ``offset`` (int64, or any int type holding
    non-negative values) under the seed whose key words are ``seed_lo``/``seed_hi`` (int32 scalars, see
    :func:`seed_words`). Launch the calling kernel with ``enable_fp_fusion=False``."""
    k0 = seed_lo.to(tl.int32).to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.int32).to(tl.uint32, bitcast=True)
    offset64 = offset.to(tl.int64)
    c0 = offset64.to(tl.uint32)
    c1 = (offset64 >> 32).to(tl.uint32)
    u = uniform_from_bits(philox_first(c0, c1, k0, k1))
    # `x * -1.0` is an exact negation (the sign of a zero included), unlike Triton's `-x` (0 - x).
    return vlm_logf(vlm_logf(u) * -1.0) * -1.0

"""Philox4x32-10 and Gumbel noise in plain PyTorch integer/float32 ops: the oracle for every backend.

Bit-for-bit mirror of ``csrc/common/philox.h`` (read its header for the contract). Unsigned 32-bit
words are held in int64 tensors in [0, 2**32); products are split so nothing overflows int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10

LOG_COEFFS = (
    -0.072297103703022,
    0.12446440011262894,
    -0.13166923820972443,
    0.1424783170223236,
    -0.166270911693573,
    0.19999174773693085,
    -0.2500067949295044,
    0.3333335816860199,
)
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of constant ``a`` and uint32 words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    mid = hi_part + (lo_part >> 16)
    high = mid >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    return high, low


def philox_first(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """First output word of Philox4x32-10, counter (offset lo, offset hi, 0, 0), key (seed lo, seed hi).

    ``offset`` is an int64 tensor of non-negative element indices; returns int64 words in [0, 2**32).
    """
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0 = offset & MASK32
    c1 = (offset >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """tl.rand's mapping of a uint32 word to [0, 1) in float32, with 0 lifted to the smallest step."""
    r = torch.where(bits >= 2**31, bits - 2**32, bits)  # reinterpret as int32
    r = torch.where(r < 0, -r - 1, r).clamp_min(1)
    return r.to(torch.int32).to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def vlm_logf(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values with the exact op sequence of ``vlm_logf``."""
    f32 = torch.float32

    def c(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=f32, device=x.device)

    b = x.contiguous().view(torch.int32)
    e = (b - 0x3F3504F3) >> 23
    m = (b - e * (1 << 23)).view(f32)
    f = m - c(1.0)
    p = c(LOG_COEFFS[0]).expand_as(f)
    for coeff in LOG_COEFFS[1:]:
        p = p * f + c(coeff)
    z = f * f
    r = (f - c(0.5) * z) + (z * f) * p
    ef = e.to(f32)
    return ef * c(LN2_HI) + (r + ef * c(LN2_LO))


def gumbel_noise(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 Gumbel(0, 1) noise for a contiguous tensor of ``shape``: element i uses Philox offset i."""
    numel = 1
    for s in shape:
        numel *= int(s)
    offsets = torch.arange(numel, dtype=torch.int64, device=device)
    u = uniform_from_bits(philox_first(offsets, seed))
    return (-vlm_logf(-vlm_logf(u))).reshape(shape)

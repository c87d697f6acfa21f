"""Philox4x32-10 and Gumbel noise in plain PyTorch integer/float ops: the oracle for every backend.

Bit-for-bit mirror of ``csrc/common/philox.h`` (read its header for the contract): element ``i`` takes
word ``i % 4`` of the Philox4x32-10 call at counter ``i // 4``. Unsigned 32-bit words are held in int64
tensors in [0, 2**32); products are split so nothing overflows int64. PyTorch has no fused multiply-add,
so :func:`fma_f32` emulates a correctly rounded fp32 one in float64 (round to odd, then to fp32).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10

# vlm_logf: log1p(f) ~ f + f^2 (-1/2 + f P(f)); P's coefficients, highest degree first (exact fp32 values).
LOG_COEFFS = (0.086988375, -0.14265683, 0.14914519, -0.16577788, 0.19963127, -0.25001332, 0.3333391)
LN2 = 0.6931471824645996  # fp32 ln 2, 0x3f317218


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of constant ``a`` and uint32 words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    mid = hi_part + (lo_part >> 16)
    high = mid >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    return high, low


def philox4(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 at counter (counter lo, counter hi, 0, 0), key (seed lo,
    seed hi): ``tl.randint4x(seed, counter)``. ``counter`` is an int64 tensor of non-negative values;
    returns four int64 tensors of words in [0, 2**32)."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
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
    return c0, c1, c2, c3


def philox_word(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """The Philox word of each element offset: word ``offset % 4`` of the call at counter ``offset // 4``."""
    words = torch.stack(philox4(offset >> 2, seed))
    return words.gather(0, (offset & 3).unsqueeze(0)).squeeze(0)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """tl.rand's mapping of a uint32 word to [0, 1) in float32 (0 included)."""
    r = torch.where(bits >= 2**31, bits - 2**32, bits)  # reinterpret as int32
    r = torch.where(r < 0, -r - 1, r)
    return r.to(torch.int32).to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def fma_f32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 fused multiply-add ``x * y + z`` (one rounding), as std::fmaf/__fmaf_rn/tl.fma.

    The fp32 product is exact in float64 (48 <= 53 bits); the float64 sum is rounded to odd -- its exact
    error from TwoSum decides the direction -- and the round-to-odd value rounds to the correctly rounded
    fp32 result (53 >= 24 + 2 bits). Arguments broadcast; non-finite sums are left to IEEE arithmetic.
    """
    x64, y64, z64 = (t.to(torch.float32).to(torch.float64) for t in torch.broadcast_tensors(x, y, z))
    p = x64 * y64
    s = p + z64
    bp = s - p
    err = (p - (s - bp)) + (z64 - bp)
    even = (s.view(torch.int64) & 1) == 0
    to_odd = torch.isfinite(err) & (err != 0) & even
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where(to_odd, torch.nextafter(s, toward), s).to(torch.float32)


def vlm_logf(x: torch.Tensor) -> torch.Tensor:
    """Natural log of float32 values that are 0 or positive normal, with the exact op sequence of
    ``vlm_logf`` (vlm_logf(0) = fp32(-127 ln 2))."""
    f32 = torch.float32

    def c(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=f32, device=x.device)

    b = x.contiguous().view(torch.int32)
    e = (b - 0x3F3504F3) >> 23
    f = (b - e * (1 << 23)).view(f32) - c(1.0)  # exact
    p = fma_f32(f, c(LOG_COEFFS[0]), c(LOG_COEFFS[1]))
    for coeff in LOG_COEFFS[2:] + (-0.5,):
        p = fma_f32(p, f, c(coeff))
    r = fma_f32(p, f * f, f)
    return fma_f32(e.to(f32), c(LN2), r)


def noise_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-vlm_logf(-vlm_logf(u))`` of Philox words (float32, always finite)."""
    return -vlm_logf(-vlm_logf(uniform_from_bits(bits)))


def gumbel_noise_at(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """Float32 noise of the elements with linear indices ``offset`` (an int64 tensor, values >= 0)."""
    return noise_from_bits(philox_word(offset, seed))


def gumbel_noise(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 Gumbel(0, 1) noise for a contiguous tensor of ``shape``: element i uses Philox offset i."""
    numel = 1
    for s in shape:
        numel *= int(s)
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox4(counters, seed), dim=1).reshape(-1)[:numel]  # word j of call c at 4c + j
    return noise_from_bits(words).reshape(shape)

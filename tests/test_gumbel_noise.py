"""The Gumbel noise contract (csrc/common/philox.h): Philox4x32-10 words, the correctly rounded fma the log
is built from, and the same noise bits from the reference, the cpu extension and the Triton helpers at
any offset (around 2^31, 2^32 and beyond included), plus the Triton kernels' tile paths (aligned groups of
four, per-element words, looped chunks) against the reference."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import vlm_kernels as vk
from vlm_kernels import _backend
from vlm_kernels.reference import gumbel as ref
from vlm_kernels.reference.philox import (
    LN2,
    fma_f32,
    gumbel_noise,
    gumbel_noise_at,
    noise_from_bits,
    philox4,
    philox_word,
    vlm_logf,
)

try:  # the Triton kernels of these tests are defined at module level (the JIT reads module globals)
    import triton
    import triton.language as tl

    from vlm_kernels.triton import philox as tphilox
except Exception:  # noqa: BLE001 - no Triton here: those tests skip
    triton = None

SEEDS = (0, 1234, 2**40 + 17, 2**64 - 1)
# Element offsets around the int32 / uint32 boundaries and far beyond (the counter's high word).
BOUNDARY_OFFSETS = [0, 1, 2, 3, 4, 5, 2**31 - 5, 2**31 - 4, 2**31 - 1, 2**31, 2**31 + 1, 2**31 + 4,
                    2**32 - 5, 2**32 - 4, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 3, 2**32 + 4, 2**33 + 2,
                    2**34 - 1, 2**40 + 3, 2**62 + 6, 12345678901]


def _bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.int32).tolist()


def _triton_or_skip():
    reason = _backend.device_reason("triton", torch.device("cpu"))
    if reason:
        pytest.skip(reason)


def _cpu_or_skip():
    reason = _backend.device_reason("cpu", torch.device("cpu"))
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------
# The fma


def _round_to_f32(v: Fraction) -> float:
    """Exact value -> nearest fp32 (ties to even), IEEE overflow to inf; by exact rational arithmetic."""
    if v == 0:
        return 0.0
    sign = -1.0 if v < 0 else 1.0
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+2)
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)  # ulp in this binade, or the subnormal step
    q, rem = divmod(a, quantum)
    if rem * 2 > quantum or (rem * 2 == quantum and q % 2 == 1):
        q += 1
    r = q * quantum
    if r >= Fraction(2) ** 128:
        return sign * math.inf
    return sign * float(r)


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _fma_cases(n: int = 1500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random and adversarial fp32 triples: wide exponents, exact cancellations, results near ties and in
    the subnormal range."""
    rng = random.Random(0)
    xs, ys, zs = [], [], []

    def rand_f32(lo: int, hi: int) -> float:
        return _f32((rng.getrandbits(1) << 31) | (rng.randint(lo, hi) << 23) | rng.getrandbits(23))

    for _ in range(n):
        x, y = rand_f32(100, 154), rand_f32(100, 154)
        p = Fraction(x) * Fraction(y)
        kind = rng.randrange(5)
        if kind == 0:
            z = rand_f32(60, 194)
        elif kind == 1:  # cancel the product's leading bits
            z = -_round_to_f32(p)
        elif kind == 2:  # the sum lands near a tie of the product's binade
            z = _round_to_f32(-p + Fraction(_round_to_f32(p)) / 2**25)
        elif kind == 3:  # tiny addend: only the sticky bits change
            z = rand_f32(1, 60)
        else:  # subnormal or near-subnormal results
            x, y = rand_f32(40, 70), rand_f32(40, 70)
            z = rand_f32(1, 10)
        xs.append(x)
        ys.append(y)
        zs.append(z)
    arr = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    return arr(xs), arr(ys), arr(zs)


def _exact_fma(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.array([_round_to_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))
                     for a, b, c in zip(x, y, z)], dtype=np.float32)


def test_reference_fma_is_correctly_rounded():
    x, y, z = _fma_cases()
    exact = _exact_fma(x, y, z)
    got = fma_f32(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(z)).numpy()
    assert np.array_equal(got.view(np.int32), exact.view(np.int32))
    # The naive float32 x * y + z (two roundings) differs on these cases: the test can fail.
    naive = (x * y + z).astype(np.float32)
    assert not np.array_equal(naive.view(np.int32), exact.view(np.int32))


def test_numpy_fma_of_the_interpreter_patch_is_correctly_rounded():
    from vlm_kernels.triton.philox import fma_f32_exact

    x, y, z = _fma_cases(500)
    assert np.array_equal(fma_f32_exact(x, y, z).view(np.int32), _exact_fma(x, y, z).view(np.int32))


if triton is not None:

    @triton.jit
    def fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, B: tl.constexpr):
        i = tl.arange(0, B)
        m = i < n
        tl.store(out_ptr + i, tl.fma(tl.load(x_ptr + i, mask=m), tl.load(y_ptr + i, mask=m), tl.load(z_ptr + i, mask=m)),
                 mask=m)

    @triton.jit
    def randint4x_kernel(c_ptr, out_ptr, seed, B: tl.constexpr):
        i = tl.arange(0, B)
        w0, w1, w2, w3 = tl.randint4x(seed, tl.load(c_ptr + i))
        tl.store(out_ptr + 4 * i, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64) & 0xFFFFFFFF)

    @triton.jit(do_not_specialize=["lo", "hi"])
    def per_element_noise_kernel(off_ptr, out_ptr, lo, hi, n, B: tl.constexpr):
        i = tl.arange(0, B)
        m = i < n
        tl.store(out_ptr + i, tphilox.gumbel_noise(lo, hi, tl.load(off_ptr + i, mask=m, other=0)), mask=m)

    @triton.jit(do_not_specialize=["lo", "hi"])
    def grouped_noise_kernel(c_ptr, out_ptr, lo, hi, B: tl.constexpr):
        c = tl.load(c_ptr + tl.arange(0, B))[None, :]
        g0, g1, g2, g3 = tphilox.gumbel_noise4(lo, hi, c)
        tl.store(out_ptr + tl.arange(0, 4 * B)[None, :], tphilox.interleave4(g0, g1, g2, g3))


def test_interpreted_tl_fma_is_correctly_rounded():
    _triton_or_skip()
    x, y, z = _fma_cases(300)
    out = torch.empty(len(x))
    fma_kernel[(1,)](torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(z), out, len(x), B=512)
    assert np.array_equal(out.numpy().view(np.int32), _exact_fma(x, y, z).view(np.int32))


# ---------------------------------------------------------------------------------------------------
# Philox words and the noise layout


def test_philox4_is_tritons_randint4x():
    """Our rounds against Triton's own tl.randint4x (64-bit counters: Triton 3.8 keeps the high word)."""
    _triton_or_skip()
    counters = torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 77, 123456789,
                             2**61, 5, 6, 7], dtype=torch.int64)
    for seed in (0, 1, 2**40 + 17, 2**63 - 1):
        out = torch.zeros(4 * len(counters), dtype=torch.int64)
        randint4x_kernel[(1,)](counters, out, seed, B=len(counters))
        assert torch.equal(out.view(-1, 4), torch.stack(philox4(counters, seed), dim=1)), seed


def test_element_takes_word_i_mod_4_of_call_i_div_4():
    seed = 99
    i = torch.arange(4003)
    words = torch.stack(philox4(i // 4, seed))
    expected = words[i % 4, i]
    assert torch.equal(philox_word(i, seed), expected)
    assert _bits(gumbel_noise((4003,), seed)) == _bits(noise_from_bits(expected))
    assert _bits(gumbel_noise((7, 11, 13), seed).reshape(-1)) == _bits(gumbel_noise_at(torch.arange(1001), seed))


def test_vlm_logf_accuracy_and_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(400_000, dtype=torch.float64).uniform_(math.log(4.6e-10), math.log(22.0), generator=g))
    x = torch.cat([x.float(), torch.tensor([1.0, 0.5, 2.0, 0.70710677, 0.7071068, 1.4142135, 1.4142137, 21.48756])])
    exact = torch.log(x.double())
    ulp = (torch.nextafter(exact.abs().float(), torch.tensor(math.inf)) - exact.abs().float()).double()
    err = ((vlm_logf(x).double() - exact).abs() / ulp).max().item()
    assert err < 1.2, err
    assert vlm_logf(torch.tensor([0.0])).item() == np.float32(-127 * np.float32(LN2))


def test_noise_is_gumbel_distributed():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = gumbel_noise((400_000,), 31).double().numpy()
    assert np.isfinite(g).all()
    assert scipy_stats.kstest(g, scipy_stats.gumbel_r.cdf).pvalue > 1e-4


# ---------------------------------------------------------------------------------------------------
# The same bits from every backend, at any offset


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_noise_matches_reference_at_boundaries(seed):
    _cpu_or_skip()
    for start in BOUNDARY_OFFSETS:
        for n in (1, 3, 16, 37, 70):
            got = torch.ops.vlm_kernels_C.gumbel_noise_cpu(seed - 2**64 if seed >= 2**63 else seed, start, n)
            want = gumbel_noise_at(torch.arange(start, start + n, dtype=torch.int64), seed)
            assert _bits(got) == _bits(want), (seed, start, n)


@pytest.mark.parametrize("seed", SEEDS)
def test_triton_noise_helpers_match_reference_at_boundaries(seed):
    _triton_or_skip()
    lo, hi = tphilox.seed_words(seed)
    offsets = torch.tensor(BOUNDARY_OFFSETS, dtype=torch.int64)
    out = torch.empty(len(offsets))
    per_element_noise_kernel[(1,)](offsets, out, lo, hi, len(offsets), B=32)
    assert _bits(out) == _bits(gumbel_noise_at(offsets, seed))
    counters = torch.tensor([0, 1, 2**29 - 1, 2**29, 2**30 - 1, 2**30, 2**31 + 5, 2**38 + 1], dtype=torch.int64)
    out4 = torch.empty(4 * len(counters))
    grouped_noise_kernel[(1,)](counters, out4, lo, hi, B=len(counters))
    elements = (counters[:, None] * 4 + torch.arange(4)).reshape(-1)
    assert _bits(out4) == _bits(gumbel_noise_at(elements, seed))


# ---------------------------------------------------------------------------------------------------
# Triton kernel paths: aligned groups of four (rows with K % 4 == 0, columns with inner % 4 == 0), one
# word per element otherwise, single-pass tiles and looped chunks (max_block), masked and exact tiles.

TRITON_PATH_CASES = [
    ((6, 16), 1),        # aligned rows, exact tile
    ((5, 12), 1),        # aligned rows, masked tile
    ((3, 37), 1),        # unaligned rows
    ((2, 40, 12), 1),    # aligned columns
    ((2, 8, 16), 1),     # aligned columns, exact tile
    ((2, 9, 6), 1),      # unaligned columns
    ((3, 20, 4), 1),     # aligned columns, one group per line
    ((2, 3, 5, 8), 2),   # aligned columns over a middle dim
]


@pytest.mark.parametrize("shape,dim", TRITON_PATH_CASES)
@pytest.mark.parametrize("max_block", [None, 8, 32])
def test_triton_tile_paths_match_reference(shape, dim, max_block):
    _triton_or_skip()
    from vlm_kernels.triton import gumbel as tg

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    seed = 2**33 + 7
    for hard in (False, True):
        y = tg.gumbel_softmax_forward(x, seed, 0.6, hard, dim, max_block=max_block)
        r = ref.gumbel_softmax_forward(x, seed, 0.6, hard, dim)
        if hard:
            assert torch.equal(y, r)
        else:
            torch.testing.assert_close(y, r, atol=2e-6, rtol=1e-5)
        dy = torch.randn(shape, generator=g)
        saved = x if hard else r
        torch.testing.assert_close(tg.gumbel_softmax_backward(dy, saved, seed, 0.6, hard, dim, max_block=max_block),
                                   ref.gumbel_softmax_backward(dy, saved, seed, 0.6, hard, dim), atol=1e-5, rtol=1e-5)
    assert torch.equal(tg.gumbel_argmax(x, seed, dim, max_block=max_block), ref.gumbel_argmax(x, seed, dim))


@pytest.mark.parametrize("shape,dim", [((4, 40), 1), ((2, 40, 8), 1), ((3, 37), 1), ((2, 33, 6), 1)])
def test_triton_looped_argmax_ties_and_nan_across_chunks(shape, dim):
    """Chunks of 8 along K: the first maximum wins across chunks, the first NaN wins, all -inf gives 0."""
    _triton_or_skip()
    from vlm_kernels.triton import gumbel as tg

    seed = 5
    x = -gumbel_noise(shape, seed)  # every z is exactly 0: a tie everywhere
    x.select(dim, 21).fill_(2.0**30)
    x.select(dim, 30).fill_(2.0**30)  # 2^30 + g rounds to 2^30: k = 21 and 30 tie, 21 wins
    x.select(0, 1).fill_(float("-inf"))
    x[0].select(dim - 1, 25).fill_(float("nan"))
    x[0].select(dim - 1, 9).fill_(float("nan"))  # two NaNs in row/column 0: the first (9) wins
    for max_block in (8, None):
        idx = tg.gumbel_argmax(x, seed, dim, max_block=max_block)
        assert torch.equal(idx, ref.gumbel_argmax(x, seed, dim)), max_block
        assert (idx[0] == 9).all() and (idx[1] == 0).all() and (idx[2:] == 21).all()
        hard = tg.gumbel_softmax_forward(x, seed, 1.0, True, dim, max_block=max_block)
        torch.testing.assert_close(hard, ref.gumbel_softmax_forward(x, seed, 1.0, True, dim), atol=0, rtol=0,
                                   equal_nan=True)
        # rows 0 (NaN) and 1 (only -inf) are NaN, as their soft rows are (eager's y_hard - sg(y_soft) + y_soft)
        assert torch.isnan(hard[:2]).all() and not torch.isnan(hard[2:]).any()
        soft = tg.gumbel_softmax_forward(x, seed, 1.0, False, dim, max_block=max_block)
        assert torch.isnan(soft[:2]).all() and torch.isfinite(soft[2:]).all()


def test_same_noise_on_every_cpu_backend_for_a_sliced_tensor():
    """A non-contiguous or offset view is made contiguous first: element i of the contiguous logits takes
    word i % 4 of call i // 4 on every backend."""
    names = [b for b in ("reference", "cpu", "triton") if not _backend.device_reason(b, torch.device("cpu"))]
    base = torch.randn(3, 50, 9)
    x = base[:, 1:, 1:]  # storage offset, not contiguous
    outs = {}
    for name in names:
        with vk.use_backend(name):
            outs[name] = (vk.gumbel_argmax(x, dim=1, seed=2**32 + 1), vk.gumbel_softmax(x, hard=True, dim=2, seed=3))
    for name in names[1:]:
        assert torch.equal(outs[name][0], outs[names[0]][0]) and torch.equal(outs[name][1], outs[names[0]][1]), name

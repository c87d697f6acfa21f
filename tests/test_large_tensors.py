"""Large tensors (issue 12): index arithmetic stays right past 2**31 elements on CPU.

A float16 (32774, 65536) tensor holds 2**31 + 393,216 elements (4 GiB). Planted spikes in the last rows
and columns check the addressing of the reads (a wrapped 32-bit offset reads another row, or before
the buffer); rows without a spike check the Philox counter, which is the element's 64-bit linear index:
their expected index is computed from the noise at those exact offsets and differs from what a
counter kept in a signed 32-bit int would draw (asserted, so the test can tell the two apart).

Marked ``slow``; they take minutes, so they run with VLM_KERNELS_ROBUST=long (not in the CI budget), and
are skipped when less than 12 GiB of memory is available.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels.reference import philox

from _robust import LONG

ROWS, COLS = 2 ** 15 + 6, 2 ** 16  # rows 32768.. start past 2**31
NEED_GIB = 12
SEED = 1234
SPIKE = 100.0  # far above any finite Gumbel draw (< 22)


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2 ** 20
    except (OSError, KeyError, ValueError):
        return 0.0


def noise_at(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """The Gumbel noise of the elements at linear ``offsets`` (the reference's ``gumbel_noise`` for
    arbitrary offsets; ``test_noise_at_matches_the_reference`` keeps the two in step)."""
    return philox.gumbel_noise_at(offsets, seed)


def test_noise_at_matches_the_reference():
    n = 1000
    assert torch.equal(noise_at(torch.arange(n), SEED), philox.gumbel_noise((n,), SEED))


_big_memory = pytest.mark.skipif(_available_gib() < NEED_GIB, reason=f"needs {NEED_GIB} GiB of available memory")
_long_budget = pytest.mark.skipif(not LONG, reason="minutes per test: runs with VLM_KERNELS_ROBUST=long")


def big(f):
    return _long_budget(_big_memory(f))


@pytest.fixture(scope="class")
def logits():
    x = torch.zeros(ROWS, COLS, dtype=torch.float16)
    assert x.numel() > 2 ** 31
    yield x
    del x


# (row, column) spikes: rows at the start, astride 2**31 and at the end; their columns hold no other spike
SPIKES = [(0, 5), (1, COLS - 1), (2 ** 31 // COLS, 17), (ROWS - 2, 7), (ROWS - 1, COLS - 2), (ROWS - 1, 3)]


def _expected_row_argmax(row: int) -> tuple[int, int]:
    """(index with 64-bit offsets, index a signed 32-bit counter would give) for a row of zeros."""
    offsets = row * COLS + torch.arange(COLS, dtype=torch.int64)
    right = int(noise_at(offsets, SEED).argmax())
    # int32 overflow, sign-extended (the Philox counter then takes the 64-bit two's complement bits)
    wrapped = torch.where(offsets >= 2 ** 31, offsets - 2 ** 32, offsets)
    return right, int(noise_at(wrapped, SEED).argmax())


@pytest.mark.slow
@big
class TestOneHugeTensor:
    """The 4 GiB logits are shared by these tests and freed before the VQ test allocates its own."""

    def test_gumbel_argmax_along_rows_past_2_31(self, logits):
        for r, c in SPIKES:
            logits[r, c] = SPIKE
        try:
            idx = vk.gumbel_argmax(logits, dim=-1, seed=SEED)
        finally:
            for r, c in SPIKES:
                logits[r, c] = 0
        assert idx.shape == (ROWS,)
        # Row ROWS - 1 holds two equal spikes: the noise picks one of them.
        for r, c in SPIKES:
            if r != ROWS - 1:
                assert int(idx[r]) == c, f"row {r}: got {int(idx[r])}, the spike is at {c}"
        assert int(idx[ROWS - 1]) in (3, COLS - 2)
        discriminating = 0
        spiked = {r for r, _ in SPIKES}
        for r in (r for r in range(2 ** 31 // COLS, ROWS) if r not in spiked):
            right, wrapped = _expected_row_argmax(r)
            assert int(idx[r]) == right, f"row {r} (offsets from {r * COLS}): got {int(idx[r])}, expected {right}"
            discriminating += right != wrapped
        assert discriminating, "no checked row tells a 64-bit counter from a wrapped 32-bit one"


    def test_gumbel_argmax_along_columns_past_2_31(self, logits):
        """dim=0: the category stride is a whole row (65536 elements), so category r sits at r * 65536."""
        cols = [c for _, c in SPIKES]
        for r, c in SPIKES:
            logits[r, c] = SPIKE
        try:
            idx = vk.gumbel_argmax(logits, dim=0, seed=SEED)
        finally:
            for r, c in SPIKES:
                logits[r, c] = 0
        assert idx.shape == (COLS,)
        for r, c in SPIKES:
            assert int(idx[c]) == r, f"column {c}: got {int(idx[c])}, the spike is at row {r}"
        free = next(c for c in range(COLS - 1, 0, -1) if c not in cols)
        offsets = torch.arange(ROWS, dtype=torch.int64) * COLS + free
        assert int(idx[free]) == int(noise_at(offsets, SEED).argmax())


    def test_categorical_kl_uniform_past_2_31(self, logits):
        """KL per row reads every element: rows of zeros give 0, spiked rows their own value."""
        for r, c in SPIKES:
            logits[r, c] = SPIKE / 10
        try:
            kl = vk.categorical_kl_uniform(logits, dim=-1)
        finally:
            for r, c in SPIKES:
                logits[r, c] = 0
        spiked = {r for r, _ in SPIKES}
        one = torch.zeros(1, COLS, dtype=torch.float64)
        one[0, 5] = SPIKE / 10
        expect_one = float(vk.categorical_kl_uniform(one, dim=-1))
        for r in spiked - {ROWS - 1}:
            assert math.isclose(float(kl[r]), expect_one, rel_tol=5e-3), (r, float(kl[r]), expect_one)
        others = torch.ones(ROWS, dtype=torch.bool)
        others[list(spiked)] = False
        assert float(kl[others].abs().max()) < 1e-3


VQ_ROWS, VQ_DIM = 2 ** 24 + 9, 128


@pytest.mark.slow
@big
def test_vq_past_2_31():
    """vq_nearest and vq_code_stats on (2**24 + 9, 128) float16 rows (2**31 + 1152 elements): the last
    rows equal given codes exactly, and each code's statistics count its rows."""
    x = torch.zeros(VQ_ROWS, VQ_DIM, dtype=torch.float16)
    codebook = torch.zeros(4, VQ_DIM, dtype=torch.float16)
    codebook[1], codebook[2], codebook[3] = 1.0, -1.0, 0.5
    x[-1], x[-2], x[-5] = 1.0, -1.0, 0.5
    x[2 ** 31 // VQ_DIM] = -1.0  # the row that starts at element 2**31
    index, distance = vk.vq_nearest(x, codebook)
    assert int(index[-1]) == 1 and int(index[-2]) == 2 and int(index[-5]) == 3 and int(index[2 ** 31 // VQ_DIM]) == 2
    assert int((index != 0).sum()) == 4 and float(distance.max()) == 0.0
    counts, sums = vk.vq_code_stats(x, index, 4)
    # counts are float32 (the contract): exact up to 2**24 per code, correctly rounded beyond (a float32
    # running sum would stick at 2**24)
    assert counts.tolist() == torch.tensor([VQ_ROWS - 4, 1, 2, 1], dtype=torch.float64).float().tolist()
    assert torch.equal(sums[2], torch.full((VQ_DIM,), -2.0)) and torch.equal(sums[3], torch.full((VQ_DIM,), 0.5))
    del x


def test_memory_guard_reads_meminfo():
    if os.path.exists("/proc/meminfo"):
        assert _available_gib() > 0

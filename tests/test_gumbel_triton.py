"""The Triton Gumbel kernels' looped and single-pass paths, forced at small sizes, against the reference.

tests/test_gumbel.py runs the Triton backend at its default plans on small shapes (single-pass tiles);
here ``max_block`` lowers the tile limit so the same small tensors take every path the production shapes
take: wide column strips looped along K with the next chunk prefetched (argmax, hard forward, backward,
the soft forward's looped plan) or split along K across programs (the soft forward's split plan), masked
and unmasked chunks, aligned and unaligned noise, and rows read once for the
hard sample. The noise contract itself is tested in tests/test_gumbel_noise.py.
"""

from __future__ import annotations

import pytest
import torch

from vlm_kernels import _backend
from vlm_kernels.reference import gumbel as ref

if _backend.device_reason("triton", torch.device("cpu")):
    pytest.skip("the Triton backend cannot run on CPU tensors here", allow_module_level=True)

from vlm_kernels.triton import gumbel as tg  # noqa: E402

# (shape, dim, max_block): the limit forces the looped path; odd K and inner sizes give masked chunks.
LOOPED = [
    ((2, 37, 3, 8), 1, 64),     # columns: inner 24 (aligned), K 37 in chunks of 2 rows x 32 columns
    ((2, 37, 3, 5), 1, 64),     # columns, inner 15: unaligned noise, masked
    ((3, 70, 64), 1, 256),      # columns, inner 64: full 64-column strips, unmasked along inner
    ((2, 64, 128), 1, 512),     # columns, unmasked: K a multiple of the chunk, inner of the strip
    ((5, 300), -1, 64),         # rows looped, masked
    ((4, 256), -1, 64),         # rows looped, unmasked
    ((3, 5, 7), 0, 16),
]
SINGLE = [
    ((3, 200, 16), 1),          # columns single pass: 16 contiguous columns
    ((2, 9, 40), 1),
    ((6, 1000), -1),            # rows: the hard sample and argmax read the row once
    ((3, 4097), -1),            # rows longer than the streaming chunk, still one tile
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _check_forward(x, dim, max_block, seed=77, tau=0.6):
    d = dim % x.dim()
    soft = tg.gumbel_softmax_forward(x, seed, tau, False, d, max_block=max_block)
    hard = tg.gumbel_softmax_forward(x, seed, tau, True, d, max_block=max_block)
    idx = tg.gumbel_argmax(x, seed, d, max_block=max_block)
    expect = ref.gumbel_softmax_forward(x, seed, tau, False, d)
    torch.testing.assert_close(soft.double(), expect.double(), atol=ATOL[x.dtype], rtol=1e-5, equal_nan=True)
    assert torch.equal(idx, ref.gumbel_argmax(x, seed, d))
    torch.testing.assert_close(hard, ref.gumbel_softmax_forward(x, seed, tau, True, d), atol=0, rtol=0,
                               equal_nan=True)


@pytest.mark.parametrize("shape,dim,max_block", LOOPED)
def test_looped_paths_match_reference(shape, dim, max_block):
    d = dim % len(shape)
    _, sizes, single, meta = tg._gumbel_plan(_logits(shape, torch.float32), d, max_block)
    assert not single
    for dtype in DTYPES:
        _check_forward(_logits(shape, dtype), dim, max_block)


COLUMNS_LOOPED = [case for case in LOOPED if case[1] % len(case[0]) != len(case[0]) - 1]


@pytest.mark.parametrize("shape,dim,max_block", COLUMNS_LOOPED)
def test_column_soft_split_and_looped_plans_match_reference(shape, dim, max_block, monkeypatch):
    """Long columns: the split plan (K across programs, statistics merged through memory; the default) and
    the looped plan (one program per strip, two passes) both give the reference's soft sample and its
    gradient."""
    d = dim % len(shape)
    for split in (True, False):
        monkeypatch.setattr(tg, "SPLIT_COLUMNS", split)
        for dtype in DTYPES:
            x = _logits(shape, dtype)
            got = tg.gumbel_softmax_forward(x, 77, 0.6, False, d, max_block=max_block)
            expect = ref.gumbel_softmax_forward(x, 77, 0.6, False, d)
            torch.testing.assert_close(got.double(), expect.double(), atol=ATOL[dtype], rtol=1e-5)
        dy = _logits(shape, torch.float32, scale=1.0, seed=1)
        y = ref.gumbel_softmax_forward(_logits(shape, torch.float32), 5, 0.7, False, d)
        torch.testing.assert_close(tg.gumbel_softmax_backward(dy, y, 5, 0.7, False, d, max_block=max_block),
                                   ref.gumbel_softmax_backward(dy, y, 5, 0.7, False, d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,dim,max_block", COLUMNS_LOOPED)
@pytest.mark.parametrize("backward", [False, True])
def test_split_plan_chunks_agree_bit_for_bit_whichever_way_they_are_written(shape, dim, max_block, backward):
    """The interpreter runs the programs one after another, so every program but a strip's last gives up
    waiting and the fix-up kernel writes its chunk; replaying the launch with the strip statistics already
    published makes every program take the path a GPU takes (read the statistics, write from registers).
    Both must give the same bits, and the plan must split K into several chunks."""
    d = dim % len(shape)
    x = _logits(shape, torch.float32)
    a, b = (_logits(shape, torch.float32, scale=1.0, seed=1), ref.gumbel_softmax_forward(x, 5, 0.7, False, d)) \
        if backward else (x, x)
    grid, sizes, n_strips, meta = tg._split_plan(x, d, max_block, inputs=2 if backward else 1)
    n_splits = sizes[-1]
    assert n_splits > 1 and meta["BACKWARD"] == backward
    first = torch.full_like(x, float("nan"))
    part, sync = tg._split_launch(a, b, first, 77, 0.6, d, max_block, backward)
    per_strip = sync.view(n_strips, n_splits + 3)
    assert torch.equal(per_strip[:, 0], torch.full((n_strips,), n_splits, dtype=torch.int32))  # all arrived
    assert bool((per_strip[:, 1] == 1).all())  # statistics published
    assert bool((per_strip[:, 2] > 0).all())  # and the fix-up kernel wrote the chunks that gave up
    per_strip[:, 2:] = 0  # no chunk marked: the replay writes every chunk from the published statistics
    second = torch.full_like(x, float("nan"))
    tg._split_launch(a, b, second, 77, 0.6, d, max_block, backward, part=part, sync=sync)
    assert torch.equal(first, second)
    assert not bool(first.isnan().any())


@pytest.mark.parametrize("shape,dim", SINGLE)
def test_single_pass_paths_match_reference(shape, dim):
    for dtype in DTYPES:
        _check_forward(_logits(shape, dtype), dim, None)


@pytest.mark.parametrize("shape,dim,max_block", LOOPED + [(s, d, None) for s, d in SINGLE])
@pytest.mark.parametrize("hard", [False, True])
def test_backward_paths_match_reference(shape, dim, max_block, hard):
    d = dim % len(shape)
    x = _logits(shape, torch.float32)
    dy = _logits(shape, torch.float32, scale=1.0, seed=1)
    saved = x if hard else ref.gumbel_softmax_forward(x, 5, 0.7, False, d)
    got = tg.gumbel_softmax_backward(dy, saved, 5, 0.7, hard, d, max_block=max_block)
    expect = ref.gumbel_softmax_backward(dy, saved, 5, 0.7, hard, d)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,dim,max_block", [((2, 37, 3, 8), 1, 64), ((5, 300), -1, 64),
                                                 ((2, 9, 40), 1, None), ((6, 1000), -1, None)])
def test_non_finite_logits_as_reference(shape, dim, max_block):
    """NaN, +inf and all--inf lines, placed in the first, a middle and the last chunk of the looped paths."""
    d = dim % len(shape)
    x = _logits(shape, torch.float32)
    xm = x.movedim(d, -1)  # a view: lines along the last axis
    lines = xm.reshape(-1, shape[d])
    n = lines.shape[0]
    lines[0, 0] = float("nan")
    lines[1 % n, shape[d] // 2] = float("inf")
    lines[2 % n, :] = float("-inf")
    lines[3 % n, -1] = float("nan")
    lines[4 % n, 1] = float("-inf")
    lines[5 % n, -1] = float("inf")
    lines[6 % n, : shape[d] // 2] = float("-inf")  # whole chunks of -inf in a line that has finite values
    x = xm.movedim(-1, d).contiguous()
    _check_forward(x, dim, max_block)


def test_production_column_plan_reads_wide_strips():
    """(64, 8192, 32, 32) over dim 1: every Gumbel kernel reads at least 64 contiguous bytes per row."""
    x = torch.empty((64, 8192, 32, 32))
    for kwargs in (dict(), dict(stream=True), dict(inputs=2, noise=False), dict(inputs=2)):
        _, sizes, single, meta = tg._gumbel_plan(x, 1, None, **kwargs)
        assert meta["BC"] * x.element_size() >= 64, (kwargs, meta)
        assert not single
    for inputs in (1, 2):  # the soft forward's and backward's plans
        _, sizes, n_strips, meta = tg._split_plan(x, 1, None, inputs=inputs)
        assert meta["BC"] * x.element_size() >= 64 and sizes[-1] * meta["BR"] == 8192, meta


def test_hard_rows_read_once():
    """A row that fits one tile is read once for the hard sample and argmax too (no streamed chunks)."""
    x = torch.empty((65536, 8192))
    _, _, single, meta = tg._gumbel_plan(x, 1, None, stream=True)
    assert single and meta["BC"] == 8192

"""Shifted-window attention benchmarks: a whole Swin v1 block (norm, qkv, shifted-window attention, proj,
MLP), vlm_kernels.nn.SwinTransformerBlock on the fused op against timm 1.0's SwinTransformerBlock with the
same weights: eager (its explicit softmax path), with its fused SDPA path (``attn.fused_attn = True``,
what ``TIMM_FUSED_ATTN=2`` selects at construction), under torch.compile, and with FlexAttention in
place of its attention (torch.nn.attention.flex_attention under torch.compile: the windows of an image
laid end to end as one sequence, a block mask that keeps each window's own keys, and a score_mod adding
the relative position bias and timm's -100 shifted-window mask).

The op alone (``window_attention op`` cases): ``vk.window_attention`` on a (B, H, W, 3C) qkv map with
the bias table and padded-token qkv, against the same call on the reference backend (eager PyTorch with
timm's math), with the memory floor (qkv read + output written; in the backward also dout and dqkv) at
the measured copy bandwidth. GPU target: forward within 2x of that floor.

Also timed: our block with the attention left out (``ours without attention (floor)``): norm, qkv,
proj, MLP and residuals only. timm's time over that one is the most any attention kernel could gain on
the whole block; on CPU the linear layers take most of the block's time.

Shapes: Swin-T stage 1 (56x56, C=96, 3 heads) and stage 3 (14x14, C=384, 12 heads), window 7, shift 3;
batch 8 on CPU, 64 on GPU; forward (inference, no grad) and forward+backward (input and parameter
gradients). float32.

Runner: ``python -m benchmarks.run --ops window_attention``. pytest-benchmark:
``pytest benchmarks/bench_window_attention.py``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from vlm_kernels.nn import SwinTransformerBlock
from vlm_kernels.reference import window_attention as ref

from .cases import Case, Target

# (label, (H, W), C, heads)
STAGES = [("Swin-T stage 1 56x56 C=96 h=3", (56, 56), 96, 3), ("Swin-T stage 3 14x14 C=384 h=12", (14, 14), 384, 12)]
WINDOW, SHIFT = 7, 3
MODES = ("fwd", "fwd+bwd")

CPU_TARGETS = {
    "fwd": [Target("timm eager", 1.5, ">=1.5x timm block forward")],
    "fwd+bwd": [Target("timm eager", 1.3, ">=1.3x timm block forward+backward")],
}
GPU_TARGETS = {
    "fwd": [],
    "fwd+bwd": [Target("timm eager", 3.0, ">=3x timm eager block forward+backward"),
                Target("FlexAttention", 1.3, ">=1.3x FlexAttention block forward+backward")],
}


# The op alone on a GPU: its forward within 2x of the memory floor (qkv read + output written at the
# measured copy bandwidth): floor time / our time >= 0.5.
OP_GPU_TARGETS = {"fwd": [Target("floor", 0.5, "forward within 2x of the HBM floor")], "fwd+bwd": []}


def _timm_block(res, dim, heads, device):
    from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock

    torch.manual_seed(0)
    blk = TimmBlock(dim, res, num_heads=heads, window_size=WINDOW, shift_size=SHIFT)
    with torch.no_grad():  # visible bias terms, as in the tests
        blk.attn.relative_position_bias_table.normal_()
    return blk.to(device)


class _FlexAttention(torch.nn.Module):
    """timm's shifted-window attention with FlexAttention as the kernel (divisible maps, no padding)."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        attn = block.attn
        h, w = block.input_resolution
        mh, mw = block.window_size
        n = mh * mw
        assert h % mh == 0 and w % mw == 0, "the FlexAttention peer handles divisible maps only"
        self.n, self.nw = n, (h // mh) * (w // mw)
        dev = attn.relative_position_bias_table.device
        self.register_buffer("rel_index", ref.relative_position_index(mh, mw, dev), persistent=False)
        labels = ref.shift_region_labels(h, w, (mh, mw), block.shift_size, dev)
        labels = ref.window_partition(labels[None, :, :, None], (mh, mw)).reshape(-1)  # (nW * N,)
        self.register_buffer("labels", labels if any(block.shift_size) else torch.zeros_like(labels),
                             persistent=False)
        self._block_mask = None

    def block_mask(self, length, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if self._block_mask is None:
            n = self.n

            def same_window(b, h, q_idx, kv_idx):
                return q_idx // n == kv_idx // n

            self._block_mask = create_block_mask(same_window, None, None, length, length, device=device)
        return self._block_mask

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention

        blk, attn = self.block, self.block.attn
        b, h, w, c = x.shape
        shift = blk.shift_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = ref.window_partition(x, blk.window_size)  # B*nW, N, C
        length = self.nw * self.n
        qkv = attn.qkv(windows).reshape(b, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, nW*N, d
        table, index, labels, n = attn.relative_position_bias_table, self.rel_index, self.labels, self.n

        def bias_and_mask(score, bb, hh, q_idx, kv_idx):
            rel = table[index[q_idx % n, kv_idx % n], hh]
            masked = labels[q_idx] != labels[kv_idx]
            return score + rel + torch.where(masked, -100.0, 0.0)

        o = flex_attention(q, k, v, score_mod=bias_and_mask, block_mask=self.block_mask(length, x.device),
                           scale=attn.scale)
        o = attn.proj(o.transpose(1, 2).reshape(b * self.nw, self.n, -1))
        x = ref.window_reverse(o, blk.window_size, h, w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x


class _FlexBlock(torch.nn.Module):
    """timm's block (same weights) with its attention computed by :class:`_FlexAttention`."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.flex = _FlexAttention(block)

    def forward(self, x):
        blk = self.block
        b, h, w, c = x.shape
        x = x + blk.drop_path1(self.flex(blk.norm1(x)))
        x = x.reshape(b, -1, c)
        x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        return x.reshape(b, h, w, c)


class _NoAttentionBlock(torch.nn.Module):
    """Our block with its attention replaced by passing v through: norm1, qkv, proj, the residuals, norm2
    and the MLP, i.e. everything but the attention. Its time is the floor under any attention kernel in
    this block: (timm's time) / (this time) is the most any attention kernel can gain here."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        b, h, w, c = x.shape
        x = x + blk.attn.proj(blk.attn.qkv(blk.norm1(x))[..., 2 * c:])
        x = x.reshape(b, -1, c)
        x = x + blk.mlp(blk.norm2(x))
        return x.reshape(b, h, w, c)


def _model(kind, res, dim, heads, device):
    timm_blk = _timm_block(res, dim, heads, device)
    if kind == "ours":
        return SwinTransformerBlock.from_timm(copy.deepcopy(timm_blk))
    if kind == "floor":
        return _NoAttentionBlock(SwinTransformerBlock.from_timm(copy.deepcopy(timm_blk)))
    if kind in ("timm eager", "timm compiled"):
        timm_blk.attn.fused_attn = False
        return timm_blk if kind == "timm eager" else torch.compile(timm_blk, dynamic=False)
    if kind == "timm SDPA":
        timm_blk.attn.fused_attn = True
        return timm_blk
    if kind == "flex":
        return torch.compile(_FlexBlock(timm_blk), dynamic=False)
    raise ValueError(kind)


def _call(kind, batch, res, dim, heads, mode, device):
    """setup() for one implementation: builds the block and inputs, returns the timed closure."""

    def setup():
        model = _model(kind, res, dim, heads, device).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, *res, dim, generator=g).to(device)
        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    return model(x)

            return fwd
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(x.shape, generator=g).to(device)
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            y = model(xg)
            y.backward(dy)
            xg.grad = None
            for p in params:
                p.grad = None

        return step

    return setup


def _op_call(backend, batch, res, dim, heads, mode, device):
    """setup() for the op alone: (B, H, W, 3C) qkv -> (B, H, W, C) shifted-window attention with the bias
    table and padded-token qkv, on the given backend (None: automatic; "reference": eager PyTorch with
    timm's math: roll, partition, bmm, bias gather, mask, softmax, bmm, reverse, roll)."""

    def setup():
        import vlm_kernels as vk

        g = torch.Generator().manual_seed(2)
        qkv = torch.randn(batch, *res, 3 * dim, generator=g).to(device)
        table = torch.randn((2 * WINDOW - 1) ** 2, heads, generator=g).to(device)
        pad = torch.randn(3 * dim, generator=g).to(device)
        kwargs = dict(num_heads=heads, window_size=WINDOW, shift_size=SHIFT, pad_qkv=pad)

        if mode == "fwd":
            def fwd():
                with torch.no_grad(), vk.use_backend(backend):
                    return vk.window_attention(qkv, rel_pos_bias=table, **kwargs)

            return fwd
        qkv_g, table_g = qkv.clone().requires_grad_(True), table.clone().requires_grad_(True)
        dy = torch.randn(batch, *res, dim, generator=g).to(device)

        def step():
            with vk.use_backend(backend):
                vk.window_attention(qkv_g, rel_pos_bias=table_g, **kwargs).backward(dy)
            qkv_g.grad = table_g.grad = None

        return step

    return setup


IMPLS = {"vlm_kernels": "ours", "timm eager": "timm eager", "timm SDPA (TIMM_FUSED_ATTN=2)": "timm SDPA",
         "timm torch.compile": "timm compiled", "FlexAttention": "flex",
         "ours without attention (floor)": "floor"}


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    batch = 64 if gpu else 8
    if quick:
        batch = 8 if gpu else 2
    targets = GPU_TARGETS if gpu else CPU_TARGETS
    out = []
    for label, res, dim, heads in STAGES:
        for mode in MODES:
            impls = {name: _call(kind, batch, res, dim, heads, mode, device) for name, kind in IMPLS.items()}
            out.append(Case("swin_block", f"{label} B={batch} w{WINDOW} s{SHIFT}", mode, "float32", "vlm_kernels",
                            impls, list(targets[mode]), repeats=5 if gpu else 9))
    for label, res, dim, heads in STAGES:
        for mode in MODES:
            impls = {"vlm_kernels": _op_call(None, batch, res, dim, heads, mode, device),
                     "eager PyTorch, timm's math": _op_call("reference", batch, res, dim, heads, mode, device)}
            # The op's own traffic: qkv read + output written (fwd); + dout read, qkv re-read, dqkv written.
            tokens = batch * res[0] * res[1]
            floor_bytes = tokens * dim * 4 * (4 if mode == "fwd" else 11)
            out.append(Case("window_attention op", f"{label} B={batch} w{WINDOW} s{SHIFT}", mode, "float32",
                            "vlm_kernels", impls, list(OP_GPU_TARGETS[mode]) if gpu else [],
                            floor_bytes=floor_bytes, repeats=5 if gpu else 9))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark suite (quick shapes; the runner covers the full ones).


@functools.lru_cache(maxsize=None)
def _quick_cases():
    return cases(torch.device("cpu"), quick=True)


@pytest.mark.parametrize("case", _quick_cases(), ids=lambda c: f"{c.shape}-{c.mode}")
@pytest.mark.parametrize("impl", ["vlm_kernels", "timm eager", "timm SDPA (TIMM_FUSED_ATTN=2)"])
def test_window_attention_cpu(benchmark, case, impl):
    pytest.importorskip("timm")
    benchmark.group = f"swin block {case.shape} {case.mode}"
    benchmark(case.impls[impl]())

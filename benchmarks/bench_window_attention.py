"""Shifted-window attention benchmarks: a whole Swin v1 block (norm, qkv, shifted-window attention, proj,
MLP), vlm_kernels.nn.SwinTransformerBlock on the fused op against timm 1.0's SwinTransformerBlock with the
same weights: eager (its explicit softmax path), with its fused SDPA path (``attn.fused_attn = True``,
what ``TIMM_FUSED_ATTN=2`` selects at construction), under torch.compile, and with FlexAttention in
place of its attention (torch.nn.attention.flex_attention under torch.compile: the windows of an image
laid end to end as one sequence, a block mask that keeps each window's own keys, and a score_mod adding
the relative position bias and timm's -100 shifted-window mask).

The op alone (``window_attention op`` cases): ``vk.window_attention`` on a (B, H, W, 3C) qkv map with
the bias table and padded-token qkv, against what a user would write instead on the same map (roll,
partition, then timm 1.0's attention math in eager PyTorch, or timm's fused SDPA path, or compiled
FlexAttention; autograd for the backward) and against our own reference backend, with the memory floor
(qkv read + output written; in the backward also dout and dqkv) at the measured copy bandwidth. GPU
targets: forward within 2x of that floor at stage 1 in bf16; at least 3x timm's eager attention and
1.3x compiled FlexAttention, forward and forward+backward.

Also timed: our block with the attention left out (``ours without attention (floor)``): norm, qkv,
proj, MLP and residuals only. timm's time over that one is the most any attention kernel could gain on
the whole block; on CPU the linear layers take most of the block's time.

Shapes: Swin-T stage 1 (56x56, C=96, 3 heads) and stage 3 (14x14, C=384, 12 heads), window 7, shift 3;
batch 8 on CPU, 64 on GPU; forward (inference, no grad) and forward+backward (input and parameter
gradients). float32 on CPU; bfloat16 and float32 on GPU.

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


def _call(kind, batch, res, dim, heads, mode, device, dtype=torch.float32):
    """setup() for one implementation: builds the block and inputs, returns the timed closure."""

    def setup():
        model = _model(kind, res, dim, heads, device).to(dtype).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, *res, dim, generator=g).to(device, dtype)
        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    return model(x)

            return fwd
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(x.shape, generator=g).to(device, dtype)
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            y = model(xg)
            y.backward(dy)
            xg.grad = None
            for p in params:
                p.grad = None

        return step

    return setup


class _OpPeer:
    """The op alone as a user would write it without us, on the same (B, H, W, 3C) qkv map: roll,
    window partition, per-head q/k/v, then timm 1.0's attention math in eager PyTorch (``eager``:
    ``(q * scale) @ k^T``, the table bias gathered every call as timm does, the precomputed (nW, N, N)
    -100 mask, softmax, ``@ v``), or timm's fused path (``sdpa``: bias + mask as SDPA's attn_mask), or
    FlexAttention (``flex``: the windows of an image as one sequence, a block mask keeping each window's
    own keys, a score_mod adding bias and mask; under torch.compile), then window reverse and roll back.
    Autograd gives the backward. Maps divisible by the window (the benchmark's Swin-T stages)."""

    def __init__(self, kind, res, dim, heads, device, dtype):
        self.kind, self.heads, self.dim = kind, heads, dim
        h, w = res
        self.res, self.window, self.shift = res, (WINDOW, WINDOW), (SHIFT, SHIFT)
        self.n, self.nw = WINDOW * WINDOW, (h // WINDOW) * (w // WINDOW)
        self.scale = (dim // heads) ** -0.5
        self.index = ref.relative_position_index(WINDOW, WINDOW, device).view(-1)
        self.mask = ref.shift_mask(h, w, self.window, self.shift, device, dtype)  # built once, as timm does
        labels = ref.window_partition(ref.shift_region_labels(h, w, self.window, self.shift, device)[None, :, :, None],
                                      self.window).reshape(-1)
        self.labels = labels
        self._block_mask = None
        self._flex = torch.compile(self._flex_attention, dynamic=False) if kind == "flex" else None

    def _bias(self, table):
        return table[self.index].view(self.n, self.n, self.heads).permute(2, 0, 1).contiguous()

    def _flex_attention(self, q, k, v, table):
        from torch.nn.attention.flex_attention import flex_attention

        index, labels, n = self.index.view(self.n, self.n), self.labels, self.n

        def bias_and_mask(score, bb, hh, q_idx, kv_idx):
            rel = table[index[q_idx % n, kv_idx % n], hh]
            return score + rel + torch.where(labels[q_idx] != labels[kv_idx], -100.0, 0.0)

        return flex_attention(q, k, v, score_mod=bias_and_mask, block_mask=self._block_mask, scale=self.scale)

    def __call__(self, qkv, table):
        b, h, w, c3 = qkv.shape
        heads, n, nw = self.heads, self.n, self.nw
        x = torch.roll(qkv, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        windows = ref.window_partition(x, self.window)  # B*nW, N, 3C
        if self.kind == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            length = nw * n
            if self._block_mask is None:
                self._block_mask = create_block_mask(lambda bb, hh, qi, ki: qi // n == ki // n, None, None,
                                                     length, length, device=qkv.device)
            q, k, v = windows.reshape(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            o = self._flex(q, k, v, table).transpose(1, 2).reshape(b * nw, n, -1)
        else:
            q, k, v = windows.reshape(b * nw, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            bias = self._bias(table).to(qkv.dtype)
            if self.kind == "sdpa":
                attn_mask = (bias[None, None] + self.mask[None, :, None]).view(-1, heads, n, n)
                attn_mask = attn_mask.expand(b, -1, -1, -1, -1).reshape(b * nw, heads, n, n) if b > 1 else attn_mask
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1) + bias
                attn = (attn.view(b, nw, heads, n, n) + self.mask[None, :, None]).view(-1, heads, n, n)
                o = attn.softmax(dim=-1) @ v
            o = o.transpose(1, 2).reshape(b * nw, n, -1)
        x = ref.window_reverse(o, self.window, h, w)
        return torch.roll(x, shifts=(SHIFT, SHIFT), dims=(1, 2))


def _op_call(impl, batch, res, dim, heads, mode, device, dtype=torch.float32):
    """setup() for the op alone: (B, H, W, 3C) qkv -> (B, H, W, C) shifted-window attention with the bias
    table and padded-token qkv. ``impl``: "ours" (automatic backend), "reference" (our reference
    backend), or a user's own code (:class:`_OpPeer`: "eager", "sdpa", "flex")."""

    def setup():
        import vlm_kernels as vk

        g = torch.Generator().manual_seed(2)
        qkv = torch.randn(batch, *res, 3 * dim, generator=g).to(device, dtype)
        table = torch.randn((2 * WINDOW - 1) ** 2, heads, generator=g).to(device, dtype)
        pad = torch.randn(3 * dim, generator=g).to(device, dtype)
        kwargs = dict(num_heads=heads, window_size=WINDOW, shift_size=SHIFT, pad_qkv=pad)
        if impl in ("ours", "reference"):
            backend = None if impl == "ours" else "reference"

            def call(q, t):
                with vk.use_backend(backend):
                    return vk.window_attention(q, rel_pos_bias=t, **kwargs)
        else:
            call = _OpPeer(impl, res, dim, heads, device, dtype)

        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    return call(qkv, table)

            return fwd
        qkv_g, table_g = qkv.clone().requires_grad_(True), table.clone().requires_grad_(True)
        dy = torch.randn(batch, *res, dim, generator=g).to(device, dtype)

        def step():
            call(qkv_g, table_g).backward(dy)
            qkv_g.grad = table_g.grad = None

        return step

    return setup


IMPLS = {"vlm_kernels": "ours", "timm eager": "timm eager", "timm SDPA (TIMM_FUSED_ATTN=2)": "timm SDPA",
         "timm torch.compile": "timm compiled", "FlexAttention": "flex",
         "ours without attention (floor)": "floor"}
OP_IMPLS = {"vlm_kernels": "ours", "timm eager attention": "eager", "timm SDPA attention": "sdpa",
            "FlexAttention (compiled)": "flex", "vlm_kernels reference backend": "reference"}
# The op alone. GPU (bf16 and fp32): forward within 2x of the HBM floor at stage 1 in bf16; fwd and
# fwd+bwd at least 3x timm's eager attention and 1.3x compiled FlexAttention.
OP_GPU_TARGETS = {
    "fwd": [Target("timm eager attention", 3.0, ">=3x timm eager attention"),
            Target("FlexAttention (compiled)", 1.3, ">=1.3x compiled FlexAttention")],
    "fwd+bwd": [Target("timm eager attention", 3.0, ">=3x timm eager attention"),
                Target("FlexAttention (compiled)", 1.3, ">=1.3x compiled FlexAttention")],
}


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    batch = 64 if gpu else 8
    if quick:
        batch = 8 if gpu else 2
    targets = GPU_TARGETS if gpu else CPU_TARGETS
    dtypes = ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")) if gpu else ((torch.float32, "float32"),)
    out = []
    for dtype, dname in dtypes:
        for label, res, dim, heads in STAGES:
            for mode in MODES:
                impls = {name: _op_call(kind, batch, res, dim, heads, mode, device, dtype)
                         for name, kind in OP_IMPLS.items()}
                # The op's own traffic: qkv read + output written (fwd); + dout read, qkv re-read, dqkv written.
                tokens = batch * res[0] * res[1]
                floor_bytes = tokens * dim * (torch.finfo(dtype).bits // 8) * (4 if mode == "fwd" else 11)
                tgt = list(OP_GPU_TARGETS[mode]) if gpu else []
                stage1 = label.startswith("Swin-T stage 1")
                if gpu and mode == "fwd" and stage1 and dtype == torch.bfloat16:
                    tgt.append(Target("floor", 0.5, "forward within 2x of the HBM floor"))
                out.append(Case("window_attention op", f"{label} B={batch} w{WINDOW} s{SHIFT}", mode, dname,
                                "vlm_kernels", impls, tgt, floor_bytes=floor_bytes, repeats=10 if gpu else 9,
                                headline=stage1 and (dtype == torch.bfloat16 or not gpu),
                                extended_impls=frozenset({"FlexAttention (compiled)"})))
    for dtype, dname in dtypes:
        for label, res, dim, heads in STAGES:
            for mode in MODES:
                impls = {name: _call(kind, batch, res, dim, heads, mode, device, dtype) for name, kind in IMPLS.items()}
                out.append(Case("swin_block", f"{label} B={batch} w{WINDOW} s{SHIFT}", mode, dname, "vlm_kernels",
                                impls, list(targets[mode]), repeats=5 if gpu else 9, extended=gpu,
                                extended_impls=frozenset({"timm torch.compile", "FlexAttention"})))
    return out


def scaling_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """The op alone at Swin-T stage 1 (56x56, C=96, 3 heads), forward, for growing batch."""
    gpu = device.type == "cuda"
    label, res, dim, heads = STAGES[0]
    dtype = torch.bfloat16 if gpu else torch.float32
    batches = (1, 2) if quick else ((4, 16, 64, 256) if gpu else (1, 2, 4, 8))
    out = []
    for b in batches:
        impls = {name: _op_call(kind, b, res, dim, heads, "fwd", device, dtype)
                 for name, kind in OP_IMPLS.items() if kind in ("ours", "eager", "sdpa")}
        tokens = b * res[0] * res[1]
        out.append(Case("window_attention op", f"{label} B={b}", "fwd", str(dtype).replace("torch.", ""),
                        "vlm_kernels", impls, floor_bytes=tokens * dim * (torch.finfo(dtype).bits // 8) * 4,
                        repeats=5, scaling_group="Window attention op fwd, Swin-T stage 1", size=b,
                        size_label="batch"))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark suite (quick shapes; the runner covers the full ones).


@functools.lru_cache(maxsize=None)
def _quick_cases():
    return [c for c in cases(torch.device("cpu"), quick=True) if c.op == "swin_block"]


@pytest.mark.parametrize("case", _quick_cases(), ids=lambda c: f"{c.shape}-{c.mode}")
@pytest.mark.parametrize("impl", ["vlm_kernels", "timm eager", "timm SDPA (TIMM_FUSED_ATTN=2)"])
def test_window_attention_cpu(benchmark, case, impl):
    pytest.importorskip("timm")
    benchmark.group = f"swin block {case.shape} {case.mode}"
    benchmark(case.impls[impl]())

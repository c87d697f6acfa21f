"""timm's transformer ``Mlp`` (fc1, GELU, fc2) with a row-chunked forward and backward on CPU tensors.

The hidden activation of a transformer MLP is its biggest tensor (4x the width per token). Eager
PyTorch materialises it three times in training (fc1's output h, GELU's output a, and in the backward
the gradients of both) and twice in inference, each a pass through memory, and buffers above glibc's
32 MiB mmap ceiling are page-faulted afresh on every call. Here the tokens are taken in chunks of rows:

* inference: per chunk, h = fc1(x) into a reused buffer, GELU in place, fc2 into the output rows: no
  (tokens x hidden) tensor at all;
* training: h = fc1(x) is computed whole and saved (the only hidden-size tensor kept for the backward;
  eager autograd also keeps a = GELU(h)); per chunk a = GELU(h) is formed again, and the backward
  recomputes it per chunk as well, accumulating the weight gradients chunk by chunk
  (dW2 += dy^T a, dh = GELU'(h) * (dy W2), dW1 += dh^T x, dx = dh W1), so the gradients of a and h
  are chunk-sized too.

The math is the eager module's (same ops, the weight-gradient sums split into chunks of rows). Only
GELU (exact or tanh) takes the chunked path; other activations, active dropout, a non-Identity norm
and tracing under torch.compile (whose own fusion does the job) use the eager composition.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops._common import check_factory_dtype, check_int, check_module_class, check_probability, describe

# Rows per chunk: chunk x hidden x 4 bytes of hidden activation (3 MiB at hidden 384, 12 MiB at 1536)
# stays in the last-level cache while the GEMMs keep enough rows to run at full rate; at most one chunk
# (eager) below that, where chunking measured no gain.
CHUNK_ROWS = 2048


def _gelu_kind(act: nn.Module) -> Optional[str]:
    return act.approximate if type(act) is nn.GELU else None


def _chunks(rows: int, chunk: int):
    for r0 in range(0, rows, chunk):
        yield r0, min(rows, r0 + chunk)


def _linear_into(a: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> None:
    """out = a w^T + b, written in place (out: rows of a contiguous tensor)."""
    if b is not None:
        torch.addmm(b, a, w.t(), out=out)
    else:
        torch.mm(a, w.t(), out=out)


def _eager_mlp(x2: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
               approximate: str) -> Tensor:
    return F.linear(F.gelu(F.linear(x2, w1, b1), approximate=approximate), w2, b2)


class _ChunkedMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                approximate: str, chunk: int) -> Tensor:
        h = F.linear(x2, w1, b1)  # the one hidden-size tensor, saved for the backward
        out = x2.new_empty(x2.shape[0], w2.shape[0])
        for r0, r1 in _chunks(x2.shape[0], chunk):
            _linear_into(F.gelu(h[r0:r1], approximate=approximate), w2, b2, out[r0:r1])
        ctx.save_for_backward(x2, h, w1, b1, w2, b2)
        ctx.approximate, ctx.chunk = approximate, chunk
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, h, w1, b1, w2, b2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the eager composition instead
            return _ChunkedMlp._differentiable_backward(ctx, dy, x2, w1, b1, w2, b2)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        # Weight gradients are sums over all rows: accumulated in float32 for half/bfloat16 weights.
        acc = torch.float32 if w1.dtype in (torch.float16, torch.bfloat16) else w1.dtype
        dx = torch.empty_like(x2) if need_x else None
        dw1 = torch.zeros(w1.shape, dtype=acc, device=w1.device) if need_w1 else None
        dw2 = torch.zeros(w2.shape, dtype=acc, device=w2.device) if need_w2 else None
        db1 = torch.zeros(w1.shape[0], dtype=acc, device=w1.device) if need_b1 and b1 is not None else None
        db2 = torch.zeros(w2.shape[0], dtype=acc, device=w2.device) if need_b2 and b2 is not None else None
        for r0, r1 in _chunks(x2.shape[0], ctx.chunk):
            dyc, hc = dy[r0:r1], h[r0:r1]
            if dw2 is not None:
                dw2.add_(torch.mm(dyc.t(), F.gelu(hc, approximate=ctx.approximate)))
            if db2 is not None:
                db2.add_(dyc.sum(0, dtype=acc))
            dh = torch.ops.aten.gelu_backward(dyc @ w2, hc, approximate=ctx.approximate)
            if dw1 is not None:
                dw1.add_(torch.mm(dh.t(), x2[r0:r1]))
            if db1 is not None:
                db1.add_(dh.sum(0, dtype=acc))
            if dx is not None:
                torch.mm(dh, w1, out=dx[r0:r1])
        cast = (lambda g, like: None if g is None else g.to(like.dtype))
        return dx, cast(dw1, w1), cast(db1, w1), cast(dw2, w2), cast(db2, w2), None, None

    @staticmethod
    def _differentiable_backward(ctx, dy, x2, w1, b1, w2, b2):
        # The saved inputs keep their history, so the gradients built here are differentiable again.
        inputs = [x2, w1, b1, w2, b2]
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i] and t.requires_grad]
        y = _eager_mlp(*inputs, ctx.approximate)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=True)
        out = [None] * 7
        for i, g in zip(wanted, grads):
            out[i] = g
        return tuple(out)


def _chunked_inference(x2: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                       approximate: str, chunk: int) -> Tensor:
    out = x2.new_empty(x2.shape[0], w2.shape[0])
    buf = x2.new_empty(min(chunk, x2.shape[0]), w1.shape[0])  # one chunk of hidden activation, reused
    for r0, r1 in _chunks(x2.shape[0], chunk):
        hc = buf[: r1 - r0]
        _linear_into(x2[r0:r1], w1, b1, hc)  # fc1 into the buffer
        torch.ops.aten.gelu_(hc, approximate=approximate)
        _linear_into(hc, w2, b2, out[r0:r1])
    return out


def _hooked(*modules: nn.Module) -> bool:
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _functorch_wrapped(x: Tensor) -> bool:
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1, act, drop1, norm (Identity), fc2, drop2 (same names, so state_dicts match),
    computed in chunks of ``chunk_rows`` tokens where the activation is GELU (see the module docstring)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, act_layer=nn.GELU,
                 drop: float = 0.0, chunk_rows: int = CHUNK_ROWS, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        in_features = check_int("Mlp", "in_features", in_features)
        hidden_features = in_features if hidden_features is None else check_int("Mlp", "hidden_features",
                                                                                  hidden_features)
        check_module_class("Mlp", "act_layer", act_layer)
        check_probability("Mlp", "drop", drop)
        chunk_rows = check_int("Mlp", "chunk_rows", chunk_rows)
        check_factory_dtype("Mlp", dtype)
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)
        self.chunk_rows = chunk_rows

    @classmethod
    def from_timm(cls, module: nn.Module) -> "Mlp":
        """Wrap timm's ``Mlp`` (or this one), sharing its sub-modules (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
            new.add_module(name, getattr(module, name))
        new.chunk_rows = getattr(module, "chunk_rows", CHUNK_ROWS)
        return new

    def _eager(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    def _chunkable(self, x: Tensor) -> bool:
        """The chunked path computes fc1/fc2 from their weights: only for plain nn.Linear modules without
        hooks (LoRA-style subclasses, quantised linears and forward hooks see the eager path), and not
        under tracing, functorch transforms, autocast or active dropout. CPU tensors only: chunking saves
        the CPU allocator's page faults, while on a GPU it turns two large GEMMs into many small ones (an
        H200 ran the Swin-T stage-1 block 2.8x slower forward and 7x slower forward+backward with it,
        benchmarks/results/2026-11-30_h200_run2_extended.json)."""
        if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or _functorch_wrapped(x):
            return False
        if x.device.type != "cpu":
            return False
        if type(self.fc1) is not nn.Linear or type(self.fc2) is not nn.Linear or _hooked(self.fc1, self.fc2, self.act):
            return False
        dropping = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        return (_gelu_kind(self.act) is not None and not dropping and isinstance(self.norm, nn.Identity)
                and x.numel() > 0 and x.shape[-1] == self.fc1.in_features and x.dtype == self.fc1.weight.dtype
                and not _autocast_on(x.device.type))

    def _check_input(self, x: object) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: nothing to check yet
            return
        width = getattr(self.fc1, "in_features", None)  # None: a wrapped timm Mlp with another kind of fc1
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"Mlp: x must be a floating-point tensor (..., {width}), got {got}")
        if x.dim() == 0 or (width is not None and x.shape[-1] != width):
            raise ValueError(f"Mlp: x must have {width} features in its last dimension, got {describe(x)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._chunkable(x):
            return self._eager(x)
        approximate = _gelu_kind(self.act)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.chunk_rows:
            return self._eager(x)
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, w1, b1, w2, b2)):
            out = _ChunkedMlp.apply(x2, w1, b1, w2, b2, approximate, self.chunk_rows)
        else:
            out = _chunked_inference(x2.contiguous(), w1, b1, w2, b2, approximate, self.chunk_rows)
        return out.reshape(*lead, out.shape[-1])

"""Host overhead: each op's time per call on a tiny input, where the launch and the Python op layer
(argument checks, backend choice, torch.library dispatch) are all there is to time.

``eager``: a loop of calls, timed as a whole (on a GPU, CUDA events around the loop: with a tiny input
the device waits on the host, so this is the host's time per call). ``CUDA graph`` (GPU only): the same
call captured once into a CUDA graph and replayed, which removes the host from the loop: the
difference is what the host costs. Peers: the nearest plain-PyTorch call on the same input.

GPU target: at most 25 us per eager call of ours (a Swin-T stage-1 attention call is tens of
microseconds of device time on an H200; the host must not dominate it).

Runner: ``python -m benchmarks.run --ops overhead``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vlm_kernels as vk

from .cases import Case, Target

CALLS = 200
GPU_TARGET = [Target("", 0.0, "eager call <= 25 us", max_seconds=25e-6)]


def _inputs(op: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if op == "gumbel_softmax" or op == "gumbel_argmax":
        return (torch.randn(4, 16, generator=g).to(device),)
    if op == "vq_nearest":
        return torch.randn(16, 8, generator=g).to(device), torch.randn(32, 8, generator=g).to(device)
    if op == "window_attention":
        return torch.randn(1, 7, 7, 3 * 32, generator=g).to(device), torch.randn(169, 1, generator=g).to(device)
    raise ValueError(op)


def _ours(op: str):
    if op == "gumbel_softmax":
        return lambda x: vk.gumbel_softmax(x, tau=1.0, dim=-1, seed=0)
    if op == "gumbel_argmax":
        return lambda x: vk.gumbel_argmax(x, dim=-1, seed=0)
    if op == "vq_nearest":
        return lambda x, e: vk.vq_nearest(x, e)
    return lambda qkv, t: vk.window_attention(qkv, num_heads=1, window_size=7, shift_size=0, rel_pos_bias=t)


def _peer(op: str):
    if op in ("gumbel_softmax", "gumbel_argmax"):
        return lambda x: F.gumbel_softmax(x, tau=1.0, dim=-1)
    if op == "vq_nearest":
        return lambda x, e: torch.cdist(x, e).argmin(dim=1)

    def attention(qkv, table):  # one unshifted 7x7 window, one head: q k^T + bias, softmax, @ v
        q, k, v = qkv.reshape(49, 3, 32).unbind(1)
        from vlm_kernels.reference.window_attention import relative_position_index

        bias = table[relative_position_index(7, 7, qkv.device).view(-1)].view(49, 49)
        return ((q * 32 ** -0.5) @ k.T + bias).softmax(-1) @ v

    return attention


def _loop(fn, args, graph: bool, device: torch.device):
    def setup():
        with torch.no_grad():
            fn(*args)  # first call: compilation, caches
            if not graph:
                def eager():
                    with torch.no_grad():
                        for _ in range(CALLS):
                            out = fn(*args)
                    return out

                return eager
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn(*args)
            torch.cuda.current_stream(device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*args)

        def replay():
            for _ in range(CALLS):
                g.replay()

        return replay

    return setup


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    out = []
    for op in ("gumbel_softmax", "gumbel_argmax", "vq_nearest", "window_attention"):
        args = _inputs(op, device)
        impls = {"vlm_kernels": _loop(_ours(op), args, False, device),
                 "plain PyTorch": _loop(_peer(op), args, False, device)}
        if gpu:
            impls["vlm_kernels in a CUDA graph"] = _loop(_ours(op), args, True, device)
            impls["plain PyTorch in a CUDA graph"] = _loop(_peer(op), args, True, device)
        out.append(Case("host overhead", f"{op} tiny input", "per call", "float32", "vlm_kernels", impls,
                        list(GPU_TARGET) if gpu else [], repeats=10, calls=CALLS, headline=True))
    return out

"""Whole-model benchmarks (issue 5): Swin-T and the DALL-E dVAE from python_models/.

* Swin-T (``python_models.swin.swin_tiny``, fused window attention) against timm's
  ``swin_tiny_patch4_window7_224`` (random weights, no download), eager and under torch.compile:
  forward, and a training step (forward, cross-entropy, backward, SGD step).
* dVAE encode-and-sample: the encoder's (B, 8192, h, w) logits and a Gumbel-softmax sample along dim 1,
  with ``vlm_kernels.gumbel_softmax`` against the same model on ``F.gumbel_softmax`` (images/s = B / time).

Runner: ``python -m benchmarks.run --ops models``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import vlm_kernels as vk

from .cases import Case, Target

CPU_TARGETS = {"train step": [Target("timm eager", 1.3, ">=1.3x timm swin_tiny training step")], "fwd": []}


def _swin(kind: str, batch: int, mode: str, device: torch.device):
    def setup():
        torch.manual_seed(0)
        if kind == "ours":
            from python_models.swin import swin_tiny

            model = swin_tiny()
        else:
            import timm

            model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
        model = model.to(device)
        if kind == "timm compiled":
            model = torch.compile(model)
        x = torch.randn(batch, 3, 224, 224, device=device)
        if mode == "fwd":
            model.eval()

            def forward():
                with torch.no_grad():
                    return model(x)

            return forward
        model.train()
        target = torch.randint(0, 1000, (batch,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()

        return step

    return setup


@functools.lru_cache(maxsize=None)
def _dvae(device_type: str):
    from python_models.dvae import DiscreteVAE, DVAEConfig

    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig(n_hid=64, n_init=64, n_blk_per_group=1)).to(device_type).eval()


def _dvae_sample(sampler: str, batch: int, size: int, device: torch.device):
    def setup():
        model = _dvae(device.type)
        x = torch.rand(batch, 3, size, size, device=device)

        def encode_and_sample():
            with torch.no_grad():
                logits = model.encode_logits(x)
                if sampler == "ours":
                    return vk.gumbel_softmax(logits, tau=1 / 16, dim=1)
                return F.gumbel_softmax(logits, tau=1 / 16, dim=1)

        return encode_and_sample

    return setup


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    batch = 2 if quick else (64 if gpu else 4)
    out = []
    for mode in ("fwd", "train step"):
        impls = {"vlm_kernels": _swin("ours", batch, mode, device), "timm eager": _swin("timm", batch, mode, device)}
        if not quick:
            impls["timm compiled"] = _swin("timm compiled", batch, mode, device)
        out.append(Case("swin_tiny", f"B={batch} 224x224", mode, "float32", "vlm_kernels", impls,
                        [] if gpu else CPU_TARGETS[mode], repeats=3 if gpu else 5, extended=gpu,
                        extended_impls=frozenset({"timm compiled"})))
    d_batch, size = (2, 64) if quick else ((32, 256) if gpu else (8, 128))
    impls = {"vlm_kernels": _dvae_sample("ours", d_batch, size, device),
             "F.gumbel_softmax": _dvae_sample("torch", d_batch, size, device)}
    out.append(Case("dvae encode+sample", f"B={d_batch} {size}x{size} vocab 8192 n_hid 64", "fwd", "float32",
                    "vlm_kernels", impls, [], repeats=3, extended=gpu))
    return out

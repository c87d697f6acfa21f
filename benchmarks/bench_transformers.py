"""Hugging Face transformers' Donut encoder with vlm_kernels.integrations.transformers.patch against the
unpatched model (same weights).

* ``hf_donut_stage`` (the target's case): one DonutSwinStage at Donut-base's stage-1 width (C=128, 4 heads,
  window 10), its two layers (unshifted, shifted), on a (B, H*W, C) map.
* ``hf_donut_encoder``: the whole DonutSwinModel of Donut-base (embed 128, depths 2-2-14-2, heads 4-8-16-32,
  window 10) on page images.

Peers: ``transformers eager``: the unpatched DonutSwin code (its only attention implementation:
DonutSwinModel does not support ``attn_implementation="sdpa"``), and ``transformers SDPA (SwinModel)``:
transformers' SwinModel / SwinStage built with the same configuration and ``attn_implementation="sdpa"``,
the same architecture through transformers' fused-attention path (the code a Donut user could switch to;
SwinModel adds a final LayerNorm, a negligible cost). No torch.compile peer: every case is eager, so they
run the same on CUDA devices.

Shapes. CPU (float32): the stage on a 160x120 map (a 640x480 image), B=1; the encoder on a 640x480
image (maps 160x120, 80x60, 40x30, 20x15), B=1. GPU (bfloat16 and float32): the stage on Donut-base's real
stage-1 map 640x480 (a 2560x1920 page), B=2; the encoder on the 2560x1920 page, B=1. Forward (no grad)
and forward+backward (input and parameter gradients).

CPU target (issue 14, as the timm block's): the patched stage at least 1.3x transformers eager, forward.

Runner: ``python -m benchmarks.run --ops transformers``. pytest-benchmark:
``pytest benchmarks/bench_transformers.py``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from .cases import Case, Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Donut-base's encoder (naver-clova-ix/donut-base): patch 4, window 10
DONUT_BASE = dict(patch_size=4, embed_dim=128, depths=[2, 2, 14, 2], num_heads=[4, 8, 16, 32], window_size=10)
STAGE1 = dict(dim=128, heads=4)
MODES = ("fwd", "fwd+bwd")
IMPLS = {"vlm_kernels": "ours", "transformers eager": "eager", "transformers SDPA (SwinModel)": "sdpa"}
CPU_TARGETS = {"fwd": [Target("transformers eager", 1.3, ">=1.3x transformers DonutSwin stage-1 forward")],
               "fwd+bwd": []}


def _configs(image, attn):
    from transformers import DonutSwinConfig, SwinConfig

    if attn == "sdpa":
        return SwinConfig(image_size=list(image), attn_implementation="sdpa", **DONUT_BASE)
    return DonutSwinConfig(image_size=list(image), **DONUT_BASE)


def _stage(kind, res, device, dtype):
    """One stage-1 stage: DonutSwinStage (ours: patched) or transformers' SwinStage with SDPA."""
    import vlm_kernels.integrations.transformers as vk_hf

    image = (res[0] * 4, res[1] * 4)
    torch.manual_seed(0)
    if kind == "sdpa":
        from transformers.models.swin.modeling_swin import SwinStage

        cfg = _configs(image, "sdpa")
        cfg._attn_implementation = "sdpa"
        stage = SwinStage(cfg, STAGE1["dim"], res, 2, STAGE1["heads"], [0.0, 0.0], None)
    else:
        from transformers.models.donut.modeling_donut_swin import DonutSwinStage

        stage = DonutSwinStage(_configs(image, "eager"), STAGE1["dim"], res, 2, STAGE1["heads"], [0.0, 0.0], None)
        if kind == "ours":
            vk_hf.patch(stage)
    return stage.to(device, dtype)


def _encoder(kind, image, device, dtype):
    import vlm_kernels.integrations.transformers as vk_hf
    from transformers import DonutSwinModel, SwinModel

    torch.manual_seed(0)
    if kind == "sdpa":
        model = SwinModel(_configs(image, "sdpa"), add_pooling_layer=False)
    else:
        model = DonutSwinModel(_configs(image, "eager"), add_pooling_layer=False)
        if kind == "ours":
            vk_hf.patch(model)
    return model.to(device, dtype)


def _timed(model, call, x, mode, device, dtype):
    """The timed closure: forward without grad, or forward + backward of a fixed cotangent."""
    if mode == "fwd":
        model.eval()

        def fwd():
            with torch.no_grad():
                return call(model, x)

        return fwd
    model.train()  # dropout rates are 0: train mode changes nothing but the mode
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        shape = call(model, x).shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        call(model, xg).backward(dy)
        xg.grad = None
        for p in params:
            p.grad = None

    return step


def _stage_call(kind, batch, res, mode, device, dtype):
    def setup():
        stage = _stage(kind, res, device, dtype)
        x = torch.randn(batch, res[0] * res[1], STAGE1["dim"], generator=torch.Generator().manual_seed(1))
        return _timed(stage, lambda m, t: m(t, res)[0], x.to(device, dtype), mode, device, dtype)

    return setup


def _encoder_call(kind, batch, image, mode, device, dtype):
    def setup():
        model = _encoder(kind, image, device, dtype)
        x = torch.randn(batch, 3, *image, generator=torch.Generator().manual_seed(1))
        return _timed(model, lambda m, t: m(pixel_values=t).last_hidden_state, x.to(device, dtype), mode, device,
                      dtype)

    return setup


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    gpu = device.type == "cuda"
    if gpu:
        stage_res, stage_batch, image, enc_batch = (640, 480), 2, (2560, 1920), 1
        dtypes = ((torch.bfloat16, "bfloat16"), (torch.float32, "float32"))
    else:
        stage_res, stage_batch, image, enc_batch = (160, 120), 1, (640, 480), 1
        dtypes = ((torch.float32, "float32"),)
    if quick:  # every stage map at least 10 on its shorter side (see the integration's README section)
        stage_res, stage_batch, image, enc_batch = (40, 30), 1, (400, 320), 1
    targets = {} if gpu else CPU_TARGETS
    out = []
    for dtype, dname in dtypes:
        for mode in MODES:
            impls = {name: _stage_call(kind, stage_batch, stage_res, mode, device, dtype) for name, kind in IMPLS.items()}
            out.append(Case("hf_donut_stage", f"DonutSwin stage 1 {stage_res[0]}x{stage_res[1]} C=128 h=4 w10 "
                            f"B={stage_batch}", mode, dname, "vlm_kernels", impls, list(targets.get(mode, [])),
                            repeats=5 if gpu else 7, extended=gpu))
    for dtype, dname in dtypes:
        for mode in MODES:
            impls = {name: _encoder_call(kind, enc_batch, image, mode, device, dtype) for name, kind in IMPLS.items()}
            out.append(Case("hf_donut_encoder", f"DonutSwin-base encoder {image[0]}x{image[1]} B={enc_batch}", mode,
                            dname, "vlm_kernels", impls, [], repeats=3 if gpu else 3, extended=gpu))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark suite (quick shapes; the runner covers the full ones).


@functools.lru_cache(maxsize=None)
def _quick_cases():
    return [c for c in cases(torch.device("cpu"), quick=True) if c.op == "hf_donut_stage"]


@pytest.mark.parametrize("case", _quick_cases(), ids=lambda c: f"{c.shape}-{c.mode}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_transformers_cpu(benchmark, case, impl):
    pytest.importorskip("transformers")
    benchmark.group = f"hf donut {case.shape} {case.mode}"
    benchmark(case.impls[impl]())

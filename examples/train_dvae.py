"""Train a small DALL-E discrete VAE on patches of scikit-image's sample photographs, on CPU.

    python examples/train_dvae.py                  # DOCSTRING-TIME
    python examples/train_dvae.py --steps 20       # a quick check
    python examples/train_dvae.py --compare        # the same model with torch.nn.functional.gumbel_softmax beside

DOCSTRING-RECIPE
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from examples._photos import (HELD_OUT_PHOTOS, TRAIN_PHOTOS, PatchSampler, caption, center_crop,  # noqa: E402
                              grid_image, load_photos, psnr, save_stacked, token_image, token_palette)
from python_models.checkpoint import save_checkpoint  # noqa: E402
from python_models.dvae import (DiscreteVAE, DVAEConfig, kl_weight_schedule, learning_rate_schedule,  # noqa: E402
                                temperature_schedule)

import vlm_kernels  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=32, help="patch side in pixels")
    p.add_argument("--vocab", type=int, default=512, help="number of tokens (8192 in the paper)")
    p.add_argument("--n-hid", type=int, default=32, help="dall_e's n_hid (256 in the paper)")
    p.add_argument("--n-init", type=int, default=32, help="dall_e's n_init (128 in the paper)")
    p.add_argument("--groups", type=int, default=4, help="groups; the grid is patch / 2**(groups-1)")
    p.add_argument("--blocks", type=int, default=1, help="blocks per group (2 in the paper)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (1e-4 in the paper)")
    p.add_argument("--lr-end", type=float, default=2e-5, help="final learning rate (1.25e-6 in the paper)")
    p.add_argument("--lr-warmup", type=float, default=0.0, help="fraction of the steps warming the lr up")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (the paper's 1e-4)")
    p.add_argument("--beta", type=float, default=6.6, help="final KL weight (the paper's 6.6)")
    p.add_argument("--kl-warmup", type=float, default=0.1, help="fraction of the steps raising beta from 0")
    p.add_argument("--tau-start", type=float, default=1.0)
    p.add_argument("--tau-end", type=float, default=1 / 16)
    p.add_argument("--tau-anneal", type=float, default=1.0, help="fraction of the steps annealing tau")
    p.add_argument("--hard-from", type=float, default=1.0,
                   help="fraction of the steps after which samples are hard (straight-through); 1: never")
    p.add_argument("--marginal-weight", type=float, default=0.0,
                   help="weight of KL(batch-mean posterior || uniform) per token (not in the paper)")
    p.add_argument("--weighting", choices=("area", "photo"), default="area",
                   help="training patches: every region equally likely (area) or every photo (photo)")
    p.add_argument("--eval-patches", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate held-out patches every N steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true",
                   help="train the same model with torch.nn.functional.gumbel_softmax beside ours")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return p.parse_args(argv)


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def evaluate(model: DiscreteVAE, patches: torch.Tensor, batch: int = 128) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sq_err, n, counts = 0.0, 0, torch.zeros(model.config.vocab_size)
    for i in range(0, patches.shape[0], batch):
        x = patches[i:i + batch]
        tokens = model.encode_tokens(x)
        sq_err += float(F.mse_loss(model.decode_tokens(tokens), x, reduction="sum"))
        n += x.numel()
        counts += torch.bincount(tokens.flatten(), minlength=model.config.vocab_size).float()
    model.train(was_training)
    p = counts / counts.sum()
    mse = sq_err / n
    return {"mse": mse, "psnr": psnr(mse), "used": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-torch.special.xlogy(p, p).sum()))}


class Schedules:
    """Per-step temperature, KL weight, learning rate and hard/soft samples, from the run's length."""

    def __init__(self, args):
        self.args, n = args, args.steps
        self.tau_steps = max(1, round(args.tau_anneal * n))
        self.kl_steps = round(args.kl_warmup * n)
        self.lr_warmup = round(args.lr_warmup * n)
        self.hard_from = round(args.hard_from * n) if args.hard_from < 1 else n + 1

    def __call__(self, step: int) -> dict:
        a = self.args
        return {"tau": temperature_schedule(step, self.tau_steps, a.tau_start, a.tau_end),
                "beta": kl_weight_schedule(step, self.kl_steps, a.beta),
                "lr": learning_rate_schedule(step, a.steps, a.lr, a.lr_end, self.lr_warmup),
                "hard": step >= self.hard_from}


def describe(r: dict, vocab: int) -> str:
    return (f"reconstruction from tokens MSE {r['mse']:.5f} (PSNR {r['psnr']:.2f} dB); tokens used "
            f"{r['used']:.1%} of {vocab}, perplexity {r['perplexity']:.1f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = PatchSampler(load_photos(TRAIN_PHOTOS), args.patch, seed=args.seed, weighting=args.weighting)
    held_out_photos = load_photos(HELD_OUT_PHOTOS)
    eval_held = PatchSampler(held_out_photos, args.patch, seed=args.seed + 2).sample(args.eval_patches)
    eval_train = PatchSampler(load_photos(TRAIN_PHOTOS), args.patch, seed=args.seed + 1).sample(args.eval_patches)

    config = DVAEConfig(vocab_size=args.vocab, n_hid=args.n_hid, n_init=args.n_init, n_blk_per_group=args.blocks,
                        group_count=args.groups)
    model = DiscreteVAE(config)
    # The runs: ours (vlm_kernels.gumbel_softmax), and with --compare the same initial weights, batches and
    # schedules with torch.nn.functional.gumbel_softmax, one step of each in turn (so both see the same load).
    runs = {"vlm_kernels": {"model": model, "gumbel": None}}
    if args.compare:
        runs["torch"] = {"model": copy.deepcopy(model), "gumbel": F.gumbel_softmax}
    for run in runs.values():
        run["opt"] = torch.optim.AdamW(run["model"].parameters(), lr=args.lr, weight_decay=args.weight_decay)
        run.update(wall=0.0, cpu=0.0, curve=[])
    grid = args.patch // config.downsample
    sched = Schedules(args)
    print(f"dVAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.vocab} tokens, "
          f"{args.patch}x{args.patch} patches -> {grid}x{grid} tokens, {args.steps} steps of {args.batch_size}, "
          f"{args.threads} thread(s); vlm_kernels backend for CPU tensors: {kernel_backend()}")
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        s = sched(step)
        x = train.sample(args.batch_size)
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            for group in run["opt"].param_groups:
                group["lr"] = s["lr"]
            out = run["model"](x, tau=s["tau"], beta=s["beta"], hard=s["hard"], marginal_weight=args.marginal_weight,
                               gumbel_softmax=run["gumbel"])
            run["opt"].zero_grad(set_to_none=True)
            out["loss"].backward()
            run["opt"].step()
            run["wall"] += time.perf_counter() - t0
            run["cpu"] += cpu_seconds() - c0
            run["last"] = out
        if step % 20 == 0 or step == args.steps - 1:
            out = runs["vlm_kernels"]["last"]
            bar.set_postfix(tau=f"{s['tau']:.3f}", beta=f"{s['beta']:.2f}", lr=f"{s['lr']:.1e}",
                            loss=f"{float(out['loss'].detach()):.3f}",
                            kl=f"{float(out['kl'].detach().mean()) / grid ** 2:.2f}",
                            kl_bar=f"{float(out['kl_marginal'].detach()):.2f}")
        if args.eval_every and ((step + 1) % args.eval_every == 0):
            for name, run in runs.items():
                r = evaluate(run["model"], eval_held)
                run["curve"].append((step + 1, r))
                tqdm.write(f"step {step + 1:5d} {name:>11} held-out: {describe(r, args.vocab)}")
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu

    result = {"steps": args.steps, "train_seconds": wall, "train_cpu_seconds": cpu}
    print(f"trained {args.steps} steps in {wall:.0f} s wall, {cpu:.0f} s CPU ({args.steps / wall:.2f} steps/s wall)")
    for name, run in runs.items():
        res = {"held_out": evaluate(run["model"], eval_held), "train_photos": evaluate(run["model"], eval_train),
               "step_ms_wall": 1e3 * run["wall"] / max(args.steps, 1),
               "step_ms_cpu": 1e3 * run["cpu"] / max(args.steps, 1), "curve": run["curve"]}
        if name == "vlm_kernels":
            result.update(res)
        else:
            result[name] = res
        prefix = f"[{name}] " if args.compare else ""
        print(f"{prefix}training step: {res['step_ms_wall']:.1f} ms wall, {res['step_ms_cpu']:.1f} ms CPU")
        for split in ("held_out", "train_photos"):
            print(f"{prefix}{split:>12}: {describe(res[split], args.vocab)}")
    if args.compare:
        result["gumbel_op"] = time_gumbel_op(args.batch_size, args.vocab, grid)
        g = result["gumbel_op"]
        print(f"Gumbel-softmax alone, forward + backward on ({args.batch_size}, {args.vocab}, {grid}, {grid}) "
              f"logits, dim=1: vlm_kernels {g['vlm_kernels_ms']:.3f} ms, torch {g['torch_ms']:.3f} ms "
              f"(speed-up {g['torch_ms'] / g['vlm_kernels_ms']:.2f}x); whole step: "
              f"{result['torch']['step_ms_cpu'] / result['step_ms_cpu']:.3f}x (CPU time)")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "dvae_reconstructions.png")
    save_figure(model, held_out_photos[0], eval_held[:8], png)
    save_checkpoint(model, os.path.join(args.out, "dvae.pt"), steps=args.steps)
    print(f"wrote {png} and {os.path.join(args.out, 'dvae.pt')}")
    return result


def kernel_backend() -> str:
    from vlm_kernels import _backend

    if _backend.forced_backend():
        return f"{_backend.forced_backend()} (forced)"
    if _backend.availability("cpu").ok:
        return f"cpu (compiled, {_backend.cpu_isa().get('selected', '?')} level)"
    return "reference (the compiled extension is not built)"


def time_gumbel_op(batch: int, vocab: int, grid: int, reps: int = 50) -> dict:
    """Forward + backward of the Gumbel-softmax alone at the training shape, ours and torch's in turn
    (the median of ``reps`` CPU-time measurements each)."""
    logits = torch.randn(batch, vocab, grid, grid, requires_grad=True)
    grad = torch.randn(batch, vocab, grid, grid)
    fns = {"vlm_kernels": lambda: vlm_kernels.gumbel_softmax(logits, 0.5, False, dim=1),
           "torch": lambda: F.gumbel_softmax(logits, 0.5, False, dim=1)}
    times: dict = {name: [] for name in fns}
    for i in range(reps + 5):
        for name, fn in fns.items():
            c0 = time.thread_time()
            fn().backward(grad)
            if i >= 5:
                times[name].append(time.thread_time() - c0)
    return {f"{name}_ms": 1e3 * float(torch.tensor(t).median()) for name, t in times.items()}


@torch.no_grad()
def save_figure(model: DiscreteVAE, photo: torch.Tensor, patches: torch.Tensor, path: str) -> None:
    """One PNG: a held-out photograph's 256x256 centre (original | its tokens, one colour per token index |
    the reconstruction from those tokens), then held-out patches in three rows (originals, tokens,
    reconstructions)."""
    model.eval()
    palette = token_palette(model.config.vocab_size)
    cell = model.config.downsample
    crop = center_crop(photo, 256)[None]
    tokens = model.encode_tokens(crop)
    top = grid_image([[crop[0], token_image(tokens[0], palette, cell), model.decode_tokens(tokens)[0]]])
    tokens = model.encode_tokens(patches)
    recon = model.decode_tokens(tokens)
    bottom = grid_image([list(patches), [token_image(t, palette, cell) for t in tokens], list(recon)], scale=3)
    width = max(top.width, bottom.width)
    save_stacked([caption("held-out photograph (not trained on): original | tokens, one colour per token index | "
                          "reconstruction from the tokens", width), top,
                  caption("held-out patches: originals, tokens, reconstructions from the tokens", width), bottom],
                 path, pad=2)
    model.train()


if __name__ == "__main__":
    main()

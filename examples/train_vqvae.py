"""Train a VQ-VAE on patches of scikit-image's sample photographs, on CPU, in a few minutes.

    python examples/train_vqvae.py                 # EMA codebook with k-means init and dead-code reset
    python examples/train_vqvae.py --steps 20      # a quick check
    python examples/train_vqvae.py --learned       # codebook learned by the codebook loss instead
    torchrun --nproc_per_node=2 examples/train_vqvae.py --steps 200   # data-parallel (gloo, CPU)

Under torchrun, each rank trains on its own patches; gradients are averaged by DistributedDataParallel
and the EMA codebook statistics, the k-means initialisation and the dead-code samples are all-reduced
by ``VectorQuantizer`` (``sync_codebook``), so every rank keeps the same codebook: buffers are *not*
broadcast by DDP here, and the script checks at the end that the ranks' codebooks are identical.

Reports the reconstruction error (MSE and PSNR on [0, 1] pixels) on held-out patches of a photograph
not trained on and on fresh patches of the training photographs, and codebook usage: the fraction of
the codes that the encoder actually picks on those patches (and their perplexity), and
``VectorQuantizer.usage()``: the same for the last training batch. Writes
``<out>/vqvae_reconstructions.png`` (originals above reconstructions) and ``<out>/vqvae.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from examples._photos import (HELD_OUT_PHOTOS, TRAIN_PHOTOS, PatchSampler, center_crop, load_photos,  # noqa: E402
                              psnr, save_comparison)
from python_models.checkpoint import save_checkpoint  # noqa: E402
from python_models.vqvae import VQVAE, VQVAEConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps (default: a few minutes on CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=32, help="patch side in pixels")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--code-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--learned", action="store_true", help="learned codebook (codebook loss) instead of EMA")
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    p.add_argument("--dead-threshold", type=float, default=1.0, help="EMA dead-code reset threshold (0: off)")
    p.add_argument("--eval-patches", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: VQVAE, patches: torch.Tensor, batch: int = 256) -> dict[str, float]:
    model.eval()
    sq_err, n, counts = 0.0, 0, torch.zeros(model.config.codebook_size)
    for i in tqdm(range(0, patches.shape[0], batch), desc="eval", leave=False):
        x = patches[i:i + batch]
        out = model(x - 0.5)
        sq_err += float(F.mse_loss(out["x_rec"] + 0.5, x, reduction="sum").clamp_min(0))
        n += x.numel()
        counts += torch.bincount(out["indices"].flatten(), minlength=model.config.codebook_size).float()
    model.train()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-torch.special.xlogy(p, p).sum()))
    mse = sq_err / n
    return {"mse": mse, "psnr": psnr(mse), "used": float((counts > 0).float().mean()), "perplexity": perplexity}


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts a gloo process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def codebooks_identical(model: VQVAE) -> bool:
    """All ranks hold bit-identical codebooks and EMA statistics."""
    import torch.distributed as dist

    ok = True
    for name, buf in model.quantizer.state_dict().items():  # the codebook, and the EMA statistics
        if not buf.is_floating_point():
            continue
        buf = buf.detach().contiguous()
        gathered = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, buf)
        ok &= all(torch.equal(g, gathered[0]) for g in gathered)
    return bool(ok)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world = init_distributed()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train = PatchSampler(load_photos(TRAIN_PHOTOS), args.patch, seed=args.seed + 1000 * rank)
    held_out_photos = load_photos(HELD_OUT_PHOTOS)
    eval_train = PatchSampler(load_photos(TRAIN_PHOTOS), args.patch, seed=args.seed + 1).sample(args.eval_patches)
    eval_held = PatchSampler(held_out_photos, args.patch, seed=args.seed + 2).sample(args.eval_patches)

    ema = not args.learned
    config = VQVAEConfig(hidden=args.hidden, res_hidden=args.hidden // 2, num_res_blocks=2, num_downsamples=2,
                         codebook_size=args.codebook_size, code_dim=args.code_dim,
                         decay=args.decay if ema else None,
                         threshold_ema_dead_code=args.dead_threshold if ema else 0.0, kmeans_init=ema)
    model = VQVAE(config)
    trained = model
    if world > 1:
        # broadcast_buffers=False: the codebooks stay equal through VectorQuantizer's own all-reduces.
        trained = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.steps, 1), eta_min=args.lr / 10)
    if rank == 0:
        print(f"VQ-VAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{'EMA' if ema else 'learned'} codebook of {args.codebook_size} x {args.code_dim}, "
              f"{args.patch}x{args.patch} patches -> {args.patch // 4}x{args.patch // 4} tokens"
              + (f", {world} data-parallel ranks" if world > 1 else ""))
    start = time.time()
    bar = tqdm(range(args.steps), desc="train" if world == 1 else f"train (rank {rank})", disable=rank > 0)
    for step in bar:
        x = train.sample(args.batch_size) - 0.5
        out = trained(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(mse=f"{float(out['recon_loss'].detach()):.4f}", vq=f"{float(out['vq_loss'].detach()):.4f}")
    train_time = time.time() - start
    if world > 1:
        import torch.distributed as dist

        same = codebooks_identical(model)
        if rank == 0:
            print(f"codebooks identical on all {world} ranks: {same}")
        if not same:
            raise RuntimeError("train_vqvae: the ranks' codebooks differ after data-parallel training")
        if rank > 0:
            dist.destroy_process_group()
            return {"steps": args.steps, "train_seconds": train_time, "codebooks_identical": same}

    result = {"steps": args.steps, "train_seconds": train_time,
              "held_out": evaluate(model, eval_held), "train_photos": evaluate(model, eval_train)}
    usage = model.codebook_usage()
    result["last_batch"] = {"used_fraction": float(usage["used_fraction"]), "perplexity": float(usage["perplexity"])}
    print(f"trained {args.steps} steps in {train_time:.0f} s")
    for split in ("held_out", "train_photos"):
        r = result[split]
        print(f"{split:>12}: reconstruction MSE {r['mse']:.5f} (PSNR {r['psnr']:.2f} dB); codes used "
              f"{r['used']:.1%} of {args.codebook_size}, perplexity {r['perplexity']:.1f}")
    print(f"last training batch: {result['last_batch']['used_fraction']:.1%} of codes picked, "
          f"perplexity {result['last_batch']['perplexity']:.1f}")

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    with torch.no_grad():
        shown = eval_held[:8]
        recon = (model(shown - 0.5)["x_rec"] + 0.5).clamp(0, 1)
        photo = center_crop(held_out_photos[0], 256)[None]
        photo_rec = (model(photo - 0.5)["x_rec"] + 0.5).clamp(0, 1)
    png = os.path.join(args.out, "vqvae_reconstructions.png")
    save_comparison([list(shown), list(recon)], png, scale=4)
    save_comparison([[photo[0], photo_rec[0]]], os.path.join(args.out, "vqvae_photo.png"))
    save_checkpoint(model, os.path.join(args.out, "vqvae.pt"), steps=args.steps)
    print(f"wrote {png}, {os.path.join(args.out, 'vqvae_photo.png')} and {os.path.join(args.out, 'vqvae.pt')}")
    if world > 1:
        import torch.distributed as dist

        result["codebooks_identical"] = True
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()

"""Training-step benchmarks (figures printed, not timed tests).

Train-step time (forward + backward + AdamW step, batch from the config) and peak RSS for the VAE and the
latent U-Net of each config size, 2D and 3D; then latent-space vs pixel-space diffusion step time for the
same U-Net, in one run, as a ratio (the reason latent diffusion exists).

    python benchmarks/train_speed.py [--configs vae-mr-cpu ldm-mr-recon-cpu ...] [--reps 3] [--gpu-3d-size 64]
    python benchmarks/train_speed.py --data [--configs ldm-mr-sr-gpu ...]

``--data`` times the CPU side of an LDM training step instead: drawing the batch's patches and degrading
them (ms per batch, one process; ``data.num_workers`` spreads this over worker processes). On a GPU this,
not the networks, bounded the step rate of the first run (2026-11-26: 1.35 steps/s for mr-sr on an H200).

Each measurement runs in a fresh subprocess so peak RSS is its own. 3D configs meant for a GPU are
measured at --gpu-3d-size^3 on CPU (their 96^3 patches take minutes per step here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(config: str, reps: int, size3d: int, pixel: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from medldm.config import load_config
    from medldm.models.builders import build_unet, build_vae, count_parameters

    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    dims = cfg.data.spatial_dims
    patch = list(cfg.data.patch_size)
    if dims == 3 and not torch.cuda.is_available():
        patch = [size3d] * 3
    bs = cfg.data.batch_size
    if cfg.kind == "vae":
        net = build_vae(cfg.vae, dims)
        x = torch.rand(bs, 1, *patch)
        loss_fn = lambda: F.l1_loss(net(x)[0], x)  # noqa: E731
    else:
        from medldm.models.bundle import load_bundle

        try:
            vae_cfg = load_bundle(ROOT / cfg.vae_path).vae_config
        except Exception:  # no trained VAE here: same shapes from the matching VAE config
            vae_cfg = load_config(ROOT / "configs" / f"vae-{cfg.data.modality.lower()}-{'cpu' if dims == 2 else '3d-gpu'}.yaml").vae
        lat = vae_cfg.latent_channels
        net = build_unet(cfg.unet, dims, lat)
        size = patch if pixel else [p // vae_cfg.downsample for p in patch]
        x = torch.randn(bs, 2 * lat + 1, *size)
        t = torch.randint(0, 1000, (bs,))
        loss_fn = lambda: F.mse_loss(net(x, t), x[:, :lat])  # noqa: E731
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    times = []
    for i in range(reps + 1):
        t0 = time.time()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if i:  # first step is warm-up
            times.append(time.time() - t0)
    return {"config": config + (" (pixel space)" if pixel else ""), "dims": dims, "input": "x".join(map(str, x.shape[1:])),
            "batch": bs, "params_M": round(count_parameters(net) / 1e6, 2), "step_s": round(sorted(times)[len(times) // 2], 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def data_path(config: str, reps: int) -> dict:
    import torch

    from medldm.config import load_config
    from medldm.models.normalisation import Normalisation
    from medldm.physics.registry import build_random_operator
    from medldm.training.data import PatchBatches
    from medldm.training.ldm import DegradedPairs

    torch.set_num_threads(1)  # what one DataLoader worker gets
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", "ldm")
    op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    patches = PatchBatches(cfg.data, seed=0)
    pairs = DegradedPairs(patches, op, Normalisation(kind="percentile", scale=1.0), seed=0)
    pairs(0)  # warm-up
    t0 = time.time()
    for s in range(1, reps + 1):
        patches(s)
    t_patch = (time.time() - t0) / reps
    t0 = time.time()
    for s in range(1, reps + 1):
        pairs(s)
    t_pair = (time.time() - t0) / reps
    return {"config": config, "batch": cfg.data.batch_size, "patch": "x".join(map(str, cfg.data.patch_size)),
            "patches_ms": round(1000 * t_patch, 1), "degrade_ms": round(1000 * (t_pair - t_patch), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=["vae-mr-tiny", "vae-mr-cpu", "vae-mr-3d-gpu", "ldm-mr-recon-cpu",
                                                     "ldm-mr-recon-3d-gpu"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-3d-size", type=int, default=64)
    ap.add_argument("--data", action="store_true", help="Time patch drawing and degradation per batch instead.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data:
        names = [c for c in args.configs if c.startswith("ldm") and "3d" not in c] if "--configs" in sys.argv else [
            f"ldm-mr-{t}-{p}" for p in ("cpu", "gpu") for t in ("recon", "denoise", "sr")]
        print("| config | batch | patch | draw patches (ms/batch) | degrade (ms/batch) |\n|---|---|---|---|---|")
        for name in names:
            r = data_path(name, max(args.reps, 5))
            print(f"| {r['config']} | {r['batch']} | {r['patch']} | {r['patches_ms']} | {r['degrade_ms']} |", flush=True)
        return
    if args.child:
        name, pixel = json.loads(args.child)
        print(json.dumps(measure(name, args.reps, args.gpu_3d_size, pixel)))
        return
    jobs = [(c, False) for c in args.configs] + [(c, True) for c in args.configs if c.startswith("ldm")]
    rows = []
    print("| config | dims | input | batch | params (M) | train step (s) | peak RSS (GiB) |\n|---|---|---|---|---|---|---|")
    for name, pixel in jobs:
        p = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--gpu-3d-size", str(args.gpu_3d_size),
                            "--child", json.dumps([name, pixel])], capture_output=True, text=True)
        if p.returncode:
            print(f"| {name} | failed: {p.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {r['config']} | {r['dims']} | {r['input']} | {r['batch']} | {r['params_M']} | {r['step_s']} | {r['peak_rss_gib']} |")
    for r in rows:
        if r["config"].endswith("(pixel space)"):
            base = next(x for x in rows if x["config"] == r["config"].replace(" (pixel space)", ""))
            print(f"pixel/latent train-step ratio for {base['config']}: {r['step_s'] / base['step_s']:.1f}x")


if __name__ == "__main__":
    main()

"""Sampling benchmarks (figures printed, not timed tests).

1. Seconds per volume and peak RSS for 128^3, 180x217x180 and 256^3 volumes at 20 steps, 1 and 4 samples.
2. Overhead of medldm's sampler over MONAI's LatentDiffusionInferer.sample on the same patch and networks.
3. Latent vs pixel-space sampling time per step for the same U-Net.

    python benchmarks/sampling_speed.py [--model mr-denoise|FOLDER] [--sizes 128 180x217x180 256] [--device cuda]

Each volume size runs in a fresh subprocess so its peak RSS is its own (ru_maxrss of the child); on CUDA
the peak GPU memory (torch.cuda.max_memory_allocated) is printed too.
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


def one_volume(model: str, shape: tuple[int, ...], steps: int, samples: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from medldm.io.volume import Volume
    from medldm.sampling.reconstructor import Reconstructor

    rec = Reconstructor.load(model, device=device)
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((1, *shape), dtype=np.float32) * 100, np.eye(4), rec.config.modality)
    if rec.task == "sr":
        vol = vol.with_array(vol.array[..., ::4].copy(), np.diag([1.0, 1.0, 4.0, 1.0]))
    t0 = time.time()
    if rec.task == "recon":
        from medldm.sampling.measurement import simulate

        vol = simulate(vol, "recon", 0, accelerations=[4], center_fractions=[0.08])
    res = rec(vol, steps=steps, samples=samples, seed=0)
    return {"shape": "x".join(map(str, shape)), "steps": steps, "samples": samples, "seconds": round(time.time() - t0, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "sample_seconds": round(res.timings["sample"], 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None}


def monai_overhead(model: str, steps: int = 20, reps: int = 3, device: str = "cpu") -> dict:
    """Same networks, same 2D latent patch batch, same DDIM scheduler: ours vs LatentDiffusionInferer.sample."""
    import torch
    from monai.inferers import LatentDiffusionInferer

    from medldm.models.builders import build_scheduler
    from medldm.sampling.reconstructor import Reconstructor
    from medldm.sampling.samplers import sample
    from medldm.models.latent import condition_input

    rec = Reconstructor.load(model, device=device)
    b = rec.bundle
    lat = b.vae_config.latent_channels
    sched = build_scheduler(b.config.scheduler, "ddim")
    z = torch.randn(8, lat, 48, 48, generator=torch.Generator().manual_seed(0)).to(device)
    cond = condition_input(torch.randn(8, lat, 48, 48), torch.zeros(8)).to(device)
    inferer = LatentDiffusionInferer(sched, scale_factor=b.latent_scale)

    def ours():
        with torch.no_grad():
            zz = sample(lambda x, t: b.unet(torch.cat([x, cond], 1), t), z, sched, steps)
            return b.vae.decode(zz / b.latent_scale)

    def theirs():
        sched.set_timesteps(steps)
        with torch.no_grad():
            return inferer.sample(input_noise=z, autoencoder_model=b.vae, diffusion_model=b.unet, scheduler=sched,
                                  conditioning=cond, mode="concat", verbose=False)

    times = {}
    for name, fn in (("medldm", ours), ("monai", theirs)):
        fn()  # warm-up
        _sync(device)
        t0 = time.time()
        for _ in range(reps):
            fn()
        _sync(device)
        times[name] = (time.time() - t0) / reps
    return {"medldm_s": round(times["medldm"], 3), "monai_s": round(times["monai"], 3),
            "ratio": round(times["medldm"] / times["monai"], 3)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latent_vs_pixel(model: str, reps: int = 5, device: str = "cpu") -> dict:
    """One denoiser step of the same U-Net in latent space vs on the full-resolution image."""
    import torch

    from medldm.sampling.reconstructor import Reconstructor

    b = Reconstructor.load(model, device=device).bundle
    down, lat = b.vae_config.downsample, b.vae_config.latent_channels
    out = {}
    for name, size in (("latent", 192 // down), ("pixel", 192)):
        x = torch.randn(8, 2 * lat + 1, size, size, device=device)
        t = torch.full((8,), 500, device=device)
        with torch.no_grad():
            b.unet(x, t)
            _sync(device)
            t0 = time.time()
            for _ in range(reps):
                b.unet(x, t)
            _sync(device)
        out[f"{name}_step_s"] = round((time.time() - t0) / reps, 3)
    out["pixel_over_latent"] = round(out["pixel_step_s"] / out["latent_step_s"], 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mr-denoise")
    ap.add_argument("--sizes", nargs="*", default=["128", "180x217x180", "256"])
    ap.add_argument("--samples", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shape, samples = json.loads(args.child)
        print(json.dumps(one_volume(args.model, tuple(shape), args.steps, samples, args.device)))
        return
    print(f"device: {args.device}")
    print("| volume | steps | samples | seconds | sampling s | peak RSS GiB | peak GPU GiB |\n|---|---|---|---|---|---|---|")
    for size in args.sizes:
        shape = [int(s) for s in size.split("x")] if "x" in size else [int(size)] * 3
        for k in args.samples:
            p = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                "--device", args.device, "--child", json.dumps([shape, k])], capture_output=True, text=True)
            if p.returncode:
                print(f"| {size} | {args.steps} | {k} | failed: {p.stderr.strip().splitlines()[-1]} | | | |", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"| {r['shape']} | {r['steps']} | {k} | {r['seconds']} | {r['sample_seconds']} | {r['peak_rss_gib']} "
                  f"| {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |", flush=True)
    print("\nmedldm sampler vs MONAI LatentDiffusionInferer.sample (8 x 48^2 latents, 20 DDIM steps):",
          monai_overhead(args.model, args.steps, device=args.device))
    print("latent vs pixel U-Net step (batch 8, 192^2 image):", latent_vs_pixel(args.model, device=args.device))


if __name__ == "__main__":
    main()

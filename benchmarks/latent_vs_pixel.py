"""Latent vs pixel-space diffusion at the same quality target (figures printed, not a timed test).

A pixel-space twin of a shipped 2D model is trained here: the same MONAI DiffusionModelUNet layout,
scheduler, data stream and degradations (the model's configs/ldm-<name>-cpu.yaml), but on the image
itself (1 channel at full resolution) instead of the VAE's latent. Both are then sampled at several
step counts on the held-out validation volume, and the quality target is the best PSNR that both reach;
the figure is the sampling time each needs to reach it. Two latent sides are compared: the product (latent
sample, decoder, refiner) and the diffusion model alone (decoded sample, no refiner), since the pixel twin
has no refiner.

    python benchmarks/latent_vs_pixel.py --model mr-denoise --minutes 20 [--steps 1 2 5 10 20]

The pixel twin is saved under runs/pixel-<name>/ (state_dict, safetensors) and reused when present
(``--retrain`` trains it again). The latent side is the shipped model through the Reconstructor (latent
sampling, decoding, refiner; no data consistency for denoising), so it pays for everything it does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.config import load_config  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.metrics import psnr, ssim  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.builders import build_scheduler, build_unet  # noqa: E402
from medldm.models.latent import condition_input  # noqa: E402
from medldm.models.normalisation import Normalisation  # noqa: E402
from medldm.physics.registry import build_random_operator  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402
from medldm.sampling.samplers import sample, training_target  # noqa: E402
from medldm.sampling.slicewise import pad_to_multiple  # noqa: E402
from medldm.training.common import make_ema  # noqa: E402
from medldm.training.data import PatchBatches, step_stream  # noqa: E402
from medldm.training.ldm import DegradedPairs, noised_inputs, step_rng  # noqa: E402

CROP = (128, 128, 16)  # the evaluation's centre crop


def train_pixel(cfg, out: Path, minutes: float) -> dict:
    """The LDM training step without the VAE: x_t = noised image, condition = naive inverse (+ its level)."""
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.unet, 2, latent_channels=1)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    ema = make_ema(unet, cfg.train.ema_decay)  # with warm-up, like the LDM's
    scheduler = build_scheduler(cfg.scheduler, spatial_dims=2)
    norm = Normalisation(kind="percentile", scale=1.0)
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    pairs = step_stream(DegradedPairs(PatchBatches(cfg.data, seed=cfg.train.seed), random_op, norm, cfg.train.seed))
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < 60 * minutes:
        x, cond = next(pairs)
        rng = step_rng(cfg.train.seed, 0, step, x.shape[0])
        inp, _, t, noise = noised_inputs(scheduler, x, cond, rng, cfg.train.cond_noise_max)  # the LDM's step, on pixels
        loss = F.mse_loss(unet(inp, t), training_target(scheduler, x, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        opt.step()
        ema.update_parameters(unet)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"pixel {cfg.name}: step {step}, {time.time() - t0:.0f} s, loss {np.mean(losses[-50:]):.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(out / "unet.safetensors"))
    record = {"steps": step, "seconds": round(time.time() - t0, 1), "final_loss_mean_last_50": float(np.mean(losses[-50:])),
              "config": str(cfg.name), "unet": cfg.unet.model_dump(), "patch_size": cfg.data.patch_size,
              "batch_size": cfg.data.batch_size}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


@torch.no_grad()
def pixel_restore(unet, scheduler, naive: torch.Tensor, steps: int, seed: int = 0, batch: int = 16) -> np.ndarray:
    """(X, Y, Z) physical -> (X, Y, Z) physical: axial slices sampled in pixel space with DDIM."""
    norm = Normalisation(kind="percentile", scale=1.0).fit(naive)
    slices, (h, w) = pad_to_multiple(norm.forward(naive).movedim(2, 0)[:, None])
    noise = torch.randn(slices.shape, generator=torch.Generator().manual_seed(seed))
    outs = []
    for a in range(0, slices.shape[0], batch):
        c = condition_input(slices[a:a + batch], torch.zeros(len(slices[a:a + batch])))
        outs.append(sample(lambda z, t: unet(torch.cat([z, c], 1), t), noise[a:a + batch], scheduler, steps))
    out = torch.cat(outs)[:, 0, :h, :w].movedim(0, 2)
    return norm.inverse(out).clamp_min(0).numpy()


def time_to_target(rows: list[dict], target: float) -> float | None:
    ok = [r["seconds"] for r in rows if r["psnr"] >= target]
    return min(ok) if ok else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mr-denoise", help="A shipped 2D model name (its -cpu config trains the twin).")
    ap.add_argument("--minutes", type=float, default=20.0, help="Training budget of the pixel twin.")
    ap.add_argument("--steps", nargs="*", type=int, default=[1, 2, 5, 10, 20])
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "latent-vs-pixel"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = load_config(ROOT / "configs" / f"ldm-{args.model}-cpu.yaml", "ldm")
    twin = ROOT / "runs" / f"pixel-{args.model}"
    if args.retrain or not (twin / "unet.safetensors").is_file():
        train_pixel(cfg, twin, args.minutes)
    record = json.loads((twin / "training.json").read_text())
    unet = build_unet(cfg.unet, 2, latent_channels=1)
    unet.load_state_dict(load_file(str(twin / "unet.safetensors")))
    unet.eval()
    ddim = build_scheduler(cfg.scheduler, "ddim", spatial_dims=2)

    rec = Reconstructor.load(args.model, device="cpu")
    vols = validation_volumes(ROOT / "data" / "datalist.json", rec.config.modality, CROP)
    case = make_cases(rec.task, rec.config.modality, vols)[0]
    truth = case.truth.array[0]
    naive = case.measurement.naive_inverse().float()[0, 0]
    rows = {"latent": [], "latent-only": [], "pixel": []}
    rec(case.measurement, steps=1, samples=1, seed=0)  # warm-up: first calls pay for allocations and caches
    pixel_restore(unet, ddim, naive, 1)
    for steps in args.steps:
        t0 = time.time()
        lat = rec(case.measurement, steps=steps, samples=1, seed=0, progress=False).volume.array[0]
        rows["latent"].append({"steps": steps, "seconds": round(time.time() - t0, 2), "psnr": psnr(truth, lat), "ssim": ssim(truth, lat)})
        t0 = time.time()  # the diffusion model alone: decoded latent sample, no refiner (the pixel twin has none)
        lat = rec(case.measurement, steps=steps, samples=1, seed=0, refine=False, dc=False).volume.array[0]
        rows["latent-only"].append({"steps": steps, "seconds": round(time.time() - t0, 2), "psnr": psnr(truth, lat),
                                    "ssim": ssim(truth, lat)})
        t0 = time.time()
        pix = pixel_restore(unet, ddim, naive, steps)
        rows["pixel"].append({"steps": steps, "seconds": round(time.time() - t0, 2), "psnr": psnr(truth, pix), "ssim": ssim(truth, pix)})
        print(f"steps {steps}: " + ", ".join(f"{k} {v[-1]}" for k, v in rows.items()), flush=True)
    comparisons = {}
    for latent in ("latent", "latent-only"):  # the product (with refiner) and the diffusion model alone
        target = min(max(r["psnr"] for r in rows[latent]), max(r["psnr"] for r in rows["pixel"]))
        t_lat, t_pix = time_to_target(rows[latent], target), time_to_target(rows["pixel"], target)
        comparisons[latent] = {"target_psnr": round(target, 2), "latent_s": t_lat, "pixel_s": t_pix,
                               "pixel_over_latent": round(t_pix / t_lat, 2) if t_lat and t_pix else None}
    result = {"model": args.model, "case": case.name, "crop": CROP, "noisy_input_psnr": psnr(truth, naive.numpy()),
              "pixel_twin_training": record, "rows": rows, "same_quality": comparisons}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{case.name} ({'x'.join(map(str, CROP))} crop; noisy input {result['noisy_input_psnr']:.2f} dB); "
          f"pixel twin: {record['steps']} steps in {record['seconds']:.0f} s of training")
    print("| space | DDIM steps | seconds | PSNR dB | SSIM |\n|---|---|---|---|---|")
    for space, space_rows in rows.items():
        for r in space_rows:
            print(f"| {space} | {r['steps']} | {r['seconds']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    for latent, c in comparisons.items():
        print(f"\n{latent} vs pixel, quality target (best PSNR both reach) {c['target_psnr']:.2f} dB: seconds to reach it "
              f"{c['latent_s']} vs {c['pixel_s']}; pixel/latent {c['pixel_over_latent']}")


if __name__ == "__main__":
    main()

"""What the latent stage of a flow (bridge) model does on held-out cases (figures printed, not a test).

For each evaluation case (the same held-out volumes, crops, degradations and seeds as `medldm evaluate`) it
decodes, without refiner or data consistency:
- the truth's own latent (the VAE's ceiling) and the start image's latent (what the flow starts from);
- flow samples from that latent, for a few step counts, with the model's start noise and without it;
- the mean of K noisy samples;
and prints PSNR against the truth and the latent MSE against the truth's latent. A latent stage that works
moves the samples from the start latent towards the truth's; the gap between "start" and "ceiling" is all it
can add, and the bank's own held-out pairs (`--bank`) show the same figures on training anatomy.

    python benchmarks/latent_audit.py --model runs/bridge-mr-recon/model [--crop 128,128,16] [--steps 1,5,10]
        [--samples 4] [--bank runs/bank-mr-recon]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.builders import build_scheduler  # noqa: E402
from medldm.models.latent import LatentCodec, condition_input  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402
from medldm.sampling.samplers import rflow_sample  # noqa: E402
from medldm.sampling.slicewise import pad_to_multiple  # noqa: E402


def flow(bundle, scheduler, start_latent: torch.Tensor, z0: torch.Tensor, steps: int) -> torch.Tensor:
    cin = condition_input(start_latent, torch.zeros(start_latent.shape[0]))
    return rflow_sample(lambda z, t: bundle.unet(torch.cat([z, cin], 1), t), z0, scheduler, steps)


def audit_case(rec: Reconstructor, case, steps_list, samples: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{row: (PSNR of the decoded latent, latent MSE against the truth's latent)} for one case."""
    b, m = rec.bundle, case.measurement
    sched_cfg = b.config.scheduler
    scheduler = build_scheduler(sched_cfg, "rflow", spatial_dims=2)
    cond_phys = m.naive_inverse().float()
    norm = rec.config.normalisation.unfitted().fit(cond_phys)
    cond, axis = norm.forward(cond_phys), rec.slice_axis
    _, start, intensity = rec._guides(m, cond, norm, axis, refine=False)  # the start image, as sampling makes it
    codec = LatentCodec(b.vae, b.latent_scale, intensity)
    truth = case.truth.array[0].astype(np.float32)
    truth_n = norm.forward(torch.from_numpy(truth)[None, None])[0, 0].movedim(axis, 0)[:, None]
    (sp, (h, w)), (tp, _) = pad_to_multiple(start), pad_to_multiple(truth_n)
    c, zt = codec.encode(sp), codec.encode(tp)
    mask = M.foreground_mask(truth)

    def row(z: torch.Tensor) -> tuple[float, float]:
        x = codec.decode(z)[..., :h, :w]
        vol = norm.inverse(x[:, 0].movedim(0, axis)[None, None])[0, 0].numpy()
        return round(M.all_metrics(truth, vol, mask)["psnr"], 2), round(float((z - zt).pow(2).mean()), 4)

    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(c.shape, generator=g) for _ in range(samples)]
    rows = {"VAE(truth) ceiling": row(zt), "start image": (round(M.all_metrics(
        truth, norm.inverse(start[:, 0].movedim(0, axis)[None, None])[0, 0].numpy(), mask)["psnr"], 2), float("nan")),
        "decoded start latent": row(c)}
    for steps in steps_list:
        rows[f"flow {steps} steps, no start noise"] = row(flow(b, scheduler, c, c, steps))
        outs = [flow(b, scheduler, c, c + sched_cfg.start_noise * n, steps) for n in noise]
        rows[f"flow {steps} steps, one sample"] = row(outs[0])
        rows[f"flow {steps} steps, mean of {samples}"] = row(sum(outs) / len(outs))
    return rows


def bank_rows(rec: Reconstructor, bank_dir: str, steps_list, samples: int) -> dict[str, float]:
    """Latent MSE on the bank's held-out pairs (training anatomy): start, and flows as above."""
    from medldm.training.banks import LatentBank

    b = rec.bundle
    sched_cfg = b.config.scheduler
    scheduler = build_scheduler(sched_cfg, "rflow", spatial_dims=2)
    truth, start = LatentBank(bank_dir).validation()
    g = torch.Generator().manual_seed(0)
    mse = lambda z: round(float((z - truth).pow(2).mean()), 4)  # noqa: E731
    out = {"start latent": mse(start)}
    for steps in steps_list:
        out[f"flow {steps} steps, no start noise"] = mse(flow(b, scheduler, start, start, steps))
        outs = [flow(b, scheduler, start, start + sched_cfg.start_noise * torch.randn(start.shape, generator=g), steps)
                for _ in range(samples)]
        out[f"flow {steps} steps, mean of {samples}"] = mse(sum(outs) / len(outs))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--datalist", default=str(ROOT / "data/datalist.json"))
    ap.add_argument("--crop", default="128,128,16")
    ap.add_argument("--steps", default="1,5,10")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--bank", default=None, help="also the bank's held-out pairs (latent MSE only)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rec = Reconstructor.load(args.model, device="cpu")
    if rec.bundle.flow_start == "noise":
        raise SystemExit(f"{args.model}: not a flow model (it samples from noise); nothing to audit here")
    steps_list = [int(s) for s in args.steps.split(",")]
    vols = validation_volumes(args.datalist, rec.config.modality, tuple(int(v) for v in args.crop.split(",")))
    for case in make_cases(rec.task, rec.config.modality, vols, seed=0):
        print(f"\n{case.name}: PSNR (dB) / latent MSE to the truth's latent")
        for name, (psnr, mse) in audit_case(rec, case, steps_list, args.samples).items():
            print(f"  {name:<34} {psnr:>6.2f}  {mse:>7.4f}")
    if args.bank:
        print(f"\n{args.bank}, held-out pairs (training anatomy): latent MSE")
        for name, mse in bank_rows(rec, args.bank, steps_list, args.samples).items():
            print(f"  {name:<34} {mse:>7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

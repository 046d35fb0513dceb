"""U-Net training throughput from a latent bank against today's stage-2 loop (figures printed, not timed tests).

Both loops train the model's own latent U-Net at the same batch size on the same machine:
- ``stage-2 loop`` (``medldm.training.ldm``): draw the step's patches, degrade them, encode truth and naive inverse,
  then the U-Net step;
- ``bank`` (``medldm.training.bridge``): a seeded minibatch of precomputed latents, then the U-Net step;
- ``bank + guide`` adds what building the bank cost per pair of a guided model (TV-POCS or NLM made once per
  pair, read from the bank's recipe), spread over the epochs the bank is used for (``--epochs``).

    python benchmarks/bank_throughput.py --config configs/ldm-mr-recon-cpu.yaml --model medldm/shipped/mr-recon \
        --bank runs/bank-mr-recon [--steps 20] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(step, steps: int, device) -> float:
    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    from medldm.config import load_config
    from medldm.models.builders import build_scheduler
    from medldm.models.bundle import load_bundle
    from medldm.models.latent import LatentCodec
    from medldm.models.normalisation import Normalisation
    from medldm.physics.registry import build_random_operator
    from medldm.training.banks import LatentBank
    from medldm.training.bridge import flow_inputs, flow_scheduler_config
    from medldm.training.data import PatchBatches
    from medldm.training.ldm import DegradedPairs, noised_inputs, step_rng
    from medldm.sampling.samplers import training_target

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's data.batch_size)")
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the bank its building cost is spread on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    cfg = load_config(a.config, "ldm", {"tracking.enabled": False})
    bs = a.batch or cfg.data.batch_size
    bundle = load_bundle(a.model).to(dev)
    codec = LatentCodec(bundle.vae.eval(), bundle.latent_scale)
    unet = bundle.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def update(inp, t, target):
        loss = F.mse_loss(unet(inp, t).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ddpm = build_scheduler(cfg.scheduler, spatial_dims=2)
    norm = Normalisation(kind="percentile", scale=1.0) if cfg.data.modality == "MR" else Normalisation.for_modality("CT")
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    data = cfg.data.model_copy(update={"batch_size": bs})
    pairs = DegradedPairs(PatchBatches(data, seed=cfg.train.seed), random_op, norm, cfg.train.seed)

    def stage2_step(s):
        x, cond = (t.to(dev) for t in pairs(s))
        z0 = codec.encode(x)
        inp, _z_t, t, noise = noised_inputs(ddpm, z0, codec.encode(cond), step_rng(cfg.train.seed, 0, s, bs), 0.1)
        update(inp, t, training_target(ddpm, z0, noise, t))

    bank = LatentBank(a.bank)
    flow = build_scheduler(flow_scheduler_config(cfg), spatial_dims=2)

    def bank_step(s):
        truth, start = (t.to(dev) for t in bank.batch(s, bs, cfg.train.seed))
        update(*flow_inputs(flow, truth, start, cfg.bridge_stage.start_noise, torch.Generator().manual_seed(s)))

    loop = _timed(stage2_step, a.steps, dev)
    banked = _timed(bank_step, a.steps, dev)
    recipe = bank.recipe
    build_per_pair = recipe.get("seconds", 0.0) / max(1, recipe.get("pairs", len(bank)))
    amortised = 1.0 / (1.0 / banked + bs * build_per_pair / a.epochs)
    rows = {"device": str(dev), "threads": torch.get_num_threads(), "batch": bs, "bank_pairs": len(bank),
            "bank_guide": recipe.get("guide"), "bank_seconds_per_pair": round(build_per_pair, 4),
            "stage2_loop_steps_per_s": round(loop, 3), "bank_steps_per_s": round(banked, 3),
            f"bank_with_build_over_{a.epochs:g}_epochs_steps_per_s": round(amortised, 3),
            "speedup": round(banked / loop, 2)}
    print(json.dumps(rows, indent=2))
    print(f"\n| loop | steps/s | pairs/s |\n|---|---|---|\n| stage-2 loop (patches, degradation, encode) | "
          f"{loop:.2f} | {loop * bs:.1f} |\n| bank | {banked:.2f} | {banked * bs:.1f} |\n"
          f"| bank + its {recipe.get('guide')} build over {a.epochs:g} epochs | {amortised:.2f} | {amortised * bs:.1f} |")


if __name__ == "__main__":
    main()

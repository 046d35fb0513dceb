"""The latent U-Net trained as a flow from a guide's latent to the truth's, on a latent bank.

Conditional flow matching with a guide-centred source (InDI / I2SB in spirit, MONAI's RFlowScheduler as is):
the source is ``s = E(guide) + sigma * eps``, the path ``x_t = (1 - t) z + t s`` (MONAI's ``add_noise`` with
``s`` as its noise) and the target the velocity ``z - s``; the U-Net sees ``x_t`` and ``E(guide)``. Sampling
integrates from ``s`` at t = 1 to t = 0 in a few Euler steps (``samplers.rflow_sample``). The flow transports
N(E(guide), sigma^2) onto the truths that agree with the guide: different noise, different samples, spread
where the guide leaves the answer open, and no need to learn the whole image from noise.

The VAE is frozen and the refiner untouched; retrain the refiner on the new samples afterwards
(``medldm train refiner``) so it uses what the flow adds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medldm.config import LDMRunConfig, SchedulerConfig
from medldm.errors import ConfigError, ModelError
from medldm.models.builders import build_scheduler, build_unet, count_parameters
from medldm.models.bundle import load_bundle, replace_vae, save_bundle
from medldm.models.device import autocast, pick_device
from medldm.models.latent import condition_input
from medldm.sampling.samplers import rflow_sample
from medldm.tracking import Tracker
from medldm.training import common
from medldm.training.banks import LatentBank, vae_file, weights_digest

# settings a resumed run may change: the budget; anything else would change its loss or its batches
MAY_CHANGE_ON_RESUME = ("max_minutes", "max_steps", "bank_batches", "bank_workers", "ckpt_every", "val_every")


def flow_scheduler_config(cfg: LDMRunConfig) -> SchedulerConfig:
    stage = cfg.bridge_stage
    return SchedulerConfig(kind="rflow", start=stage.guide, start_noise=stage.start_noise)


def flow_inputs(scheduler, truth: torch.Tensor, start: torch.Tensor, start_noise: float, g: torch.Generator,
                shrink_min: float = 1.0):
    """One step's U-Net input, timesteps and target, every draw from ``g``: logit-normal t (as MONAI's
    RFlowScheduler samples it), the noisy source and the point on the straight path between source and truth.
    With ``shrink_min`` < 1 each start first moves towards its truth by a factor from U(shrink_min, 1)."""
    if shrink_min < 1:
        a = shrink_min + (1 - shrink_min) * torch.rand(truth.shape[0], generator=g).to(truth)
        start = truth + a.reshape(-1, *([1] * (truth.ndim - 1))) * (start - truth)
    eps = torch.randn(truth.shape, generator=g).to(truth)
    t = torch.sigmoid(torch.randn(truth.shape[0], generator=g)).to(truth.device) * scheduler.num_train_timesteps
    source = start + start_noise * eps
    x_t = scheduler.add_noise(truth, source, t)
    inp = torch.cat([x_t, condition_input(start, torch.zeros(truth.shape[0], device=truth.device))], 1)
    return inp, t, truth - source


@torch.no_grad()
def latent_validation(unet, scheduler, truth: torch.Tensor, start: torch.Tensor, start_noise: float,
                      steps: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean squared latent error of one flow sample, of the mean of two, and of the start latent itself."""
    cin = condition_input(start, torch.zeros(start.shape[0], device=start.device))
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(2):
        z = start + start_noise * torch.randn(start.shape, generator=g).to(start)
        outs.append(rflow_sample(lambda z_t, t: unet(torch.cat([z_t, cin], 1), t), z, scheduler, steps))
    mse = lambda a: float(F.mse_loss(a, truth))
    return {"sample_mse": mse(outs[0]), "mean2_mse": mse((outs[0] + outs[1]) / 2), "start_mse": mse(start),
            "spread": float((outs[0] - outs[1]).pow(2).mean() / 2)}


def train_bridge(cfg: LDMRunConfig, model_dir: str | Path, bank_dir: str | Path, out_dir: str | Path, *,
                 resume: bool = False, device: str | None = None) -> Path:
    """Train the model's latent U-Net as a guide-to-truth flow on the bank; save the model (VAE and refiner as
    they were, the new U-Net, its scheduler) to ``out_dir``/model."""
    out_dir, stage = Path(out_dir), cfg.bridge_stage
    dev = pick_device(device)
    common.seed_everything(cfg.train.seed)
    bundle = load_bundle(model_dir)
    if bundle.spatial_dims != 2:
        raise ModelError("the bridge stage trains 2D models (its bank holds slices)")
    if stage.vae:
        if stage.init == "model":
            raise ConfigError("bridge_stage.vae replaces the VAE the model's U-Net learnt: use init: fresh with it")
        bundle = replace_vae(bundle, stage.vae)
    bundle = bundle.to(dev)
    bank = LatentBank(bank_dir)
    expect = {"guide": stage.guide, "vae_weights_sha256": weights_digest(vae_file(cfg, model_dir)), "model": cfg.name}
    wrong = [f"{k} {bank.recipe.get(k)!r} (expected {v!r})" for k, v in expect.items() if bank.recipe.get(k) != v]
    if wrong:
        raise ConfigError(f"{bank_dir}: the bank does not fit this run: {'; '.join(wrong)}")
    lat_ch = bundle.vae_config.latent_channels
    unet = bundle.unet if stage.init == "model" else build_unet(cfg.unet, 2, lat_ch)
    if unet is None:
        raise ModelError(f"{model_dir}: init: model needs a model with a latent U-Net")
    unet = unet.to(dev).train().requires_grad_(True)
    sched_cfg = flow_scheduler_config(cfg)
    scheduler = build_scheduler(sched_cfg, spatial_dims=2)
    opt = torch.optim.AdamW(unet.parameters(), lr=stage.lr, weight_decay=cfg.train.weight_decay)
    ema = common.make_ema(unet, stage.ema_decay)
    ckpt_path = out_dir / "checkpoint.pt"
    step, seconds_before, run_id, losses, history = 0, 0.0, None, [], []
    if resume and ckpt_path.is_file():
        ck = common.load_checkpoint(ckpt_path)
        now = stage.model_dump()
        changed = [f"{k} {v!r} -> {now.get(k)!r}" for k, v in ck["settings"].items()
                   if k not in MAY_CHANGE_ON_RESUME and v != now.get(k)]
        if changed:
            raise ConfigError(f"{ckpt_path}: resuming with other bridge_stage settings ({'; '.join(changed)})")
        unet.load_state_dict(ck["unet"]); ema.load_state_dict(ck["ema"]); opt.load_state_dict(ck["opt"])
        step, seconds_before, run_id = ck["step"], ck["seconds"], ck.get("run_id")
        losses, history = ck["losses"], ck["history"]
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.experiment, cfg.tracking.tracking_uri)
    tracker.start(f"bridge-{cfg.name}", run_id=run_id,
                  params={**stage.model_dump(), "model": str(model_dir), "bank": str(bank_dir), "bank_pairs": len(bank)},
                  tags={"medldm.stage": "bridge", "medldm.task": cfg.degradation.task})
    val_truth, val_start = (t.to(dev) for t in bank.validation())
    total = stage.max_steps or 10**9
    progress = common.Progress(stage.max_steps, step, f"bridge {cfg.name} ({stage.max_minutes:g} min)", True)
    t0 = time.time()

    def save_checkpoint():
        common.save_checkpoint(ckpt_path, {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                           "step": step, "seconds": seconds_before + time.time() - t0,
                                           "run_id": tracker.run_id, "losses": losses, "history": history,
                                           "settings": stage.model_dump()})

    while step < total and seconds_before + time.time() - t0 < 60 * stage.max_minutes:
        truth, start = (t.to(dev) for t in bank.batch(step, stage.batch_size, cfg.train.seed))
        g = torch.Generator().manual_seed(int(np.random.default_rng([cfg.train.seed, step, 1]).integers(2**31 - 1)))
        inp, t, target = flow_inputs(scheduler, truth, start, stage.start_noise, g, stage.start_shrink_min)
        with autocast(dev, cfg.train.amp):
            loss = F.mse_loss(unet(inp, t).float(), target)
        common.optimizer_step(opt, loss, unet.parameters(), cfg.train.grad_clip)
        ema.update_parameters(unet)
        step += 1
        losses.append(loss.item())
        progress.update(loss=losses[-1])
        if step % cfg.train.log_every == 0:
            tracker.log_metrics({"train/flow_mse": float(np.mean(losses[-cfg.train.log_every:]))}, step)
        if step % stage.val_every == 0:
            val = latent_validation(ema.module.eval(), scheduler, val_truth, val_start, stage.start_noise)
            history.append({"step": step, **val})
            tracker.log_metrics({f"val/{k}": v for k, v in val.items()}, step)
        if step % stage.ckpt_every == 0:
            save_checkpoint()
    progress.close()
    save_checkpoint()
    val = latent_validation(ema.module.eval(), scheduler, val_truth, val_start, stage.start_noise)
    history.append({"step": step, **val})
    seconds = round(seconds_before + time.time() - t0, 1)
    if stage.init == "fresh":  # a new U-Net: the bridge legs of the one it replaces no longer describe it
        bundle.record.legs = [leg for leg in bundle.record.legs if leg.get("stage") != "bridge"]
    bundle.config = bundle.config.model_copy(
        update={"scheduler": sched_cfg, **({"unet": cfg.unet} if stage.init == "fresh" else {})})
    bundle.record.legs.append({
        "stage": "bridge", "steps": step, "seconds": seconds, "settings": stage.model_dump(), "bank": bank.recipe, "bank_pairs": len(bank),
        "device_name": common.device_name(dev), "mlflow_run_id": tracker.run_id, "source_model": str(model_dir),
        "unet_parameters": count_parameters(unet), "validation": history[-1],
        "final_mse_mean_last_100": float(np.mean(losses[-100:])) if losses else None})
    bundle.unet = ema.module.eval()
    folder = save_bundle(bundle.eval(), out_dir / "model")
    (out_dir / "losses.json").write_text(json.dumps([round(v, 6) for v in losses]))
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    tracker.log_artifact(folder, "model")
    tracker.end()
    return folder

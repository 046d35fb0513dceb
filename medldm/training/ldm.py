"""Stage 2: train the conditional latent U-Net (and the pixel-space refiner) on a frozen, calibrated VAE.

Each step: degrade clean patches with a freshly drawn operator (physics units), encode truth and naive
inverse, noise-augment the encoded condition (its level enters as a channel), and regress the
scheduler's target. The refiner learns, from the same step's clean-latent estimate decoded to pixels
plus the naive inverse, to restore what the VAE cannot represent (the latent ceiling).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler
from torch.nn.parallel import DistributedDataParallel as DDP

from medldm.config import LDMRunConfig
from medldm.models.builders import apply_refiner, build_refiner, build_scheduler, build_unet, count_parameters
from medldm.models.bundle import ModelBundle, load_bundle, save_bundle
from medldm.models.device import autocast, pick_device
from medldm.models.model_config import ModelConfig, ModelRefinerConfig, TrainingRecord
from medldm.models.latent import LatentCodec, condition_input
from medldm.models.normalisation import Normalisation
from medldm.physics.registry import build_random_operator
from medldm.sampling.samplers import predict_x0, training_target
from medldm.tracking import Tracker
from medldm.training import common
from medldm.training.data import PatchBatches, data_card_ids, step_stream, validation_images


def degrade_batch(x_n: torch.Tensor, random_op, norm: Normalisation, seeds: list[int]) -> tuple[torch.Tensor, list, list]:
    """Simulate measurements in physical units. Returns the normalised naive inverses (on x_n's device) and,
    per patch, the operator and its measurement y (CPU, physical units), for data consistency."""
    conds, ops, ys = [], [], []
    for xi, seed in zip(x_n, seeds):
        x_phys = norm.inverse(xi[None].cpu())
        op = random_op.sample(int(seed), image=x_phys)
        g = torch.Generator().manual_seed(int(seed))
        y = op.forward(x_phys, generator=g)
        conds.append(norm.forward(op.naive_inverse(y)).float())
        ops.append(op)
        ys.append(y)
    return torch.cat(conds).to(x_n.device), ops, ys


def step_rng(seed: int, rank: int, step: int, batch: int) -> np.random.Generator:
    """The step's generator after it drew the batch's degradation seeds: what is left for noise and t."""
    rng = np.random.default_rng([seed, rank, step])
    rng.integers(0, 2**31 - 1, size=batch)
    return rng


class DegradedPairs:
    """(clean patches, normalised naive inverses) of training step ``s``, a pure function of s: patches from
    ``PatchBatches``, one degradation per patch seeded by (seed, rank, s). With ``measurements`` the operators
    and measurements come too: (x, cond, ops, ys). Picklable, for step_stream."""

    def __init__(self, patches: PatchBatches, random_op, norm: Normalisation, seed: int, rank: int = 0,
                 measurements: bool = False):
        self.patches, self.random_op, self.norm, self.seed, self.rank = patches, random_op, norm, seed, rank
        self.measurements = measurements

    def __call__(self, step: int) -> tuple:
        x = self.patches(step)
        rng = np.random.default_rng([self.seed, self.rank, step])
        cond, ops, ys = degrade_batch(x, self.random_op, self.norm, rng.integers(0, 2**31 - 1, size=x.shape[0]).tolist())
        return (x, cond, ops, ys) if self.measurements else (x, cond)


def noised_inputs(scheduler, z0: torch.Tensor, c: torch.Tensor, rng: np.random.Generator, cond_noise_max: float):
    """One training step's U-Net input: the clean target noised at a random timestep, plus the condition
    noise-augmented at a random level, which enters as a channel. Returns (input, z_t, t, noise); the draws
    come from ``rng`` alone, so a resumed run repeats them."""
    dev = z0.device
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
    level = torch.rand(z0.shape[0], generator=g).to(dev) * cond_noise_max
    c_aug = c + level.reshape(-1, *([1] * (c.ndim - 1))) * torch.randn(c.shape, generator=g).to(dev)
    noise = torch.randn(z0.shape, generator=g).to(dev)
    if isinstance(scheduler, RFlowScheduler):
        t = scheduler.sample_timesteps(z0)
    else:
        t = torch.randint(0, scheduler.num_train_timesteps, (z0.shape[0],), generator=g).to(dev)
    z_t = scheduler.add_noise(z0, noise, t)
    return torch.cat([z_t, condition_input(c_aug, level)], 1), z_t, t, noise


def _validation_pairs(cfg: LDMRunConfig, random_op, norm: Normalisation, n: int = 4) -> list[tuple]:
    """Held-out images degraded once with fixed seeds: (truth, naive inverse), normalised."""
    images = validation_images(cfg.data, max_images=n)
    return [(x, degrade_batch(x, random_op, norm, [1000 + i])[0]) for i, x in enumerate(images)]


@torch.no_grad()
def _validate(cfg, vae_bundle, unet, refiner, pairs, out_dir: Path, step: int, tracker) -> dict:
    """10-step DDIM restoration of the validation pairs with the EMA weights (no data consistency)."""
    from medldm.sampling.slicewise import restore_slices
    from medldm.training.validate import reconstruction_metrics, save_slice_figure

    config = vae_bundle.config.model_copy(update={"scheduler": cfg.scheduler,
                                                  "refiner": ModelRefinerConfig(**cfg.refiner.model_dump())})
    bundle = ModelBundle(config=config, vae=vae_bundle.vae, unet=unet.eval(), refiner=refiner.eval() if refiner else None)
    preds, refs = [], []
    for truth, cond in pairs:
        out = restore_slices(bundle, cond.cpu(), samples=1, steps=10, seed=0, batch_size=8)
        preds.append(out["output"][0].clamp_min(0))
        refs.append(truth.cpu())
    if refiner is not None:
        refiner.train()
    metrics = reconstruction_metrics(preds, refs)
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
    naive = reconstruction_metrics([c.cpu() for _, c in pairs], refs)
    tracker.log_metrics({f"val/naive_{k}": v for k, v in naive.items()}, step)
    fig = save_slice_figure([refs[0], pairs[0][1], preds[0]], ["truth", "naive inverse", "medldm"],
                            out_dir / "figures" / f"ldm_step{step:06d}.png")
    tracker.log_artifact(fig, "figures")
    return {**metrics, **{f"naive_{k}": v for k, v in naive.items()}}


def train_ldm(cfg: LDMRunConfig, out_dir: str | Path, resume: bool = False, device: str | None = None) -> Path:
    out_dir = Path(out_dir)
    dev = pick_device(device)
    dist_info = common.init_distributed(dev)
    common.seed_everything(cfg.train.seed)
    vae_bundle = load_bundle(cfg.vae_path).to(dev)
    dims = vae_bundle.spatial_dims
    if dims != cfg.data.spatial_dims:
        raise ValueError(f"VAE at {cfg.vae_path} is {dims}D but data.spatial_dims is {cfg.data.spatial_dims}")
    codec = LatentCodec(vae_bundle.vae.eval().requires_grad_(False), vae_bundle.latent_scale)
    lat_ch = vae_bundle.vae_config.latent_channels
    unet = build_unet(cfg.unet, dims, lat_ch).to(dev)
    refiner = build_refiner(cfg.refiner, dims).to(dev) if cfg.refiner.enabled else None
    params = list(unet.parameters()) + (list(refiner.parameters()) if refiner is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = common.make_ema(unet, cfg.train.ema_decay)
    scheduler = build_scheduler(cfg.scheduler, spatial_dims=dims)
    norm = Normalisation.for_modality(cfg.data.modality)
    train_norm = norm if norm.kind == "window" else Normalisation(kind="percentile", scale=1.0)
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)

    ckpt_path = out_dir / "checkpoint.pt"
    step, run_id, seconds_before = 0, None, 0.0  # seconds spent by earlier legs of a resumed run
    if resume and ckpt_path.is_file():
        ck = common.load_checkpoint(ckpt_path)
        unet.load_state_dict(ck["unet"]); ema.load_state_dict(ck["ema"]); opt.load_state_dict(ck["opt"])
        if refiner is not None:
            refiner.load_state_dict(ck["refiner"])
        step, run_id, seconds_before = ck["step"], ck.get("run_id"), ck.get("seconds", 0.0)
        common.set_rng_state(ck["rng"])
    unet_t = DDP(unet) if dist_info.enabled else unet
    refiner_t = DDP(refiner) if (dist_info.enabled and refiner is not None) else refiner

    tracker = Tracker(cfg.tracking.enabled and dist_info.is_main, cfg.tracking.experiment, cfg.tracking.tracking_uri)
    tracker.start(f"ldm-{cfg.name}", params=cfg.model_dump(), run_id=run_id,
                  tags={"medldm.stage": "ldm", "medldm.task": cfg.degradation.task, "medldm.modality": cfg.data.modality,
                        "medldm.data_cards": data_card_ids(cfg.data.datalist, cfg.data.modality)})
    tracker.log_dict(cfg.model_dump(), "config.json")
    pairs = step_stream(DegradedPairs(PatchBatches(cfg.data, seed=cfg.train.seed + 1000 * dist_info.rank), random_op,
                                      train_norm, cfg.train.seed, dist_info.rank), step, cfg.data.num_workers)
    progress = common.Progress(cfg.train.steps, step, f"ldm {cfg.name}", dist_info.is_main)
    t_start, history = time.time(), []
    # 3D models: no sampling-based validation yet (the Reconstructor samples 2D models only)
    val = _validation_pairs(cfg, random_op, train_norm) if dist_info.is_main and dims == 2 else []
    while step < cfg.train.steps:
        x, cond = (t.to(dev) for t in next(pairs))
        rng = step_rng(cfg.train.seed, dist_info.rank, step, x.shape[0])
        z0 = codec.encode(x)
        inp, z_t, t, noise = noised_inputs(scheduler, z0, codec.encode(cond), rng, cfg.train.cond_noise_max)
        unet_t.train()
        with autocast(dev, cfg.train.amp):
            out = unet_t(inp, t).float()
            loss_diff = F.mse_loss(out, training_target(scheduler, z0, noise, t))
            loss = loss_diff
            if refiner_t is not None:
                decoded = codec.decode(predict_x0(scheduler, z_t, t, out.detach())).float()
                refined = apply_refiner(lambda inp: refiner_t(inp).float(), cfg.refiner.residual_on, decoded, cond)
                loss_ref = F.l1_loss(refined, x)
                loss = loss + cfg.train.refiner_weight * loss_ref
        common.optimizer_step(opt, loss, params, cfg.train.grad_clip)
        ema.update_parameters(unet)
        step += 1
        logs = {"loss": loss.item(), "diff": loss_diff.item()}
        if refiner_t is not None:
            logs["refiner_l1"] = loss_ref.item()
        progress.update(**logs)
        if step % cfg.train.log_every == 0:
            tracker.log_metrics({f"train/{k}": v for k, v in logs.items()}, step)
        if dist_info.is_main and val and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
            history.append({"step": step, **_validate(cfg, vae_bundle, ema.module, refiner, val, out_dir, step, tracker)})
        # a time budget ends the run like the last step does: with a checkpoint, so --resume loses nothing
        out_of_time = common.any_rank(bool(cfg.train.max_minutes) and (time.time() - t_start) > 60 * cfg.train.max_minutes,
                                      dist_info)
        if dist_info.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or out_of_time):
            state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "run_id": tracker.run_id, "rng": common.rng_state(),
                     "seconds": seconds_before + time.time() - t_start}
            if refiner is not None:
                state["refiner"] = refiner.state_dict()
            common.save_checkpoint(ckpt_path, state)
        if out_of_time:
            break
    progress.close()
    agree = common.ranks_agree(unet, dist_info)

    folder = out_dir / "model"
    if dist_info.is_main:
        vae_config = vae_bundle.config
        config = ModelConfig(
            vae=vae_config.vae, latent_scale=vae_config.latent_scale, normalisation=vae_config.normalisation,
            patch_size=vae_config.patch_size,
            name=cfg.name, kind="ldm", task=cfg.degradation.task, modality=cfg.data.modality,
            spatial_dims=dims, slice_axis=cfg.data.slice_axis, unet=cfg.unet, scheduler=cfg.scheduler,
            refiner=ModelRefinerConfig(**cfg.refiner.model_dump()), degradation=cfg.degradation,
            cond_noise_max=cfg.train.cond_noise_max)
        record = TrainingRecord(
            metrics=dict(vae_bundle.record.metrics),
            training={"steps": step, "seconds": round(seconds_before + time.time() - t_start, 1), "device": str(dev),
                         "device_name": common.device_name(dev),
                         "unet_parameters": count_parameters(unet),
                         "refiner_parameters": count_parameters(refiner) if refiner is not None else 0,
                         "world_size": dist_info.world_size, "mlflow_run_id": tracker.run_id,
                         "ranks_identical": agree, "vae_training": vae_bundle.record.training})
        bundle = ModelBundle(config=config, record=record, vae=vae_bundle.vae, unet=ema.module, refiner=refiner)
        save_bundle(bundle, folder)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        tracker.log_artifact(folder, "model")
        tracker.end()
    common.cleanup_distributed()
    return folder

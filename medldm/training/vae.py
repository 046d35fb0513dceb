"""Stage 1: train the AutoencoderKL, then calibrate its latent scale, then save it as a model bundle."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss, SSIMLoss
from monai.networks.nets import PatchDiscriminator
from torch.nn.parallel import DistributedDataParallel as DDP

from medldm.config import VAERunConfig
from medldm.models.builders import build_vae, count_parameters
from medldm.models.bundle import ModelBundle, save_bundle
from medldm.models.device import autocast, pick_device
from medldm.models.model_config import ModelConfig, TrainingRecord
from medldm.models.normalisation import Normalisation
from medldm.tracking import Tracker
from medldm.training import common
from medldm.training.data import data_card_ids, train_batches, validation_images
from medldm.training.validate import reconstruction_metrics, save_slice_figure


def build_perceptual_loss(weights_path: str, spatial_dims: int):
    """MONAI PerceptualLoss on a torchvision ResNet-50 loaded from a local file (fake 3D in 3D)."""
    from medldm.errors import ConfigError

    if not Path(weights_path).is_file():
        raise ConfigError(f"train.perceptual_weights_path: {weights_path} not found")
    try:
        from monai.losses import PerceptualLoss

        return PerceptualLoss(spatial_dims=spatial_dims, network_type="resnet50", pretrained=True,
                              pretrained_path=weights_path, is_fake_3d=spatial_dims == 3).eval()
    except ImportError as err:
        raise ConfigError(f"the perceptual loss needs torchvision matching your torch ({err})") from None


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    dims = list(range(1, mu.ndim))
    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


@torch.no_grad()
def calibrate_latent_scale(vae: torch.nn.Module, batches, n_batches: int, device) -> float:
    """1/std of the encoder means over training data: the explicit calibration step, run once."""
    values = []
    for _, batch in zip(range(n_batches), batches):
        mu, _ = vae.encode(batch.to(device))
        values.append(mu.flatten().cpu())
    return float(1.0 / torch.cat(values).std().clamp_min(1e-6))


def train_vae(cfg: VAERunConfig, out_dir: str | Path, resume: bool = False, device: str | None = None) -> Path:
    out_dir = Path(out_dir)
    dev = pick_device(device)
    dist_info = common.init_distributed(dev)
    common.seed_everything(cfg.train.seed)
    dims = cfg.data.spatial_dims
    vae = build_vae(cfg.vae, dims).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    use_adv = cfg.train.adv_weight > 0
    disc = PatchDiscriminator(spatial_dims=dims, channels=32, in_channels=1, out_channels=1, num_layers_d=3).to(dev) if use_adv else None
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.lr) if use_adv else None
    adv_loss = PatchAdversarialLoss(criterion="least_squares") if use_adv else None
    ssim_loss = SSIMLoss(spatial_dims=dims, data_range=1.0) if cfg.train.ssim_weight > 0 else None
    perceptual = build_perceptual_loss(cfg.train.perceptual_weights_path, dims).to(dev) if cfg.train.perceptual_weight > 0 else None

    ckpt_path = out_dir / "checkpoint.pt"
    step, run_id, seconds_before = 0, None, 0.0  # seconds spent by earlier legs of a resumed run
    if resume and ckpt_path.is_file():
        ck = common.load_checkpoint(ckpt_path)
        vae.load_state_dict(ck["vae"]); opt.load_state_dict(ck["opt"])
        if use_adv:
            disc.load_state_dict(ck["disc"]); opt_d.load_state_dict(ck["opt_d"])
        step, run_id, seconds_before = ck["step"], ck.get("run_id"), ck.get("seconds", 0.0)
        common.set_rng_state(ck["rng"])
    model = DDP(vae) if dist_info.enabled else vae
    if use_adv and dist_info.enabled:
        disc = DDP(disc)

    tracker = Tracker(cfg.tracking.enabled and dist_info.is_main, cfg.tracking.experiment, cfg.tracking.tracking_uri)
    tracker.start(f"vae-{cfg.name}", params=cfg.model_dump(), run_id=run_id,
                  tags={"medldm.stage": "vae", "medldm.modality": cfg.data.modality,
                        "medldm.data_cards": data_card_ids(cfg.data.datalist, cfg.data.modality)})
    tracker.log_dict(cfg.model_dump(), "config.json")
    batches = train_batches(cfg.data, seed=cfg.train.seed + 1000 * dist_info.rank, start_step=step)
    val = validation_images(cfg.data) if dist_info.is_main else []
    progress = common.Progress(cfg.train.steps, step, f"vae {cfg.name}", dist_info.is_main)
    t_start = time.time()
    history = []
    while step < cfg.train.steps:
        x = next(batches).to(dev)
        model.train()
        with autocast(dev, cfg.train.amp):
            recon, mu, sigma = model(x)
            l1 = F.l1_loss(recon.float(), x)
            loss = l1 + cfg.train.kl_weight * kl_loss(mu.float(), sigma.float())
            if ssim_loss is not None:
                loss = loss + cfg.train.ssim_weight * ssim_loss(recon.float().clamp(0, 1.5), x)
            if perceptual is not None:
                loss = loss + cfg.train.perceptual_weight * perceptual(recon.float(), x)
            adv_on = use_adv and step >= cfg.train.adv_start
            if adv_on:
                loss = loss + cfg.train.adv_weight * adv_loss(disc(recon.float())[-1], target_is_real=True, for_discriminator=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if adv_on:
            d_loss = 0.5 * (adv_loss(disc(recon.detach().float())[-1], target_is_real=False, for_discriminator=True)
                            + adv_loss(disc(x)[-1], target_is_real=True, for_discriminator=True))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
        progress.update(loss=loss.item(), l1=l1.item())
        if step % cfg.train.log_every == 0:
            tracker.log_metrics({"train/loss": loss.item(), "train/l1": l1.item()}, step)
        if dist_info.is_main and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
            metrics = _validate(common.unwrap(model), val, dev, out_dir, step, tracker)
            history.append({"step": step, **metrics})
        # a time budget ends the run like the last step does: with a checkpoint, so --resume loses nothing
        out_of_time = common.any_rank(bool(cfg.train.max_minutes) and (time.time() - t_start) > 60 * cfg.train.max_minutes,
                                      dist_info)
        if dist_info.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or out_of_time):
            state = {"vae": common.unwrap(model).state_dict(), "opt": opt.state_dict(), "step": step,
                     "run_id": tracker.run_id, "rng": common.rng_state(),
                     "seconds": seconds_before + time.time() - t_start}
            if use_adv:
                state.update(disc=common.unwrap(disc).state_dict(), opt_d=opt_d.state_dict())
            common.save_checkpoint(ckpt_path, state)
        if out_of_time:
            break
    progress.close()
    agree = common.ranks_agree(model, dist_info)

    folder = out_dir / "model"
    if dist_info.is_main:
        vae_net = common.unwrap(model).eval()
        scale = calibrate_latent_scale(vae_net, train_batches(cfg.data, seed=12345), cfg.calibration_batches, dev)
        final = history[-1] if history else _validate(vae_net, val, dev, out_dir, step, tracker)
        config = ModelConfig(
            name=cfg.name, kind="vae", modality=cfg.data.modality, spatial_dims=dims, patch_size=cfg.data.patch_size,
            vae=cfg.vae, latent_scale=scale, normalisation=Normalisation.for_modality(cfg.data.modality).to_dict(),
            slice_axis=cfg.data.slice_axis)
        record = TrainingRecord(
            metrics={f"vae_{k}": v for k, v in final.items() if k != "step"},
            training={"steps": step, "seconds": round(seconds_before + time.time() - t_start, 1), "device": str(dev),
                         "device_name": common.device_name(dev),
                         "parameters": count_parameters(vae_net), "world_size": dist_info.world_size,
                         "ranks_identical": agree,
                         "mlflow_run_id": tracker.run_id})
        save_bundle(ModelBundle(config=config, record=record, vae=vae_net), folder)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        tracker.log_metrics({"latent_scale": scale}, step)
        tracker.log_artifact(folder, "model")
        tracker.end()
    common.cleanup_distributed()
    return folder


@torch.no_grad()
def _validate(vae, val_images, device, out_dir: Path, step: int, tracker: Tracker) -> dict:
    vae.eval()
    preds, refs = [], []
    for x in val_images:
        x = x.to(device)
        mu, _ = vae.encode(x)
        preds.append(vae.decode(mu).float().cpu())
        refs.append(x.cpu())
    metrics = reconstruction_metrics(preds, refs)
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
    fig_path = save_slice_figure([refs[0], preds[0]], ["truth", "VAE"], out_dir / "figures" / f"vae_step{step:06d}.png")
    tracker.log_artifact(fig_path, "figures")
    return metrics

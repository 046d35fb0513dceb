"""Stage 3: retrain the pixel refiner on the decoded estimates the sampler really produces.

Stage 2 trains the refiner beside the U-Net on the one-step clean-latent estimate at a uniformly random
timestep. At small t that estimate is almost the VAE's reconstruction of the truth: a shortcut the
refiner learns to copy, and that never exists at inference, where the decoded estimate is a full DDIM
sample (12-25 dB on the validation cases). The stage-2 refiner without DC then scored below the naive
inverse it starts from (mr-recon MNI 4x: 21.1 vs 24.3 dB).

Here the VAE and U-Net are frozen; each step degrades fresh patches (the stage-2 patch stream and
physics), samples them exactly as ``restore_slices`` does at inference (``sample_steps`` DDIM steps from
fresh noise) and trains the refiner (fresh, ``init: identity``, or the model's own) on (decoded, guide) -> truth,
the guide being the naive inverse, TV-POCS started from it, its non-local means or a stack of these
(``guide``: "naive+tv-pocs" gives the refiner both images, the correction added to the first).
With ``loss_after_dc`` (recon, SR) the loss is taken after the hard data consistency inference ends with,
back-propagated through the operator's projection.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from monai.losses import SSIMLoss

from medldm.config import DataConfig, LDMRunConfig
from medldm.models.builders import apply_refiner, build_refiner, widen_refiner_input
from medldm.errors import ConfigError, ModelError
from medldm.models.bundle import load_bundle, save_bundle
from medldm.models.model_config import ModelConfig
from medldm.models.device import autocast, pick_device
from medldm.models.normalisation import Normalisation
from medldm.physics.classical import guide_image, guide_parts, guide_refusal
from medldm.physics.registry import DC_TASKS, build_random_operator
from medldm.sampling.slicewise import restore_slices
from medldm.tracking import Tracker
from medldm.training import common
from medldm.training.data import PatchBatches, step_stream
from medldm.training.ldm import DegradedPairs


def consistent(x_n: torch.Tensor, ops: list, ys: list, norm: Normalisation) -> torch.Tensor:
    """Each patch projected onto its own measurement, in normalised units; differentiable. Patches whose
    operators project identically (``Operator.dc_group``: CT of one geometry) share one call. It runs where
    x_n is (the operators are device-agnostic): on a GPU, on the GPU (README, Results: 3.1x for mr-recon's
    stage on an H100)."""
    groups: dict = {}
    for i, op in enumerate(ops):
        key = op.dc_group()
        groups.setdefault(("item", i) if key is None else key, []).append(i)
    out: list = [None] * len(ops)
    for idx in groups.values():
        y = torch.cat([ys[i] for i in idx]).to(x_n.device)
        done = norm.forward(ops[idx[0]].data_consistency(norm.inverse(x_n[idx].float()), y))
        for j, i in enumerate(idx):
            out[i] = done[j:j + 1]
    return torch.cat(out)


def projection(ops: list, ys: list, norm: Normalisation):
    """x_n -> ``consistent(x_n, ops, ys, norm)``: the batch's projection, for the guide and for the cascade."""
    return partial(consistent, ops=ops, ys=ys, norm=norm)


class GuidedPairs:
    """``DegradedPairs`` (with measurements) of step s plus the stage's guide: (x, cond, ops, ys, guide).
    The guide is made where the pair is, so with ``refiner_stage.num_workers`` TV-POCS and NLM (numpy, one
    core each, as long as the rest of a step on 2 cores) run in worker processes. Picklable, for step_stream."""

    def __init__(self, pairs: DegradedPairs, guide: str, norm: Normalisation):
        self.pairs, self.guide, self.norm = pairs, guide, norm

    def __call__(self, step: int) -> tuple:
        x, cond, ops, ys = self.pairs(step)
        # scale 1: the patches are normalised as inference normalises a volume
        guide = guide_image(self.guide, cond, image_axes=(2, 3), project=projection(ops, ys, self.norm),
                            scale=1.0, sigma=[float(getattr(op, "sigma", 0.0)) for op in ops])
        return x, cond, ops, ys, guide


def flow_start_image(kind: str, made: list[str], images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor | None:
    """The image a flow model starts from (None for a model sampled from noise): the naive inverse or one of the
    classical images ``made`` (their channels in ``images``)."""
    if kind == "noise":
        return None
    return cond if kind == "naive" else images[:, made.index(kind):made.index(kind) + 1]


def stage_data(cfg: LDMRunConfig) -> DataConfig:
    """The data of the refiner stage: the run's, with the stage's patch size, augmentation and workers."""
    stage = cfg.refiner_stage
    return DataConfig.model_validate({**cfg.data.model_dump(), "augment": stage.augment,
                                      **({"patch_size": list(stage.patch_size)} if stage.patch_size else {}),
                                      **({"num_workers": stage.num_workers} if stage.num_workers is not None else {})})


# the only stage settings a resumed leg may change: neither moves its loss, its data or its batches (a setting
# added later is held fixed without being listed; a changed lr would be overridden by the optimizer state anyway)
MAY_CHANGE_ON_RESUME = ("max_minutes", "num_workers")


def _staged_config(config: ModelConfig, stage) -> ModelConfig:
    """The model's configuration with the stage's guide, cascades and (if set) latent_fit_on, validated whole."""
    norm = config.normalisation.model_dump()
    if stage.latent_fit_on is not None:
        norm["latent_fit_on"] = stage.latent_fit_on
    refiner = {**config.refiner.model_dump(), "guide": stage.guide, "cascades": stage.cascades}
    try:
        return ModelConfig.model_validate({**config.model_dump(), "normalisation": norm, "refiner": refiner})
    except ValidationError as err:
        raise ConfigError(f"refiner_stage of {config.name}: {err.errors()[0]['msg']}") from None


def train_refiner(cfg: LDMRunConfig, model_dir: str | Path, out_dir: str | Path, *, max_steps: int | None = None,
                  resume: bool = False, device: str | None = None) -> Path:
    """Retrain (``init: identity``) or fine-tune (``init: model``) the refiner of the model folder
    ``model_dir`` for ``cfg.refiner_stage.max_minutes`` of wall clock (or ``max_steps``); save the model with
    the new refiner to ``out_dir``/model. ``cfg`` is the model's own LDM config: data, degradation, seed and
    the stage's settings."""
    out_dir = Path(out_dir)
    stage = cfg.refiner_stage
    minutes, sample_steps, lr = stage.max_minutes, stage.sample_steps, stage.lr
    dev = pick_device(device)
    common.seed_everything(cfg.train.seed)
    bundle = load_bundle(model_dir).to(dev)
    if bundle.refiner is None or bundle.unet is None:
        raise ModelError(f"{model_dir}: a refiner stage needs a latent diffusion model with a refiner")
    if bundle.spatial_dims != 2:
        raise ModelError("the refiner stage samples slice-wise: 2D models only")
    bundle.vae.requires_grad_(False)
    bundle.unet.requires_grad_(False)
    norm = Normalisation.for_modality(cfg.data.modality)
    train_norm = norm if norm.kind == "window" else Normalisation(kind="percentile", scale=1.0)
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    # a stream of its own (seed + 2000): the refiner sees patches and degradations stage 2 did not
    data = stage_data(cfg)
    through_dc = stage.loss_after_dc and cfg.degradation.task in DC_TASKS
    if stage.cascades > 1 and not through_dc:
        raise ConfigError(f"refiner_stage.cascades > 1 needs loss_after_dc and a task that ends with data "
                          f"consistency ({', '.join(DC_TASKS)}); {cfg.name} is {cfg.degradation.task}")
    why = guide_refusal(stage.guide, cfg.degradation.task, cfg.data.modality)
    if why:
        raise ConfigError(f"refiner_stage.guide of {cfg.name}: {why}")
    staged_config = _staged_config(bundle.config, stage)  # refused now, not after the stage's minutes
    parts, before = guide_parts(stage.guide), guide_parts(bundle.refiner_guide)
    # a flow model starts from a guide's latent: the stage makes that image beside the refiner's (once)
    made = parts + [k for k in (bundle.flow_start,) if k not in ("noise", "naive", *parts)]
    if stage.init == "identity":
        bundle.refiner = build_refiner(bundle.config.refiner,
                                       bundle.spatial_dims, len(parts)).to(dev)
    elif len(parts) != len(before):
        # a warm start given more guide images than it saw ignores the added ones until training weighs them in,
        # starting as the refiner it continues only if the images it saw keep their channels
        if parts[:len(before)] != before:
            raise ConfigError(f"refiner_stage.guide {stage.guide!r} with init: model: the refiner saw "
                              f"{bundle.refiner_guide!r}, and a wider guide must begin with it")
        widen_refiner_input(bundle.refiner, len(parts))
    refiner = bundle.refiner.train()
    # skimage's SSIM as the evaluation computes it (7-pixel uniform window), on the patches' normalised range
    ssim_loss = (SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=7)
                 if stage.ssim_weight > 0 else None)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    ckpt_path = out_dir / "checkpoint.pt"
    step, seconds_before, run_id, losses, ssim_terms = 0, 0.0, None, [], []
    if resume and ckpt_path.is_file():
        ck = common.load_checkpoint(ckpt_path)
        saved = ck.get("settings") or {}
        now = stage.model_dump()
        changed = [f"{k} {v!r} -> {now.get(k)!r}" for k, v in saved.items()
                   if k not in MAY_CHANGE_ON_RESUME and v != now.get(k)]
        if changed:
            raise ConfigError(f"{ckpt_path}: resuming with other refiner_stage settings ({'; '.join(changed)}); "
                              "start a new --out with init: model to continue under them")
        refiner.load_state_dict(ck["refiner"]); opt.load_state_dict(ck["opt"])
        step, seconds_before, run_id = ck["step"], ck["seconds"], ck.get("run_id")
        common.set_rng_state(ck["rng"])
        losses = ck.get("losses", [])
    pairs = step_stream(GuidedPairs(DegradedPairs(PatchBatches(data, seed=cfg.train.seed + 2000), random_op, train_norm,
                                                  cfg.train.seed + 2000, measurements=True), "+".join(made), train_norm),
                        step + stage.stream_offset, data.num_workers)
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.experiment, cfg.tracking.tracking_uri)
    tracker.start(f"refiner-{cfg.name}", run_id=run_id,
                  params={**stage.model_dump(), "model": str(model_dir), "patch_size": data.patch_size,
                          "batch_size": data.batch_size, "augment": data.augment, "loss_after_dc": through_dc},
                  tags={"medldm.stage": "refiner", "medldm.task": cfg.degradation.task})
    progress = common.Progress(max_steps, step, f"refiner {cfg.name} ({minutes:g} min)", True)
    t0 = time.time()
    total = 10**9 if max_steps is None else max_steps
    while step < total and seconds_before + time.time() - t0 < 60 * minutes:
        x, cond, ops, ys, images = next(pairs)
        x, cond, images, ys = x.to(dev), cond.to(dev), images.to(dev), [y.to(dev) for y in ys]
        guide, start = images[:, :len(parts)], flow_start_image(bundle.flow_start, made, images, cond)
        with torch.no_grad():  # the estimate exactly as inference makes it, from this step's own noise
            decoded = restore_slices(bundle, cond, samples=1, steps=sample_steps,
                                     seed=cfg.train.seed + stage.stream_offset + step, batch_size=cond.shape[0],
                                     refine=False, start=start)["decoded"][0].to(dev)
        project = projection(ops, ys, train_norm)
        with autocast(dev, cfg.train.amp):
            refined = apply_refiner(lambda inp: refiner(inp).float(), bundle.refiner_residual_on, decoded, guide,
                                    stage.cascades, project)
        if through_dc:
            refined = project(refined)
        l1 = F.l1_loss(refined, x)
        term = None if ssim_loss is None else stage.ssim_weight * ssim_loss(refined, x)
        common.optimizer_step(opt, l1 if term is None else l1 + term, refiner.parameters(), cfg.train.grad_clip)
        step += 1
        losses.append(l1.item())  # L1 alone, comparable across legs whatever their SSIM weight
        shown = {"l1": losses[-1]}
        if term is not None:
            ssim_terms.append(term.item())
            shown["ssim_term"] = ssim_terms[-1]
        progress.update(**shown)
        if step % cfg.train.log_every == 0:
            window = {"l1": losses[-cfg.train.log_every:], "ssim_term": ssim_terms[-cfg.train.log_every:]}
            tracker.log_metrics({f"train/refiner_{k}": float(np.mean(v)) for k, v in window.items() if v}, step)
        if step % cfg.train.ckpt_every == 0:
            _checkpoint(ckpt_path, refiner, opt, step, seconds_before + time.time() - t0, tracker.run_id, losses,
                        stage.model_dump())
    progress.close()
    seconds = round(seconds_before + time.time() - t0, 1)
    _checkpoint(ckpt_path, refiner, opt, step, seconds, tracker.run_id, losses, stage.model_dump())
    # a warm start keeps the record of the stage it continued (its steps count towards the refiner's training)
    if stage.init == "identity":  # a new refiner: the legs of the one it replaces no longer describe it
        bundle.record.legs = [leg for leg in bundle.record.legs if leg.get("stage") != "refiner"]
    bundle.config = staged_config
    bundle.record.legs.append({
        "stage": "refiner", "steps": step, "seconds": seconds, "sample_steps": sample_steps, "lr": lr, "minutes_budget": minutes,
        "patch_size": list(data.patch_size), "batch_size": data.batch_size, "augment": data.augment, "init": stage.init,
        "num_workers": data.num_workers,
        "loss_after_dc": through_dc, "cascades": stage.cascades, "guide": stage.guide, "settings": stage.model_dump(),
        "device_name": common.device_name(dev), "mlflow_run_id": tracker.run_id, "source_model": str(model_dir),
        "source_unet_steps": bundle.record.training.get("steps"),
        "final_l1_mean_last_50": float(np.mean(losses[-50:])) if losses else None})
    folder = out_dir / "model"
    save_bundle(bundle.eval(), folder)
    (out_dir / "losses.json").write_text(json.dumps([round(v, 6) for v in losses]))
    tracker.log_artifact(folder, "model")
    tracker.end()
    return folder


def _checkpoint(path: Path, refiner, opt, step: int, seconds: float, run_id, losses: list[float],
                settings: dict) -> None:
    common.save_checkpoint(path, {"refiner": refiner.state_dict(), "opt": opt.state_dict(), "step": step,
                                  "seconds": seconds, "run_id": run_id, "rng": common.rng_state(), "losses": losses,
                                  "settings": settings})

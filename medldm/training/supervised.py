"""The supervised baseline every shipped model is compared with: a MONAI BasicUNet that regresses the truth
from the naive inverse (residual: output = naive + U-Net(naive)), L1 loss, trained on the same data,
degradations and patch stream as the latent diffusion model of the same config, for a wall-clock budget.

It is what the fastMRI U-Net baseline is for k-space: no generative prior, no sampling, no data
consistency. Saved as ``model.json`` (config, normalisation, training record) + ``unet.safetensors``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from safetensors.torch import load_file, save_file

from medldm.config import DataConfig, LDMRunConfig
from medldm.errors import ModelError
from medldm.models.builders import count_parameters
from medldm.models.normalisation import Normalisation
from medldm.physics.registry import build_random_operator
from medldm.sampling.measurement import Measurement
from medldm.sampling.slicewise import pad_to_multiple
from medldm.training import common
from medldm.training.data import PatchBatches, step_stream
from medldm.training.ldm import DegradedPairs

# The refiner's size: the supervised row then shows what the diffusion prior adds over a plain U-Net of the
# same capacity (MONAI's default (32, 32, 64, 128, 256, 32) takes ~4x longer per step on 2 CPU cores).
FEATURES = (16, 32, 64, 128, 128, 16)
SUPERVISED_DIR = Path(__file__).resolve().parents[1] / "shipped" / "supervised"  # <model name>/ per shipped model


def build_supervised_unet(features=FEATURES, spatial_dims: int = 2) -> BasicUNet:
    net = BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, features=tuple(features))
    # Zero last layer: training starts from the naive inverse (identity), as the refiner does. From a random
    # residual, a few hundred CPU steps left the CT baselines below FBP (24.1 vs 25.7 dB on ct-denoise).
    torch.nn.init.zeros_(net.final_conv.weight)
    torch.nn.init.zeros_(net.final_conv.bias)
    return net


def train_supervised(cfg: LDMRunConfig, out_dir: str | Path, minutes: float, max_steps: int | None = None,
                     features=FEATURES, device: str | None = None, data: DataConfig | None = None) -> Path:
    """Train for ``minutes`` of wall clock (or ``max_steps``) and save the model folder ``out_dir``.
    ``data``: the patches to train on (default ``cfg.data``; the pipeline passes the refiner stage's)."""
    out_dir = Path(out_dir)
    data = data or cfg.data
    if cfg.data.spatial_dims != 2:
        raise ModelError("the supervised baseline is 2D (slice-wise), like the shipped models")
    dev = common.pick_device(device)
    common.seed_everything(cfg.train.seed)
    net = build_supervised_unet(features).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    norm = Normalisation.for_modality(cfg.data.modality)
    train_norm = norm if norm.kind == "window" else Normalisation(kind="percentile", scale=1.0)
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    pairs = step_stream(DegradedPairs(PatchBatches(data, seed=cfg.train.seed), random_op, train_norm, cfg.train.seed),
                        0, data.num_workers)  # the LDM's patches and degradations, step for step (for cfg.data)
    total = 10**9 if max_steps is None else max_steps  # the wall-clock budget is what ends a normal run
    progress = common.Progress(max_steps, 0, f"supervised {cfg.name} ({minutes:g} min)", True)
    t0, step, losses = time.time(), 0, []
    while step < total and time.time() - t0 < 60 * minutes:
        x, cond = (t.to(dev) for t in next(pairs))
        with common.autocast(dev, cfg.train.amp):
            loss = F.l1_loss(cond + net(cond).float(), x)
        common.optimizer_step(opt, loss, net.parameters(), cfg.train.grad_clip)
        step += 1
        losses.append(loss.item())
        progress.update(l1=losses[-1])
    progress.close()
    meta = {"name": f"{cfg.name}-supervised-unet", "kind": "supervised", "task": cfg.degradation.task,
            "modality": cfg.data.modality, "slice_axis": cfg.data.slice_axis, "features": list(features),
            "normalisation": norm.to_dict(), "degradation": cfg.degradation.model_dump(),
            "training": {"steps": step, "seconds": round(time.time() - t0, 1), "minutes_budget": minutes,
                         "device": str(dev), "device_name": common.device_name(dev), "parameters": count_parameters(net),
                         "final_l1_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
                         "patch_size": list(data.patch_size), "augment": data.augment}}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().half().contiguous() for k, v in net.state_dict().items()},
              str(out_dir / "unet.safetensors"))
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


def load_supervised(folder: str | Path, device: str | None = None) -> tuple[BasicUNet, dict]:
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise ModelError(f"{folder}: no supervised baseline here (model.json missing)")
    meta = json.loads((folder / "model.json").read_text())
    net = build_supervised_unet(meta["features"])
    state = {k: v.float() for k, v in load_file(str(folder / "unet.safetensors")).items()}
    net.load_state_dict(state)
    return net.to(common.pick_device(device)).eval(), meta  # the device the Reconstructor picks, for fair seconds


@torch.no_grad()
def apply_supervised(net: BasicUNet, meta: dict, m: Measurement, batch_size: int = 16) -> np.ndarray:
    """(X, Y, Z) in physical units: the U-Net applied slice-wise to the measurement's naive inverse."""
    naive = m.naive_inverse().float()[0, 0]
    norm = Normalisation.from_dict(meta["normalisation"]).fit(naive)
    axis = int(meta.get("slice_axis", 2))
    slices = norm.forward(naive).movedim(axis, 0)[:, None]
    padded, (h, w) = pad_to_multiple(slices)
    dev = next(net.parameters()).device
    outs = []
    for a in range(0, padded.shape[0], batch_size):
        c = padded[a:a + batch_size].to(dev)
        outs.append((c + net(c)).cpu()[..., :h, :w])
    out = torch.cat(outs)[:, 0].movedim(0, axis)
    return norm.inverse(out).numpy()

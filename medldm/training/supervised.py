"""The supervised baseline every shipped model is compared with: a MONAI BasicUNet that regresses the truth
from the naive inverse (residual: output = naive + U-Net(naive)), L1 loss, trained on the same data,
degradations and patch stream as the latent diffusion model of the same config, for a wall-clock budget.

It is what the fastMRI U-Net baseline is for k-space: no generative prior, no sampling, no data
consistency. Saved as ``model.json`` (config, normalisation, training record) + ``unet.safetensors``; the
network, loading and inference live in ``medldm.evaluation.supervised``, where the baseline is used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medldm.config import DataConfig, LDMRunConfig
from medldm.errors import ModelError
from medldm.evaluation.supervised import FEATURES, build_supervised_unet
from medldm.models.builders import count_parameters
from medldm.models.device import autocast, pick_device
from medldm.models.normalisation import Normalisation
from medldm.physics.registry import build_random_operator
from medldm.training import common
from medldm.training.data import PatchBatches, step_stream
from medldm.training.ldm import DegradedPairs


def train_supervised(cfg: LDMRunConfig, out_dir: str | Path, minutes: float, max_steps: int | None = None,
                     features=FEATURES, device: str | None = None, data: DataConfig | None = None) -> Path:
    """Train for ``minutes`` of wall clock (or ``max_steps``) and save the model folder ``out_dir``.
    ``data``: the patches to train on (default ``cfg.data``; the pipeline passes the refiner stage's)."""
    out_dir = Path(out_dir)
    data = data or cfg.data
    if cfg.data.spatial_dims != 2:
        raise ModelError("the supervised baseline is 2D (slice-wise), like the shipped models")
    dev = pick_device(device)
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
        with autocast(dev, cfg.train.amp):
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

"""The supervised U-Net baseline as the evaluation uses it: the network, loading a trained folder, and applying it
slice-wise to a measurement's naive inverse. Training it is ``medldm.training.supervised``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import BasicUNet
from safetensors.torch import load_file

from medldm.errors import ModelError
from medldm.models.device import pick_device
from medldm.models.normalisation import Normalisation
from medldm.sampling.measurement import Measurement
from medldm.sampling.slicewise import pad_to_multiple

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


def load_supervised(folder: str | Path, device: str | None = None) -> tuple[BasicUNet, dict]:
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise ModelError(f"{folder}: no supervised baseline here (model.json missing)")
    meta = json.loads((folder / "model.json").read_text())
    net = build_supervised_unet(meta["features"])
    state = {k: v.float() for k, v in load_file(str(folder / "unet.safetensors")).items()}
    net.load_state_dict(state)
    return net.to(pick_device(device)).eval(), meta  # the device the Reconstructor picks, for fair seconds


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
    return m.to_input_orientation(norm.inverse(out).numpy())[0]  # as medldm's outputs: the input's orientation

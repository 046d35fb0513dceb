"""3D models on volumes of any size: every network runs through MONAI's SlidingWindowInferer.

The whole latent volume is sampled as one tensor with one global noise draw; only the *denoiser* is
windowed: at each step the U-Net sees overlapping latent windows, blended with Gaussian weights, so the
sampler (a pure function of the denoiser) is unchanged and seams cannot build up across steps. The VAE
encoder/decoder and the refiner run by windows too (the inferer handles the 1/4-scale change), so peak
memory is set by the window, not by the volume.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

from medldm.errors import ModelError
from medldm.models.builders import apply_refiner, build_scheduler
from medldm.models.bundle import ModelBundle
from medldm.sampling.samplers import sample
from medldm.models.latent import condition_input


def _inferer(roi, overlap: float = 0.25, batch: int = 1) -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=overlap, mode="gaussian")


def sliding_denoiser(unet: torch.nn.Module, cond: torch.Tensor, roi, overlap: float = 0.25) -> Callable:
    """A denoiser over the whole latent: the U-Net on (noisy latent, condition) windows, Gaussian-blended."""
    inferer = _inferer(roi, overlap)

    def denoiser(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, cond.expand(z.shape[0], *cond.shape[1:])], 1)
        return inferer(x, lambda w: unet(w, t[:1].expand(w.shape[0])))

    return denoiser


def pad_to(x: torch.Tensor, multiple: int, minimum) -> tuple[torch.Tensor, tuple[int, ...]]:
    size = x.shape[2:]
    pads = []
    for s, m in zip(reversed(size), reversed(minimum)):
        pads += [0, max((-s) % multiple, m - s)]
    return F.pad(x, pads), tuple(size)


def restore_volume(bundle: ModelBundle, cond: torch.Tensor, *, samples: int, steps: int, seed: int, eta: float = 0.0,
                   refine: bool = True, use_diffusion: bool = True, overlap: float = 0.25,
                   progress: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """cond: (1, 1, X, Y, Z) normalised naive inverse. Returns normalised (K, 1, X, Y, Z) ``decoded`` and ``output``."""
    if refine and bundle.refiner is not None and bundle.refiner_cascades > 1:
        raise ModelError("a cascaded refiner (data consistency between passes) is implemented for 2D models only")
    device = next(bundle.vae.parameters()).device
    down = bundle.vae_config.downsample
    patch = list(bundle.config.patch_size)
    latent_roi = [p // down for p in patch]
    scale = bundle.latent_scale
    padded, size = pad_to(cond.to(device), 4 * down, patch)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in size)
    with torch.no_grad():
        c = _inferer(patch, overlap)(padded, lambda w: bundle.vae.encode(w)[0]) * scale
        cin = condition_input(c, torch.zeros(1, device=device))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((samples, *c.shape[1:]), generator=gen).to(device)  # one global draw
        sched_cfg = bundle.config.scheduler
        scheduler = build_scheduler(sched_cfg, "rflow" if sched_cfg.kind == "rflow" else "ddim", spatial_dims=3)
        step_gen = torch.Generator(device=device).manual_seed(seed + 1) if eta > 0 else None
        decode = _inferer(latent_roi, overlap)
        refiner = _inferer(patch, overlap)
        decoded, output = [], []
        for k in range(samples):
            z = c
            if use_diffusion:
                z = sample(sliding_denoiser(bundle.unet, cin, latent_roi, overlap), noise[k:k + 1], scheduler, steps,
                           eta=eta, generator=step_gen, progress=progress)
            x_dec = decode(z / scale, bundle.vae.decode)
            x_out = x_dec
            if refine and bundle.refiner is not None:
                x_out = apply_refiner(lambda inp: refiner(inp, bundle.refiner), bundle.refiner_residual_on, x_dec, padded)
            decoded.append(x_dec[crop].float().cpu())
            output.append(x_out[crop].float().cpu())
    return {"decoded": torch.cat(decoded), "output": torch.cat(output)}

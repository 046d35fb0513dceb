"""Latent samplers as short functions over one denoiser contract.

Denoiser contract: ``denoiser(z_t, t) -> model_output`` where ``t`` is a (B,) tensor of training
timesteps and the output is what the scheduler was trained to predict (epsilon, v or sample for
DDPM-family schedulers; velocity x0 - noise for rectified flow). Conditioning is bound by the caller.

``correct(z0_hat, i) -> z0_corrected`` is an optional hook applied to the predicted clean latent
(data consistency during sampling: decode, project onto the measurements, re-encode). The next state
is shifted by the correction so the trajectory re-noises from the corrected estimate (ReSample/PSLD).
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Corrector = Callable[[torch.Tensor, int], torch.Tensor]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def _alpha_bar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _bcast(scheduler.alphas_cumprod.to(like.device)[t.long()], like)


def training_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to output at (z_t, t) for this scheduler and prediction type."""
    if isinstance(scheduler, RFlowScheduler):
        return z0 - noise
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return z0
    a = _alpha_bar(scheduler, t, z0)
    return a.sqrt() * noise - (1 - a).sqrt() * z0  # v-prediction (Salimans & Ho 2022)


def predict_x0(scheduler, z_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate implied by one network output."""
    if isinstance(scheduler, RFlowScheduler):
        return z_t + out * _bcast(t.float() / scheduler.num_train_timesteps, z_t)
    a = _alpha_bar(scheduler, t, z_t)
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return (z_t - (1 - a).sqrt() * out) / a.sqrt()
    if kind == "sample":
        return out
    return a.sqrt() * z_t - (1 - a).sqrt() * out


def ddim_sample(denoiser: Denoiser, z: torch.Tensor, scheduler: DDIMScheduler, steps: int = 20, eta: float = 0.0,
                generator: torch.Generator | None = None, correct: Corrector | None = None, correct_every: int = 0,
                progress: Callable[[], None] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Alg. 1 with eta); eta=0 is deterministic given the initial noise."""
    scheduler.set_timesteps(steps, device=z.device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        tb = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        out = denoiser(z, tb)
        z_prev, z0 = scheduler.step(out, int(t), z, eta=eta, generator=generator)
        last = i == len(timesteps) - 1
        if correct is not None and correct_every > 0 and ((i + 1) % correct_every == 0 or last):
            z0_c = correct(z0, i)
            t_prev = int(t) - scheduler.num_train_timesteps // scheduler.num_inference_steps
            a_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
            z_prev = z0_c if last else z_prev + float(a_prev) ** 0.5 * (z0_c - z0)
        z = z_prev
        if progress:
            progress()
    return z


def rflow_sample(denoiser: Denoiser, z: torch.Tensor, scheduler: RFlowScheduler, steps: int = 20,
                 correct: Corrector | None = None, correct_every: int = 0,
                 progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE (Liu et al. 2023) from noise (t=T) to data (t=0)."""
    scheduler.set_timesteps(steps, device=z.device, input_img_size_numel=z[0, 0].numel())
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        tb = torch.full((z.shape[0],), float(t), device=z.device)
        out = denoiser(z, tb)
        t_next = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        z_next, z0 = scheduler.step(out, t, z, next_timestep=t_next)
        if correct is not None and correct_every > 0 and ((i + 1) % correct_every == 0 or i == len(timesteps) - 1):
            z0_c = correct(z0, i)
            z_next = z_next + (1 - t_next / scheduler.num_train_timesteps) * (z0_c - z0)
        z = z_next
        if progress:
            progress()
    return z


def sample(denoiser: Denoiser, z: torch.Tensor, scheduler, steps: int = 20, **kw) -> torch.Tensor:
    """Dispatch on the scheduler type: DDPM-trained models are sampled with DDIM."""
    if isinstance(scheduler, RFlowScheduler):
        kw.pop("eta", None)
        kw.pop("generator", None)
        return rflow_sample(denoiser, z, scheduler, steps, **kw)
    if isinstance(scheduler, DDPMScheduler):
        raise TypeError("sample with a DDIMScheduler built from the same config (build_scheduler(cfg, 'ddim'))")
    return ddim_sample(denoiser, z, scheduler, steps, **kw)

"""Run a 2D latent model over a volume: slices along one axis, batched, padded to the network multiple.

The initial noise for the whole volume is drawn once from one generator (shape K x slices x latent),
so the same seed gives the same volume and, at eta 0 (DDIM's step noise is drawn batch after batch), the result
does not depend on the batch size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from medldm.models.bundle import ModelBundle
from medldm.models.builders import apply_refiner, build_scheduler
from medldm.sampling.samplers import sample
from medldm.models.latent import LatentCodec, condition_input
from medldm.models.runtime import Networks, torch_networks

PAD_MULTIPLE = 16


MIN_SIZE = 32  # the refiner's instance norm needs more than one voxel at its coarsest level (1/16)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the last two dims up to a multiple (and at least MIN_SIZE); returns it and the original size."""
    h, w = x.shape[-2:]
    ph, pw = max((-h) % multiple, MIN_SIZE - h), max((-w) % multiple, MIN_SIZE - w)
    return F.pad(x, (0, pw, 0, ph)), (h, w)


def restore_slices(bundle: ModelBundle, cond: torch.Tensor, *, samples: int, steps: int, seed: int,
                   batch_size: int, eta: float = 0.0, refine: bool = True, use_diffusion: bool = True,
                   correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, correct_every: int = 0,
                   data_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   latent_opt_steps: int = 0, latent_opt_lr: float = 0.05,
                   refine_dc: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   guide: torch.Tensor | None = None, start: torch.Tensor | None = None,
                   networks: Networks | None = None, intensity: float = 1.0,
                   run_slices: torch.Tensor | None = None, progress: Callable[[], None] | None = None) -> dict:
    """cond: (S, 1, H, W) normalised naive-inverse slices. Returns normalised (K, S, 1, H, W) tensors:
    ``decoded`` (latent result decoded) and ``output`` (after the refiner, if any and enabled).

    ``correct(x_img, slice_index)`` is data consistency in normalised image space for latent DC.
    ``data_loss(x_img, slice_index)`` (differentiable) drives ``latent_opt_steps`` Adam steps on the final
    latent so that the decoded image explains the measurements (InverseSR-style latent optimisation).
    ``refine_dc(x_img, slice_index)`` (normalised, hard) projects between the passes of a cascaded refiner
    (``bundle.refiner_cascades`` > 1); the projection after the last pass is the caller's.
    ``guide`` (S, G, H, W), normalised: what the refiner sees instead of ``cond`` (``bundle.refiner_guide``,
    G images).
    ``start`` (S, 1, H, W), normalised: the image a flow model (``bundle.flow_start`` not "noise") starts from and
    is conditioned on, its latent plus ``start_noise`` x the drawn noise; "VAE only" (no diffusion) decodes it.
    ``networks``: what runs the bundle's U-Net, VAE and refiner (default: the modules themselves; e.g. their
    OpenVINO conversions, ``medldm.models.runtime``).
    ``intensity``: the clean image's percentile in ``cond``'s units, for the VAE (:class:`LatentCodec`).
    ``run_slices``: the (CPU) indices of the slices the networks run on (default: all). The others come back as
    ``cond``, which is right only where ``cond`` is the answer: :func:`varying_slices` leaves out the slices on which
    cond, guide and start are one constant (the air planes of a padded or registered volume: an all-zero
    measurement). The slices that run get the initial noise they would have had anyway (drawn by slice index), so
    at ``eta`` = 0 (the default; DDIM's step noise is drawn batch after batch) their results do not change.
    """
    if guide is not None and (guide.shape[0], *guide.shape[2:]) != (cond.shape[0], *cond.shape[2:]):
        raise ValueError(f"guide {tuple(guide.shape)} must have the slices and size of cond {tuple(cond.shape)}")
    device = next(bundle.vae.parameters()).device
    nets = networks or torch_networks(bundle)
    codec = LatentCodec(bundle.vae, bundle.latent_scale, intensity, encoder=nets.encode, decoder=nets.decode)
    sched_cfg = bundle.config.scheduler
    scheduler = build_scheduler(sched_cfg, "rflow" if sched_cfg.kind == "rflow" else "ddim", spatial_dims=2)
    padded, (h, w) = pad_to_multiple(cond)
    guide_padded = padded if guide is None else pad_to_multiple(guide)[0]
    s = padded.shape[0]
    down = bundle.vae_config.downsample
    lat_shape = (bundle.vae_config.latent_channels, padded.shape[-2] // down, padded.shape[-1] // down)
    from_image = bundle.flow_start != "noise"
    if from_image and (start is None or start.shape != cond.shape):
        raise ValueError(f"this model's flow starts from its {bundle.flow_start} image: pass start with cond's shape "
                         f"{tuple(cond.shape)}")
    start_padded = pad_to_multiple(start)[0] if from_image else None
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, s, *lat_shape), generator=gen)  # one global draw
    step_gen = torch.Generator(device=device).manual_seed(seed + 1) if eta > 0 else None
    decoded = torch.empty((samples, s, 1, h, w))
    output = torch.empty_like(decoded)
    active = torch.arange(s) if run_slices is None else run_slices.cpu()
    if len(active) < s:
        still = torch.ones(s, dtype=torch.bool)
        still[active] = False
        decoded[:, still] = output[:, still] = cond[still.to(cond.device)].float().cpu()
    encoded: dict[int, torch.Tensor] = {}  # each batch's condition latent, encoded once for all samples
    for k in range(samples):
        for a in range(0, len(active), batch_size):
            idx = active[a:a + batch_size]  # the batch's slice indices
            if a not in encoded:
                encoded[a] = codec.encode((start_padded if from_image else padded)[idx].to(device))
            c = encoded[a]
            cin = condition_input(c, torch.zeros(len(idx), device=device))
            z_init = noise[k, idx].to(device)
            if from_image:  # a bridge: from the start image's latent plus noise, not from noise alone
                z_init = c + sched_cfg.start_noise * z_init
            if use_diffusion:
                def denoiser(z_t, t, cin=cin):
                    return nets.unet(torch.cat([z_t, cin], 1), t)

                def corr(z0, i, idx=idx):
                    x = codec.decode(z0)
                    x[..., :h, :w] = correct(x[..., :h, :w], idx)
                    return codec.encode(x)

                with torch.no_grad():
                    z = sample(denoiser, z_init, scheduler, steps, eta=eta, generator=step_gen,
                               correct=corr if correct is not None and correct_every > 0 else None,
                               correct_every=correct_every, progress=progress)
            else:
                z = c  # "VAE only": decode the encoded naive inverse (or the flow's start image)
            if data_loss is not None and latent_opt_steps > 0:
                z = optimise_latent(codec, z, lambda x, idx=idx: data_loss(x[..., :h, :w], idx),
                                    latent_opt_steps, latent_opt_lr)
            x_dec = codec.decode(z)
            x_out = x_dec
            if refine and bundle.refiner is not None:
                with torch.no_grad():
                    def project(x, idx=idx):  # the padding stays as the refiner left it
                        x = x.clone()
                        x[..., :h, :w] = refine_dc(x[..., :h, :w], idx)
                        return x

                    x_out = apply_refiner(nets.refiner, bundle.refiner_residual_on, x_dec,
                                          guide_padded[idx].to(device),
                                          bundle.refiner_cascades, project if refine_dc else None)
            decoded[k, idx] = x_dec[..., :h, :w].float().cpu()
            output[k, idx] = x_out[..., :h, :w].float().cpu()
    return {"decoded": decoded, "output": output}


def varying_slices(first: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """CPU indices of the slices (dim 0) that are not one constant across ``first`` and ``others`` (S, ...; None
    ignored): a slice is left out only where every tensor is constant there, at ``first``'s value."""
    value = first.reshape(first.shape[0], -1).amin(1)
    varying = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
    for t in (first, *others):
        if t is not None:
            flat = t.reshape(t.shape[0], -1).to(first.device)
            varying |= (flat.amax(1) != value) | (flat.amin(1) != value)
    return torch.nonzero(varying).flatten().cpu()


def optimise_latent(codec: LatentCodec, z: torch.Tensor, loss_fn, steps: int, lr: float) -> torch.Tensor:
    """A few Adam steps on z minimising loss_fn(decode(z)); the decoder stays frozen."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(codec.decode_differentiable(z))
            (z.grad,) = torch.autograd.grad(loss, z)  # gradient for z only, none accumulated in the decoder
            opt.step()
    return z.detach()

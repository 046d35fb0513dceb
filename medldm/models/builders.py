"""Thin builders around MONAI's networks and schedulers; dimension-generic (spatial_dims 2 or 3)."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, BasicUNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medldm.config import RefinerConfig, SchedulerConfig, UNetConfig, VAEConfig
from medldm.errors import ModelError


def build_vae(cfg: VAEConfig, spatial_dims: int) -> AutoencoderKL:
    n = len(cfg.channels)
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.channels),
        num_res_blocks=(cfg.num_res_blocks,) * n,
        attention_levels=(False,) * (n - 1) + (cfg.attention,),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        # Non-local attention at full latent resolution is the dominant cost in 3D; off unless asked.
        with_encoder_nonlocal_attn=cfg.attention,
        with_decoder_nonlocal_attn=cfg.attention,
    )


def condition_channels(latent_channels: int) -> int:
    """Input channels of the latent U-Net: noisy latent, encoded naive inverse, and one constant channel
    holding the std of the noise added to that encoding (noise augmentation), so the model knows how far
    to trust the condition."""
    return 2 * latent_channels + 1


def build_unet(cfg: UNetConfig, spatial_dims: int, latent_channels: int) -> DiffusionModelUNet:
    # MONAI requires a non-zero head size where attention is on; zero elsewhere keeps it explicit.
    heads = tuple(cfg.num_head_channels if a else 0 for a in cfg.attention_levels)
    if not any(cfg.attention_levels):
        heads = (0,) * (len(cfg.channels) - 1) + (cfg.num_head_channels,)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=condition_channels(latent_channels),
        out_channels=latent_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=(cfg.num_res_blocks,) * len(cfg.channels),
        num_head_channels=heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_refiner(cfg: RefinerConfig, spatial_dims: int, guide_channels: int = 1) -> BasicUNet:
    # Inputs: decoded latent estimate and the guide (the naive inverse, or the refiner stage's classical
    # images: guide_channels of them); output: a residual added to the estimate.
    net = BasicUNet(spatial_dims=spatial_dims, in_channels=1 + guide_channels, out_channels=1,
                    features=tuple(cfg.features))
    # Zero last layer: an untrained refiner is the identity on what its output is added to.
    torch.nn.init.zeros_(net.final_conv.weight)
    torch.nn.init.zeros_(net.final_conv.bias)
    return net


def widen_refiner_input(net: BasicUNet, guide_channels: int) -> BasicUNet:
    """``net`` made to take ``guide_channels`` guide images, the added ones last and with zero weights: the
    widened refiner computes what ``net`` did until training teaches it to use them (a warm start)."""
    conv = net.conv_0.conv_0.conv
    added = 1 + guide_channels - conv.in_channels
    if added < 0:
        raise ModelError(f"the refiner already sees {conv.in_channels - 1} guide images, more than {guide_channels}")
    if added:
        wide = type(conv)(conv.in_channels + added, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None).to(conv.weight)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :conv.in_channels] = conv.weight
            if conv.bias is not None:
                wide.bias.copy_(conv.bias)
        net.conv_0.conv_0.conv = wide
        net.conv_0.conv_0.in_channels = wide.in_channels  # MONAI's Convolution block records its own
    return net


def apply_refiner(apply, residual_on: str, decoded: torch.Tensor, guide: torch.Tensor, passes: int = 1,
                  project=None) -> torch.Tensor:
    """The refined estimate: ``apply`` (the refiner, or a sliding-window call of it) on (decoded, guide), the
    guide being the naive inverse or the refiner stage's stack of classical images; its correction is added to
    the guide's first image (the naive inverse unless the stage's guide replaced it) or to the decoded
    estimate, as ``residual_on`` says. With ``passes`` > 1 a weight-shared cascade: ``project`` (data
    consistency) between passes, pass k > 1 refining the projected output of pass k - 1; the projection after
    the last pass is the caller's. One place for training (stages 2 and 3) and both inference paths."""
    if passes > 1 and project is None:
        raise ModelError(f"this refiner runs {passes} passes with data consistency between them: it needs the "
                         "measurement")
    x = decoded
    for k in range(passes):
        x = project(x) if k else x
        x = (guide[:, :1] if residual_on == "naive" else x) + apply(torch.cat([x, guide], 1))
    return x


def build_scheduler(cfg: SchedulerConfig, kind: str | None = None, spatial_dims: int = 2):
    kind = kind or cfg.kind
    if kind == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, use_discrete_timesteps=False,
                              sample_method="logit-normal", spatial_dim=spatial_dims)
    common = dict(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, prediction_type=cfg.prediction_type,
                  clip_sample=False)
    if cfg.schedule != "cosine":
        common.update(beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common)
    raise ValueError(f"unknown scheduler kind {kind!r}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

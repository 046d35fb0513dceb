"""What training and sampling share about latents: the frozen-VAE codec and the U-Net's input layout."""

from __future__ import annotations

import torch


class LatentCodec:
    """Encode/decode between normalised images and scaled latents with a frozen VAE.

    ``intensity``: where the clean image's percentile sits in the images given (1.0 when normalised as the VAE's
    training volumes were); images are divided by it before encoding and decodes multiplied by it, since the VAE
    decodes at its training intensity whatever its input's."""

    def __init__(self, vae: torch.nn.Module, scale: float, intensity: float = 1.0):
        if not intensity > 0:
            raise ValueError(f"intensity must be > 0, got {intensity}")
        self.vae, self.scale, self.intensity = vae, scale, intensity

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x / self.intensity)[0] * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_differentiable(z)

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """decode() with gradients (latent optimisation)."""
        return self.vae.decode(z / self.scale) * self.intensity


def condition_input(c: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Encoded condition plus one constant channel holding its noise-augmentation level (one per item)."""
    return torch.cat([c, level.reshape(-1, *([1] * (c.ndim - 1))).expand(-1, 1, *c.shape[2:])], dim=1)

"""What training and sampling share about latents: the frozen-VAE codec and the U-Net's input layout."""

from __future__ import annotations

import torch


class LatentCodec:
    """Encode/decode between normalised images and scaled latents with a frozen VAE."""

    def __init__(self, vae: torch.nn.Module, scale: float):
        self.vae, self.scale = vae, scale

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)[0] * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale)


def condition_input(c: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Encoded condition plus one constant channel holding its noise-augmentation level (one per item)."""
    return torch.cat([c, level.reshape(-1, *([1] * (c.ndim - 1))).expand(-1, 1, *c.shape[2:])], dim=1)

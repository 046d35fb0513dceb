"""What training and sampling share about latents: the frozen-VAE codec and the U-Net's input layout."""

from __future__ import annotations

from typing import Callable

import torch


class LatentCodec:
    """Encode/decode between normalised images and scaled latents with a frozen VAE.

    ``intensity``: where the clean image's percentile sits in the images given (1.0 when normalised as the VAE's
    training volumes were); images are divided by it before encoding and decodes multiplied by it, since the VAE
    decodes at its training intensity whatever its input's."""

    def __init__(self, vae: torch.nn.Module, scale: float, intensity: float = 1.0,
                 encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``encoder`` (images -> latent mean) and ``decoder`` run ``vae`` elsewhere (e.g. converted to OpenVINO,
        ``medldm.models.runtime``) for encode() and decode(); gradients always go through ``vae`` itself."""
        if not intensity > 0:
            raise ValueError(f"intensity must be > 0, got {intensity}")
        self.vae, self.scale, self.intensity = vae, scale, intensity
        self._encoder = encoder or (lambda x: vae.encode(x)[0])
        self._decoder = decoder or vae.decode

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encoder(x / self.intensity) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._decoder(z / self.scale) * self.intensity

    def decode_differentiable(self, z: torch.Tensor) -> torch.Tensor:
        """decode() with gradients (latent optimisation)."""
        return self.vae.decode(z / self.scale) * self.intensity


def condition_input(c: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Encoded condition plus one constant channel holding its noise-augmentation level (one per item)."""
    return torch.cat([c, level.reshape(-1, *([1] * (c.ndim - 1))).expand(-1, 1, *c.shape[2:])], dim=1)

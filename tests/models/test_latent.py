"""LatentCodec: the intensity the VAE sees an image at is a pure rescaling around encode and decode."""

import pytest
import torch

from medldm.models.bundle import load_bundle
from medldm.models.latent import LatentCodec
from tests.helpers import make_tiny_bundle


def test_intensity_rescales_the_image_before_encoding_and_after_decoding(tmp_path):
    vae = load_bundle(make_tiny_bundle(tmp_path / "m")).vae
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain, dim = LatentCodec(vae, 0.7), LatentCodec(vae, 0.7, intensity=0.9)
    torch.testing.assert_close(dim.encode(0.9 * x), plain.encode(x))
    z = plain.encode(x)
    torch.testing.assert_close(dim.decode(z), 0.9 * plain.decode(z))
    torch.testing.assert_close(dim.decode_differentiable(z), dim.decode(z))
    with pytest.raises(ValueError, match="intensity"):
        LatentCodec(vae, 0.7, intensity=0.0)

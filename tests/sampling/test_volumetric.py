import numpy as np
import pytest
import torch

from medldm.io.volume import Volume
from medldm.sampling.measurement import simulate
from medldm.sampling.reconstructor import Reconstructor
from medldm.sampling.volumetric import sliding_denoiser
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle


class Pointwise(torch.nn.Module):
    """A 'U-Net' that maps every voxel the same way: any seam would come from the windowing itself."""

    def forward(self, x, t):
        return 2 * x[:, :1] + 1


def test_sliding_denoiser_on_a_constant_field_has_no_seams():
    z = torch.full((1, 1, 40, 36, 28), 0.3)
    out = sliding_denoiser(Pointwise(), torch.zeros(1, 1, 40, 36, 28), roi=(16, 16, 16), overlap=0.25)(z, torch.tensor([5]))
    torch.testing.assert_close(out, torch.full_like(z, 1.6))


@pytest.mark.slow
def test_3d_model_on_a_volume_larger_than_its_patch(tmp_path):
    rec = Reconstructor.load(make_tiny_bundle(tmp_path / "m3", spatial_dims=3), device="cpu")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    vol = Volume((phantom((45, 38, 21)) * 300 + 10)[None].astype(np.float32), affine, "MR")
    a = rec(vol, steps=2, samples=2, seed=0)
    b = rec(vol, steps=2, samples=2, seed=0)
    assert a.volume.array.shape == vol.array.shape and np.array_equal(a.volume.affine, affine)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert a.uncertainty.array.shape == vol.array.shape


def test_3d_recon_with_final_data_consistency(tmp_path):
    rec = Reconstructor.load(make_tiny_bundle(tmp_path / "r3", "recon", spatial_dims=3), device="cpu")
    truth = Volume((phantom((32, 32, 8)) * 300)[None].astype(np.float32), np.eye(4), "MR")
    m = simulate(truth, "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    assert rec(m, steps=2, nonnegative=False).residual < 1e-3  # the exact projection
    clipped = rec(m, steps=2)  # MR's default: DC and x >= 0 alternated, x >= 0 last
    assert clipped.volume.array.min() >= 0 and clipped.residual < 0.05

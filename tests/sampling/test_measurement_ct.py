"""CT measurements from sinogram files and from CT volumes (--views): the two paths agree exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm.errors import InputError
from medldm.io.sinogram_h5 import read_sinogram_h5, sinogram_geometry, write_sinogram_h5
from medldm.io.volume import Volume
from medldm.sampling.measurement import from_ct_volume, from_sinogram, to_sinogram
from tests.physics.test_ct import hu_phantom


def ct_volume(n=32, z=3, spacing=(0.8, 0.8, 2.0)) -> Volume:
    arr = np.stack([hu_phantom(n)[0][0, 0].numpy()] * z, axis=-1).astype(np.float32)
    return Volume(arr[None], np.diag([*spacing, 1.0]), "CT", {})


def test_sinogram_file_gives_the_simulated_measurement(tmp_path):
    vol = ct_volume()
    m = from_ct_volume(vol, views=20)
    path = write_sinogram_h5(tmp_path / "s.h5", to_sinogram(m), np.arange(20) * 9.0, pixel_spacing=(0.8, 0.8),
                             slice_spacing=2.0)
    sino, angles, attrs = read_sinogram_h5(path)
    geo = sinogram_geometry(attrs)
    m2 = from_sinogram(sino, angles, pixel_mm=geo["pixel_mm"], slice_mm=geo["slice_mm"])
    torch.testing.assert_close(m2.y, m.y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(m2.affine, vol.affine)
    assert m2.task == "recon" and m2.modality == "CT" and m2.naive_inverse().shape == (1, 1, 32, 32, 3)


def test_fbp_of_many_noiseless_views_is_close_to_the_volume():
    vol = ct_volume()
    err_sparse, err_dense = (float(np.abs(from_ct_volume(vol, v).naive_inverse()[0].numpy() - vol.array).mean())
                             for v in (12, 180))
    assert err_dense < 0.5 * err_sparse  # streaks are a sparse-view artefact


def test_narrow_detector_row_is_padded_with_air():
    m = from_ct_volume(ct_volume(n=24), views=10)  # the phantom lies inside the inscribed circle
    sino = to_sinogram(m)
    narrow = from_sinogram(sino[:, :, 2:-2], np.arange(10) * 18.0, pixel_mm=0.8, image_size=(24, 24))
    torch.testing.assert_close(narrow.y, m.y, rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="even number"):
        from_sinogram(sino[:, :, 1:-2], np.arange(10) * 18.0, pixel_mm=0.8, image_size=(24, 24))


def test_views_refuses_mr_and_anisotropic_pixels():
    mr = Volume(ct_volume().array, np.eye(4), "MR", {})
    with pytest.raises(InputError, match="CT projections"):
        from_ct_volume(mr, 10)
    with pytest.raises(InputError, match="square pixels"):
        from_ct_volume(ct_volume(spacing=(0.8, 1.0, 2.0)), 10)


def test_dose_adds_seeded_noise():
    vol = ct_volume()
    a, b, c = (from_ct_volume(vol, 10, I0=1e4, seed=s).y for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_to_sinogram_is_the_physical_line_integral_of_a_water_disc():
    """Independent of the water-offset bookkeeping that the file round trip cancels: through the centre of a
    water disc (0 HU) in air (-1000 HU), -log(I / I0) = mu_water * diameter for every view."""
    from medldm.physics.ct import MU_WATER_PER_MM

    n, radius, pixel = 64, 20, 0.8
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    disc = np.where(xx**2 + yy**2 <= radius**2, 0.0, -1000.0).astype(np.float32)
    vol = Volume(np.stack([disc] * 2, -1)[None], np.diag([pixel, pixel, 1.0, 1.0]), "CT", {})
    sino = to_sinogram(from_ct_volume(vol, views=6))  # noiseless
    assert sino.shape[:2] == (2, 6)
    expected = MU_WATER_PER_MM * 2 * radius * pixel  # 0.0192 / mm * 32 mm
    np.testing.assert_allclose(sino.max(axis=2), expected, rtol=0.04)
    assert float(sino.min()) >= -1e-4  # air contributes nothing

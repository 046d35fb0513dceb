"""Fitted coil maps (``medldm.physics.coils.fit_maps``): what they recover, their normalisation, their scale."""

import numpy as np
import pytest
import torch

from medldm.physics.coils import estimate_maps, fit_maps, rss
from medldm.physics.sense import RandomMultiCoilUndersampling
from tests.physics.conftest import phantom2d

N = 64


def _measured():
    """A phantom's 6-coil k-space with phase (3x equispaced, 16% centre): image (X, Y, 1), k-space (C, X, Y, 1),
    mask, and the simulation's maps (C, X, Y, 1)."""
    op = RandomMultiCoilUndersampling(coils=6, phase=True, accelerations=[3], center_fractions=[0.16],
                                      mask_type="equispaced").sample(3)
    x = phantom2d(N)
    mask = np.asarray(op.mask_for((N,))).astype(bool)
    true = op.maps_for((N, N), torch.complex64, "cpu")[0, ..., None]
    return x[0, 0, ..., None], op(x)[0, ..., None], mask, true


def _error(maps, true, where):
    # maps are defined up to one global phase per slice (no measurement fixes it)
    phase = torch.angle((maps * true.conj())[:, where].sum())
    return float((maps * torch.exp(-1j * phase) - true).abs().pow(2).sum(0).sqrt()[where].mean())


@pytest.mark.parametrize("centre", [None, 32])  # all frequencies, or the central 32 on a 48-frequency grid
def test_fitted_maps_are_closer_to_the_coils_than_direct_calibration(centre):
    x, y, mask, true = _measured()
    start = torch.from_numpy(estimate_maps(y[..., 0].numpy(), mask))[..., None]
    fitted = fit_maps(y, mask, x, start, centre=centre)
    body = x[..., 0] > 0.5
    # direct calibration divides blurred coil images by their blurred RSS; the fit divides by the image itself
    assert _error(fitted, true, body) < 0.6 * _error(start, true, body)
    np.testing.assert_allclose(rss(fitted.numpy())[body.numpy()], 1.0, atol=1e-5)  # the estimated maps' scale


def test_fitted_maps_do_not_depend_on_the_image_scale():
    x, y, mask, _ = _measured()
    start = torch.from_numpy(estimate_maps(y[..., 0].numpy(), mask))[..., None]
    torch.testing.assert_close(fit_maps(y, mask, 7.0 * x, start), fit_maps(y, mask, x, start), atol=1e-4, rtol=0)

import math

import numpy as np
import pytest
import torch

from medldm.physics.ct import LowDoseCT, RandomLowDoseCT, RandomSparseViewCT, SparseViewCT, n_detectors
from tests.physics.conftest import assert_adjoint, gen, rand_like_shape


def hu_phantom(n=64):
    yy, xx = np.mgrid[:n, :n]
    c = (n - 1) / 2
    body = ((xx - c) ** 2 / (0.42 * n) ** 2 + (yy - c) ** 2 / (0.32 * n) ** 2) < 1
    bone = ((xx - 0.38 * n) ** 2 + (yy - 0.45 * n) ** 2) < (0.08 * n) ** 2
    hu = np.where(body, 40.0, -1000.0) + np.where(bone, 600.0, 0.0)
    inner = ((xx - c) ** 2 / (0.42 * n) ** 2 + (yy - c) ** 2 / (0.32 * n) ** 2) < 0.6
    return torch.tensor(hu, dtype=torch.float32)[None, None], torch.tensor(inner)


@pytest.mark.parametrize("shape,kw", [((2, 1, 24, 24), {}), ((1, 1, 20, 20, 3), {}),
                                      ((1, 1, 24, 18, 2), {"image_shape": (24, 18)})])
def test_adjoint_exact(shape, kw):
    op = LowDoseCT(views=17, **kw)
    x = rand_like_shape(shape, 0)
    y = rand_like_shape(op.A(x).shape, 1)
    assert_adjoint(op, x, y, rtol=1e-10)
    assert_adjoint(op, x.float(), y.float(), rtol=1e-4)
    assert op.A(x).shape[2:4] == (n_detectors(shape[2:4]), 17)


def test_noiseless_fbp_recovers_hu():
    x, inner = hu_phantom(64)
    for op in (LowDoseCT(I0=math.inf, views=120, pixel_mm=5.0), LowDoseCT(I0=1e12, views=120, pixel_mm=5.0)):
        r = op.naive_inverse(op(x))
        assert float((r - x)[0, 0][inner].abs().mean()) < 15.0  # HU; interpolation + FBP discretisation


def test_noise_grows_as_dose_drops_and_poisson_statistics(rng_guard):
    x, inner = hu_phantom(64)
    stds = [float((LowDoseCT(I0=i0, views=90, pixel_mm=5.0, noise_seed=1).naive_inverse(
        LowDoseCT(I0=i0, views=90, pixel_mm=5.0, noise_seed=1)(x)) - x)[0, 0][inner].std()) for i0 in (1e3, 1e4, 1e5)]
    assert stds[0] > stds[1] > stds[2]
    # Air everywhere: p = 0, counts ~ Poisson(I0), so the line-integral noise std is 1 / sqrt(I0).
    air = torch.full((4, 1, 32, 32), -1000.0)
    op = LowDoseCT(I0=1e4, views=45, noise_seed=2)
    e = op(air) - op.A(air)
    assert abs(float(e.std()) - 0.01) < 0.001 and abs(float(e.mean())) < 0.001


def test_same_seed_same_output_and_global_rng_untouched(rng_guard):
    x, _ = hu_phantom(32)
    rop = RandomLowDoseCT(I0_range=(1e3, 1e5), views=30)
    a, b = rop.sample(3, image=x), rop.sample(3, image=x)
    assert a.params() == b.params() and 1e3 <= a.I0 <= 1e5
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x)) and not torch.equal(a(x), rop.sample(4)(x))
    assert torch.equal(a(x, gen(9)), b(x, gen(9)))
    i0s = np.log10([rop.sample(s).I0 for s in range(40)])
    assert i0s.min() < 3.6 and i0s.max() > 4.4  # log-uniform spread over the decades


def test_data_consistency_reduces_residual():
    x, _ = hu_phantom(32)
    op = SparseViewCT(views=20)
    y = op(x)
    x0 = torch.zeros_like(x)
    r0, r1 = op.residual(x0, y), op.residual(op.data_consistency(x0, y), y)
    assert r1 < 0.7 * r0
    assert torch.equal(op.data_consistency(x0, y, 0.0), x0)
    soft = op.data_consistency(x0, y, 1e3 / op.lipschitz((32, 32)))
    assert r1 < op.residual(soft, y) < r0


def test_sparse_view_is_recon_and_worse_than_dense():
    x, inner = hu_phantom(64)
    sparse, dense = SparseViewCT(views=20, pixel_mm=5.0), SparseViewCT(views=120, pixel_mm=5.0)
    assert sparse.task == "recon" and LowDoseCT().task == "denoise" and math.isinf(sparse.I0)
    err = [float((op.naive_inverse(op(x)) - x)[0, 0][inner].abs().mean()) for op in (sparse, dense)]
    assert err[0] > 2 * err[1]
    rop = RandomSparseViewCT(views=(60, 90, 120))
    assert {rop.sample(s).views for s in range(20)} == {60, 90, 120}


def test_explicit_angles_match_even_views_and_stay_adjoint():
    even = SparseViewCT(views=12, pixel_mm=0.8)
    listed = SparseViewCT(angles=list(np.arange(12) * 15.0), pixel_mm=0.8)
    assert listed.views == 12 and listed.params()["angles"][1] == 15.0
    x = hu_phantom(32)[0].double()
    torch.testing.assert_close(listed.A(x), even.A(x), rtol=1e-6, atol=1e-6)
    odd = SparseViewCT(angles=[0.0, 7.0, 50.0, 91.5, 170.0], pixel_mm=0.8)
    y_shape = (1, 1, n_detectors((32, 32)), 5)
    assert_adjoint(odd, rand_like_shape((1, 1, 32, 32)), rand_like_shape(y_shape, seed=1))


def test_bad_angle_lists_are_config_errors():
    from medldm.errors import ConfigError

    for bad in ([], [0.0, float("nan")]):
        with pytest.raises(ConfigError, match="angles"):
            SparseViewCT(angles=bad)

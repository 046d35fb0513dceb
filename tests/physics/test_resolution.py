import numpy as np
import pytest
import torch

from medldm.physics.resolution import (InPlaneDownsample, RandomInPlaneDownsample, RandomThickSlice, ThickSlice,
                                       coarse_to_fine_affine, fine_to_coarse_affine, resampling_matrix)
from tests.physics.conftest import assert_adjoint, rand_like_shape

OPS = [ThickSlice(2), ThickSlice(3, profile="gaussian"), ThickSlice(4, axis=0, size=16), ThickSlice(3, size=16),
       InPlaneDownsample(2), InPlaneDownsample(3, "gaussian", size=(16, 16))]


@pytest.mark.parametrize("op", OPS, ids=lambda o: str(o.params()))
def test_adjoint(op):
    x = rand_like_shape((2, 1, 16, 16, 16), 0)
    y = rand_like_shape(op.A(x).shape, 1)
    assert_adjoint(op, x, y, rtol=1e-10, fine_shape=x.shape)
    assert_adjoint(op, x.float(), y.float(), rtol=1e-4, fine_shape=x.shape)


@pytest.mark.parametrize("op", OPS, ids=lambda o: str(o.params()))
def test_hard_dc_exact_and_idempotent(op):
    x, x0 = rand_like_shape((1, 1, 16, 16, 16), 0), rand_like_shape((1, 1, 16, 16, 16), 1)
    y = op(x) + 0.1 * rand_like_shape(op(x).shape, 2)  # any y is attainable: A has full row rank
    d1 = op.data_consistency(x0, y)
    assert op.residual(d1, y) < 1e-12
    assert torch.allclose(op.data_consistency(d1, y), d1, atol=1e-12)
    assert torch.equal(op.data_consistency(x0, y, 0.0), x0)
    z = op.data_consistency(x0, y, 2.0)
    assert torch.allclose(z + 2 * op.adjoint(op.A(z), x0.shape), x0 + 2 * op.adjoint(y, x0.shape), atol=1e-10)


def test_box_is_slab_mean_and_pinv_is_k_transpose():
    x = rand_like_shape((1, 1, 4, 4, 12), 0)
    op = ThickSlice(3)
    assert torch.allclose(op.A(x), x.reshape(1, 1, 4, 4, 4, 3).mean(-1))
    y = op.A(x)
    assert torch.allclose(op.pseudo_inverse(y), 3 * op.adjoint(y), atol=1e-12)
    assert np.allclose(resampling_matrix(12, 3, "gaussian").sum(1), 1)


@pytest.mark.parametrize("op", [ThickSlice(1), ThickSlice(1, profile="gaussian"), InPlaneDownsample(1)])
def test_identity_at_k1(op):
    x = rand_like_shape((1, 1, 8, 8, 8), 0)
    assert torch.equal(op(x), x) and torch.equal(op.naive_inverse(op(x)), x)


def test_naive_inverse_grid_and_linear_reproduction():
    # A linear ramp along Z, box-averaged, sits on the coarse centres; cubic upsampling onto the
    # edge-aligned fine grid gives the ramp back away from the borders.
    z = torch.arange(24, dtype=torch.float64)
    x = z.reshape(1, 1, 1, 1, 24).expand(1, 1, 4, 4, 24).contiguous()
    for k in (2, 3, 4):
        up = ThickSlice(k).naive_inverse(ThickSlice(k).A(x))
        assert up.shape == x.shape
        assert torch.allclose(up[..., 2 * k:-2 * k], x[..., 2 * k:-2 * k], atol=1e-9)
    odd = ThickSlice(3, size=16)
    assert odd.A(x[..., :16]).shape[-1] == 6 and odd.naive_inverse(odd.A(x[..., :16])).shape[-1] == 16


def test_affine_helpers_preserve_field_of_view():
    rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.diag([0.8, 0.9, 5.0])
    coarse = np.eye(4)
    coarse[:3, :3], coarse[:3, 3] = rot, [10.0, -20.0, 30.0]
    n_coarse = np.array([20, 24, 8])
    for axis in (2, -1, 0):
        for k in (1, 2, 3, 4):
            fine = coarse_to_fine_affine(coarse, axis, k)
            n_fine = n_coarse.copy()
            n_fine[axis] *= k
            lo, hi = np.append(-0.5 * np.ones(3), 1), np.append(n_coarse - 0.5, 1)
            lo_f, hi_f = np.append(-0.5 * np.ones(3), 1), np.append(n_fine - 0.5, 1)
            assert np.allclose(coarse @ lo, fine @ lo_f) and np.allclose(coarse @ hi, fine @ hi_f)
            assert np.allclose(fine_to_coarse_affine(fine, axis, k), coarse)
            offset = np.zeros(4)
            offset[axis % 3], offset[3] = -(k - 1) / (2 * k), 1
            assert np.allclose(fine[:, 3], coarse @ offset)  # fine voxel 0 centre in coarse voxel units


def test_random_factors_reproducible(rng_guard):
    rop = RandomThickSlice((2, 3, 4))
    x = rand_like_shape((1, 1, 8, 8, 12), 0)
    assert rop.sample(5, image=x).params() == rop.sample(5, image=x).params()
    assert {rop.sample(s).factor for s in range(30)} == {2, 3, 4}
    assert rop.sample(1, image=x).params()["size"] == 12
    assert RandomInPlaneDownsample((2,)).sample(0, image=x).params()["size"] == [8, 8]
    with pytest.raises(ValueError):
        ThickSlice(2, size=12).A(rand_like_shape((1, 1, 8, 8, 10), 0))

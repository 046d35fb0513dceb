import math

import pytest
import torch

from medldm.physics.ct import SparseViewCT
from medldm.physics.ct_projector import SPARSE_MAX_SAMPLES, Projector, n_detectors, projector


def both(shape, theta):
    return [Projector(shape, theta, torch.float64, torch.device("cpu"), sparse=s) for s in (True, False)]


@pytest.mark.parametrize("shape,theta", [((24, 24), torch.arange(17, dtype=torch.float64) * (math.pi / 17)),
                                         ((20, 13), torch.tensor([0.0, 0.12, 0.9, 1.6, 3.0], dtype=torch.float64))])
def test_sparse_matrix_equals_grid_sample_sums_and_their_transposes(shape, theta):
    sparse, grid = both(shape, theta)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, *shape), generator=g, dtype=torch.float64)
    y = torch.rand((3, n_detectors(shape), theta.numel()), generator=g, dtype=torch.float64)
    torch.testing.assert_close(sparse.radon(x), grid.radon(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.backproject(y), grid.backproject(y), rtol=1e-12, atol=1e-12)
    assert sparse.norm_squared == pytest.approx(grid.norm_squared, rel=1e-9)


def test_sparse_projection_is_differentiable_to_second_order():
    sparse, _ = both((9, 9), torch.arange(5, dtype=torch.float64) * (math.pi / 5))
    x = torch.rand((2, 1, 9, 9), dtype=torch.float64, requires_grad=True)
    y = torch.rand((2, n_detectors((9, 9)), 5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparse.radon, (x,)) and torch.autograd.gradcheck(sparse.backproject, (y,))
    assert torch.autograd.gradgradcheck(lambda v: sparse.backproject(sparse.radon(v)) ** 2, (x,))


def test_float32_paths_agree_and_autocast_cannot_lower_the_product():
    theta = torch.arange(12, dtype=torch.float64) * (math.pi / 12)
    sparse, grid = (Projector((32, 32), theta, torch.float32, torch.device("cpu"), sparse=s) for s in (True, False))
    x = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(0)) * 1000
    exact = sparse.radon(x)
    torch.testing.assert_close(exact, grid.radon(x), rtol=1e-5, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would cast a plain matmul to bf16 (~3 significant digits)
        torch.testing.assert_close(sparse.radon(x), exact, rtol=1e-6, atol=1e-4)


def test_lipschitz_estimate_bounds_the_true_norm_from_above_by_about_one_percent():
    sparse, _ = both((9, 9), torch.arange(5, dtype=torch.float64) * (math.pi / 5))
    true = float(torch.linalg.matrix_norm(sparse.matrix.to_dense(), 2)) ** 2
    assert true <= sparse.norm_squared <= 1.011 * true


def test_operators_of_one_geometry_share_one_projector_and_large_slices_keep_their_own():
    a, b = SparseViewCT(views=30, noise_seed=1), SparseViewCT(views=30, noise_seed=2, I0=1e5)
    assert a.projector((40, 40)) is b.projector((40, 40)) is not SparseViewCT(views=31).projector((40, 40))
    assert a.projector((40, 40)).sparse
    big = int(math.sqrt(SPARSE_MAX_SAMPLES / 3)) + 2  # views x detectors^2 over the bound
    c, d = SparseViewCT(views=3), SparseViewCT(views=3)
    assert not c.projector((big, big)).sparse and c.projector((big, big)) is c.projector((big, big))
    assert c.projector((big, big)) is not d.projector((big, big))  # freed with its operator, not held globally
    assert not projector((big, big), 3, torch.float32, "cpu").sparse

import random

import numpy as np
import pytest
import torch

from medldm.physics._common import rdot


@pytest.fixture
def rng_guard():
    """Fails the test if anything touched the global torch / numpy / python RNGs."""
    t, n, p = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    n2 = np.random.get_state()
    assert torch.equal(torch.random.get_rng_state(), t), "global torch RNG was used"
    assert n2[0] == n[0] and np.array_equal(n2[1], n[1]) and n2[2:] == n[2:], "global numpy RNG was used"
    assert random.getstate() == p, "global python RNG was used"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_like_shape(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def assert_adjoint(op, x, y, rtol=1e-4, **adj_kw):
    """<A x, y> == <x, A^H y> under the real inner product (complex y: Re of the complex one)."""
    ax = op.A(x)
    assert ax.shape == y.shape
    lhs, rhs = float(rdot(ax, y)), float(rdot(x, op.adjoint(y, **adj_kw)))
    scale = float(torch.linalg.vector_norm(ax) * torch.linalg.vector_norm(y))
    assert abs(lhs - rhs) <= rtol * max(abs(lhs), 1e-2 * scale), (lhs, rhs)


def phantom2d(n=32, background=0.0, dtype=torch.float32):
    yy, xx = np.mgrid[:n, :n]
    c = (n - 1) / 2
    body = ((xx - c) ** 2 / (0.42 * n) ** 2 + (yy - c) ** 2 / (0.32 * n) ** 2) < 1
    spot = ((xx - 0.4 * n) ** 2 + (yy - 0.45 * n) ** 2) < (0.1 * n) ** 2
    img = np.where(body, 1.0, background) + 0.5 * spot
    return torch.tensor(img, dtype=dtype)[None, None]

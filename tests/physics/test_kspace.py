import numpy as np
import pytest
import torch

from medldm.physics.fft import fft2c, ifft2c
from medldm.physics.registry import build_operator
from medldm.physics.kspace import (CartesianUndersampling, RandomCartesianUndersampling, draw_mask_1d,
                                   draw_mask_2d)
from tests.physics.conftest import assert_adjoint, gen, phantom2d, rand_like_shape

CASES = [("2d", (2, 1, 16, 16), False), ("2d", (2, 1, 16, 16), True), ("2d", (1, 1, 8, 16, 4), True),
         ("3d", (1, 1, 8, 16, 16), False), ("3d", (1, 1, 8, 16, 16), True)]


@pytest.mark.parametrize("mode,shape,phase", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjoint(mode, shape, phase, dtype):
    op = RandomCartesianUndersampling(mode=mode, phase=phase, center_fractions=[0.08], accelerations=[4]).sample(3)
    x = rand_like_shape(shape, 1, dtype)
    y = torch.randn(shape, generator=gen(2), dtype=torch.complex64 if dtype == torch.float32 else torch.complex128)
    assert_adjoint(op, x, y, rtol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("mode,shape,phase", CASES)
def test_identity_when_fully_sampled(mode, shape, phase):
    op = RandomCartesianUndersampling(mode=mode, phase=phase, center_fractions=[0.0], accelerations=[1]).sample(0)
    x = rand_like_shape(shape, 4, torch.float32)
    assert torch.allclose(op.naive_inverse(op(x)), x, atol=1e-5)
    assert torch.allclose(op.zero_filled_magnitude(op(x)), x.abs(), atol=1e-5)


def test_same_seed_same_output_and_global_rng_untouched(rng_guard):
    rop = RandomCartesianUndersampling(phase=True, sigma=(0.01, 0.05))
    a, b, c = rop.sample(11), rop.sample(11), rop.sample(12)
    assert a.params() == b.params() and a.params() != c.params()
    x = phantom2d(32)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    assert torch.equal(a(x, gen(5)), b(x, gen(5))) and not torch.equal(a(x, gen(5)), a(x, gen(6)))


def test_noise_std_on_sampled_kspace_and_zero_elsewhere(rng_guard):
    op = CartesianUndersampling(mode="2d", acceleration=4, center_fraction=0.08, sigma=0.1, noise_seed=1)
    x = phantom2d(64).repeat(4, 1, 1, 1)
    resid = op(x) - op.A(x)
    m = torch.as_tensor(op.mask_for((64,)))
    on, off = resid[..., m], resid[..., ~m]
    assert torch.all(off == 0)
    for part in (on.real, on.imag):
        assert abs(float(part.std()) - 0.1) < 0.01 and abs(float(part.mean())) < 0.01


@pytest.mark.parametrize("mode,shape,phase", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_dc_projection(mode, shape, phase, dtype):
    # Without phase CGLS converges in 2-3 iterations to rounding; with phase the real-constrained problem
    # is ill-conditioned, so float32 is only as exact as float32 rounding amplified by it.
    params = RandomCartesianUndersampling(mode=mode, phase=phase, accelerations=[4],
                                          center_fractions=[0.08]).sample(5).params()
    op = build_operator("recon", "MR", {**params, "dc_iters": 300})
    x_true, x0 = rand_like_shape(shape, 1, dtype), rand_like_shape(shape, 2, dtype)
    y = op(x_true)
    d1 = op.data_consistency(x0, y)
    tight = dtype == torch.float64 or not phase
    assert op.residual(d1, y) < (1e-5 if tight else 1e-3)
    atol = {torch.float64: 1e-9, torch.float32: 1e-6 if not phase else 1e-3}[dtype]
    assert torch.allclose(op.data_consistency(d1, y), d1, atol=atol)
    noisy = build_operator("recon", "MR", {**op.params(), "sigma": 0.3})
    yn = noisy(x_true)
    n1 = noisy.data_consistency(x0, yn)
    assert torch.allclose(noisy.data_consistency(n1, yn), n1, atol=atol)


def test_hard_dc_is_line_replacement_for_symmetric_mask():
    # Mask {0} U {14..18} of 32 is its own Hermitian mirror: the projection is plain line replacement.
    mask = np.zeros(32, bool)
    mask[[0, 14, 15, 16, 17, 18]] = True
    op = CartesianUndersampling(mask=mask)
    x, xt = rand_like_shape((1, 1, 32, 32), 1), rand_like_shape((1, 1, 32, 32), 2)
    y = op(xt)
    m = torch.as_tensor(mask, dtype=torch.float64)
    ref = ifft2c((1 - m) * fft2c(x.to(torch.complex128)) + m * y).real
    assert torch.allclose(op.data_consistency(x, y), ref, atol=1e-10)


def test_soft_dc():
    op = RandomCartesianUndersampling(phase=True, accelerations=[4], center_fractions=[0.08]).sample(2)
    x, y = rand_like_shape((1, 1, 16, 16), 1), op(rand_like_shape((1, 1, 16, 16), 2))
    assert torch.equal(op.data_consistency(x, y, 0.0), x)
    w = 3.0
    z = op.data_consistency(x, y, w)
    assert torch.allclose(z + w * op.adjoint(op.A(z)), x + w * op.adjoint(y), atol=1e-8)
    assert torch.allclose(op.data_consistency(x, y, 1e8), op.data_consistency(x, y), atol=1e-5)


@pytest.mark.parametrize("mode,shape", [("2d", (2, 1, 12, 15)), ("2d", (1, 1, 13, 16, 5)), ("3d", (1, 1, 8, 11, 10)),
                                         ("3d", (1, 1, 9, 10, 7))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_dc_without_phase_equals_the_iterative_solvers(mode, shape, dtype):
    # odd and even sizes: the Hermitian mirror of a centred spectrum differs (even n: index 0 is its own mirror)
    from medldm.physics._common import cg, cgls

    op = CartesianUndersampling(mode=mode, acceleration=3, center_fraction=0.2, mask_type="random", sigma=0.05)
    x, y = rand_like_shape(shape, 1, dtype), op(rand_like_shape(shape, 2, dtype))  # noisy: y is not attainable
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-6)
    hard = x + cgls(op.A, op.adjoint, y - op.A(x), like=x, iters=200)
    assert torch.allclose(op.data_consistency(x, y), hard, **tol)
    w = 3.0
    soft = cg(lambda v: v + w * op.adjoint(op.A(v)), x + w * op.adjoint(y), x, iters=200)
    assert torch.allclose(op.data_consistency(x, y, w), soft, **tol)
    # the measurement's spectrum is kept for the next call with the same y, and recomputed when y changes
    y.mul_(2)
    hard = x + cgls(op.A, op.adjoint, y - op.A(x), like=x, iters=200)
    assert torch.allclose(op.data_consistency(x, y), hard, **tol)
    with torch.inference_mode():  # no version counter to key the kept spectrum on: computed every call
        assert torch.allclose(op.data_consistency(x, y.clone()), hard, **tol)


def test_closed_form_dc_keeps_the_dtype_and_the_operator_pickles():
    import pickle

    op = CartesianUndersampling(mode="2d", acceleration=4, center_fraction=0.1, mask_type="equispaced")
    x, y = rand_like_shape((2, 1, 16, 12), 1, torch.float32), op(rand_like_shape((2, 1, 16, 12), 2, torch.float32))
    half = op.data_consistency(x.bfloat16(), y)  # a CUDA autocast batch reaching the CPU projection
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), op.data_consistency(x.bfloat16().float(), y), rtol=0, atol=0.05)
    again = pickle.loads(pickle.dumps(op))  # after a call (the kept spectrum is dropped): DataLoader workers
    assert torch.equal(again.data_consistency(x, y), op.data_consistency(x, y))


def test_measured_acceleration():
    for seed in range(8):
        m = draw_mask_1d(256, 4, 0.08, "random", seed)
        assert abs(256 / m.sum() - 4) < 0.2 * 4
        assert m[128]  # DC line always measured
        assert abs(256 / draw_mask_1d(256, 8, 0.04, "equispaced", seed).sum() - 8) < 0.2 * 8
    eight = [256 / draw_mask_1d(256, 8, 0.04, "random", s).sum() for s in range(8)]
    assert abs(np.mean(eight) - 8) < 0.15 * 8
    assert draw_mask_2d((32, 32), 4, 0.08, "random", 0).sum() == 256
    assert 0.8 * 8 < 1024 / draw_mask_2d((32, 32), 8, 0.08, "equispaced", 0).sum() <= 8
    op = RandomCartesianUndersampling(accelerations=[4], center_fractions=[0.08]).sample(1)
    assert abs(op.measured_acceleration((256,)) - 4) < 0.8
    assert np.array_equal(draw_mask_1d(64, 4, 0.08, "random", 3), draw_mask_1d(64, 4, 0.08, "random", 3))


def test_explicit_mask_round_trip_and_errors():
    op = RandomCartesianUndersampling(mode="3d", phase=True).sample(4)
    fixed = CartesianUndersampling(mask=op.mask_for((16, 8)), mode="3d", phase_coeffs=op.phase_coeffs)
    again = build_operator("recon", "MR", fixed.params())
    x = rand_like_shape((1, 1, 8, 16, 8), 0, torch.float32)
    assert torch.equal(again.A(x), op.A(x))
    with pytest.raises(ValueError):
        fixed.A(rand_like_shape((1, 1, 8, 12, 8), 0, torch.float32))
    with pytest.raises(ValueError):
        CartesianUndersampling(mode="2d", phase_coeffs=[0.0] * 10)

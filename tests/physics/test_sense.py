import numpy as np
import pytest
import torch

from medldm.errors import ConfigError, InputError
from medldm.physics.coils import calibration_lines, estimate_maps, rss
from medldm.physics.fft import fftnc
from medldm.physics.registry import build_operator
from medldm.physics.sense import MultiCoilCartesian, RandomMultiCoilUndersampling
from tests.physics.conftest import assert_adjoint, gen, phantom2d, rand_like_shape

SHAPES = [(2, 1, 16, 16), (1, 1, 8, 16, 4)]


def _random(coils=4, phase=True, acceleration=4, **kw):
    return RandomMultiCoilUndersampling(coils=coils, phase=phase, accelerations=[acceleration],
                                        center_fractions=[0.2], mask_type="equispaced", **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjoint(shape, dtype):
    op = _random().sample(3)
    x = rand_like_shape(shape, 1, dtype)
    cshape = (shape[0], 4, *shape[2:])
    y = torch.randn(cshape, generator=gen(2), dtype=torch.complex64 if dtype == torch.float32 else torch.complex128)
    assert_adjoint(op, x, y, rtol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_zero_strength(shape):
    # fully sampled, maps normalised to sum |S|^2 = 1: A^H A = I, and the zero-filled RSS is the image
    op = _random(acceleration=1).sample(0)
    x = rand_like_shape(shape, 4, torch.float32).abs()
    y = op(x)
    assert torch.allclose(op.adjoint(y), x, atol=1e-5)
    assert torch.allclose(op.zero_filled_rss(y), x, atol=1e-5)
    assert torch.allclose(op.zero_filled_magnitude(y), x, atol=1e-5)
    one = MultiCoilCartesian(coils=1)  # one coil, no phase, nothing dropped: the plain centred FFT
    assert torch.allclose(one.A(x), fftnc(x.to(torch.complex64), (2, 3)), atol=1e-5)


def test_params_rebuild_and_seeded(rng_guard):
    rop = _random(sigma=(0.01, 0.02))
    a, b, c = rop.sample(7), rop.sample(7), rop.sample(8)
    assert a.params() == b.params() and a.params() != c.params()
    x = phantom2d(16)
    again = build_operator("recon", "MR", a.params())
    assert torch.equal(again(x), a(x))
    # the masks of a seed are those of the single-coil operator: coils add maps, not a different mask
    from medldm.physics.kspace import RandomCartesianUndersampling

    single = RandomCartesianUndersampling(accelerations=[4], center_fractions=[0.2], mask_type="equispaced").sample(7)
    assert np.array_equal(single.mask_for((16,)), a.mask_for((16,)))


def test_hard_dc_projects_and_is_idempotent():
    # with coils and the real constraint, the projection recovers the image here: ill-conditioned, many iterations
    op = build_operator("recon", "MR", {**_random().sample(5).params(), "dc_iters": 1000})
    xt, x0 = rand_like_shape((1, 1, 16, 16), 1), rand_like_shape((1, 1, 16, 16), 2)
    y = op(xt)
    d = op.data_consistency(x0, y)
    assert op.residual(d, y) < 1e-6
    assert torch.allclose(op.data_consistency(d, y), d, atol=1e-6)


def test_per_slice_maps_select_the_slices():
    truth = _random().sample(2)
    x = rand_like_shape((1, 1, 16, 16, 3), 0)
    maps = truth.maps_for((16, 16, 3), torch.complex128, "cpu")[0].expand(-1, -1, -1, 3).clone()
    maps[..., 1] *= 1j  # the slices differ
    op = MultiCoilCartesian(maps=maps, mask=truth.mask_for((16,)))
    idx = torch.tensor([2, 1])
    sub = op.select(2, idx)
    assert torch.allclose(sub.A(x.index_select(4, idx)), op.A(x).index_select(4, idx))
    with pytest.raises(InputError, match="do not fit"):
        op.A(rand_like_shape((1, 1, 16, 16, 2), 0))


def test_estimated_maps_recover_the_image():
    # direct calibration from the centre lines: the coil combination of fully sampled data is the magnitude
    op = RandomMultiCoilUndersampling(coils=6, phase=True, accelerations=[1], center_fractions=[0.0]).sample(1)
    x = phantom2d(32, background=0.05, dtype=torch.float64)
    y = op(x)[0].numpy()
    mask = np.zeros(32, bool)
    mask[12:21] = True
    est = estimate_maps(y, mask)
    body = x[0, 0].numpy() > 0.5
    assert np.allclose(rss(est)[body], 1, atol=1e-4)  # normalised wherever there is signal
    combined = (np.conj(est) * np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(y, axes=(-2, -1)), norm="ortho"),
                                              axes=(-2, -1))).sum(0)
    # the phase is folded into the maps (low-resolution phase: off by up to 0.2 rad at the sharp edges)
    assert np.abs(combined.imag).mean() < 0.02 * float(x.max())
    assert np.abs(combined.real - x[0, 0].numpy()).mean() < 0.02 * float(x.max())


def test_calibration_errors():
    assert calibration_lines(np.array([0, 1, 1, 1, 1, 0, 1, 0], bool)) == slice(1, 5)
    assert calibration_lines(np.array([1, 0, 0, 0, 0, 1], bool)) == slice(3, 3)
    with pytest.raises(InputError, match="fully sampled line"):
        estimate_maps(np.ones((2, 8, 8), np.complex64), np.array([1, 0, 1, 0, 0, 0, 1, 0], bool))
    with pytest.raises(ConfigError):
        MultiCoilCartesian(coils=0)
    with pytest.raises(ConfigError):
        MultiCoilCartesian(maps=np.ones((2, 4, 4), np.float32))
    with pytest.raises(ConfigError):
        RandomMultiCoilUndersampling(mode="3d")


def test_cg_sense_agrees_with_sigpy():
    from sigpy.mri.app import SenseRecon

    op = _random(coils=4, acceleration=2).sample(4)
    x = phantom2d(32, dtype=torch.float64)
    y = op(x)
    ours = op.sense(y, iters=20)[0, 0].numpy()
    maps = op.maps_for((32, 32), torch.complex128, "cpu")[0].numpy()
    ref = SenseRecon(y[0].numpy(), maps, lamda=0.0, max_iter=20, show_pbar=False).run()
    np.testing.assert_allclose(ours, ref, atol=1e-6 * np.abs(ref).max())
    assert np.abs(np.abs(ours) - x[0, 0].numpy()).max() < 0.05  # 2x with 4 coils: the image comes back


def test_a_random_operator_can_sample_the_soft_step_measured_kspace_uses():
    rnd = RandomMultiCoilUndersampling(coils=4, phase=True, accelerations=[4], center_fractions=[0.08],
                                       projection_weight=1.0)
    op = rnd.sample(3)
    x = torch.rand(1, 1, 24, 24, 2)
    y = op.forward(torch.rand(1, 1, 24, 24, 2))
    assert op.projection_weight == 1.0 and op.params()["projection_weight"] == 1.0
    torch.testing.assert_close(op.data_consistency(x, y), op.data_consistency(x, y, weight=1.0))
    assert RandomMultiCoilUndersampling(coils=4).sample(3).projection_weight is None  # default: the hard projection
    with pytest.raises(ConfigError, match="projection_weight"):
        RandomMultiCoilUndersampling(coils=4, projection_weight=0)


@pytest.mark.parametrize("shape, chunk, per_slice", [((1, 1, 9, 14, 3), 4, True), ((2, 1, 12, 15), 5, False),
                                                      ((1, 1, 10, 13, 5), 20, True), ((2, 1, 11, 12, 3), 7, False)])
def test_solvers_in_hybrid_space_equal_the_generic_ones(shape, chunk, per_slice, monkeypatch):
    # the soft step, the projection and CG-SENSE run in hybrid space (readout transformed once, shifts folded into
    # the maps, blocks of lines or of whole slices): the same solutions as CG / CGLS on A and its adjoint
    from medldm.physics import sense_hybrid
    from medldm.physics._common import cg, cgls

    monkeypatch.setattr(sense_hybrid, "CHUNK_ELEMENTS", chunk * 4 * shape[3])  # blocks of lines or slices
    monkeypatch.setattr(sense_hybrid, "SOFT_STEP_TOL", None)  # converged to rounding, as the generic CG
    mask = np.zeros(shape[3], bool)
    mask[::3] = True
    mask[shape[3] // 2 - 1:shape[3] // 2 + 2] = True
    spatial = shape[2:]
    maps = torch.randn((4, *(spatial if per_slice else spatial[:2])), generator=gen(1), dtype=torch.complex128)
    op = MultiCoilCartesian(maps=maps, mask=mask, dc_iters=300)  # per-slice maps, or one set for every slice
    x, xt = rand_like_shape(shape, 2, torch.float64), rand_like_shape(shape, 3, torch.float64)
    y = op.A(xt) + 0.01 * torch.randn((shape[0], 4, *spatial), generator=gen(4), dtype=torch.complex128) * \
        torch.as_tensor(mask, dtype=torch.float64).reshape(1, 1, 1, -1, *([1] * (len(spatial) - 2)))
    for w in (0.5, 3.0):
        ref = cg(lambda v: v + w * op.adjoint(op.A(v)), x + w * op.adjoint(y), x, iters=300)
        assert torch.allclose(op.data_consistency(x, y, weight=w), ref, atol=1e-10)
    # the rounds of consistent_nonnegative stay in hybrid layout: the same iterates as the generic alternation
    generic = x
    for _ in range(4):
        generic = cg(lambda v: v + 0.5 * op.adjoint(op.A(v)), generic.clamp(min=0) + 0.5 * op.adjoint(y),
                     generic.clamp(min=0), iters=300)
    assert torch.allclose(op.consistent_nonnegative(x, y, weight=0.5, rounds=4), generic.clamp(min=0), atol=1e-10)
    ref = x + cgls(op.A, op.adjoint, y - op.A(x), like=x, iters=12)
    assert torch.allclose(MultiCoilCartesian(maps=maps, mask=mask, dc_iters=12).data_consistency(x, y), ref,
                          atol=1e-10)
    dims, m, mp = op._parts(y)
    from medldm.physics.fft import ifftnc

    fwd = lambda z: fftnc(z * mp, dims) * m  # noqa: E731
    adj = lambda k: (ifftnc(k * m, dims) * mp.conj()).sum(1, keepdim=True)  # noqa: E731
    assert torch.allclose(op.sense(y, iters=7), cgls(fwd, adj, y, like=adj(y), iters=7), atol=1e-10)


def test_the_soft_step_stops_near_its_solution(monkeypatch):
    # CG stops at a relative residual of SOFT_STEP_TOL (1e-5), not at float rounding: the step stays within 1e-4
    from medldm.physics import sense_hybrid

    op = _random(coils=4).sample(2)
    x = rand_like_shape((1, 1, 24, 20, 3), 0)
    y = op(rand_like_shape((1, 1, 24, 20, 3), 1))
    early = op.data_consistency(x, y, weight=1.0)
    monkeypatch.setattr(sense_hybrid, "SOFT_STEP_TOL", None)
    converged = op.data_consistency(x, y, weight=1.0)
    assert not torch.equal(early, converged)
    assert float((early - converged).abs().max()) < 1e-4 * float(converged.abs().max())


def test_an_operator_that_ran_data_consistency_still_pickles_and_checks_coils():
    # DataLoader workers send operators back after the guide's data consistency; the kept measurement is a cache
    import pickle

    op = _random(coils=3).sample(1)
    x = rand_like_shape((1, 1, 12, 10), 0)
    y = op(x)
    d = op.data_consistency(x, y, weight=1.0)
    assert torch.equal(op.data_consistency(x, y, weight=1.0), d)  # the kept measurement and A^H y: the same step
    y2 = y.clone()
    op.data_consistency(x, y2, weight=1.0)
    y2.mul_(2)  # changed in place: the kept measurement and its adjoint are stale, not reused
    fresh = _random(coils=3).sample(1)
    assert torch.allclose(op.data_consistency(x, y2, weight=1.0), fresh.data_consistency(x, y2, weight=1.0))
    again = pickle.loads(pickle.dumps(op))
    assert torch.allclose(again.data_consistency(x, y, weight=1.0), d)
    with pytest.raises(InputError, match="does not fit 3 coil maps"):
        op.data_consistency(x, y[:, :1], weight=1.0)

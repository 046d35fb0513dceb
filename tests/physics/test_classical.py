import numpy as np
import pytest
import torch

from medldm.physics import classical
from medldm.physics.classical import guide_image, guide_parts, guide_refusal, nlm_slices, tv_pocs, tv_pocs_warm
from medldm.slice_filters import nlm_settings, rician_unbias
from medldm.physics.kspace import RandomCartesianUndersampling
from tests.physics.conftest import phantom2d


def _recon(shape, seed=0):
    x = torch.cat([phantom2d(shape[-1]) * (1 + 0.1 * k) for k in range(shape[0])])
    op = RandomCartesianUndersampling(center_fractions=[0.08], accelerations=[4]).sample(seed)
    return x, op, op(x)


@pytest.mark.parametrize("solver", [tv_pocs, tv_pocs_warm])
def test_tv_pocs_ends_consistent_and_beats_zero_filled_on_a_piecewise_constant_phantom(solver):
    x, op, y = _recon((3, 1, 48, 48))
    zero_filled = op.naive_inverse(y)
    out = solver(zero_filled, lambda v: op.data_consistency(v, y), image_axes=(2, 3))
    assert op.residual(out, y) < 1e-5  # the projection comes last
    assert (out - x).pow(2).mean() < 0.5 * (zero_filled - x).pow(2).mean()


@pytest.mark.parametrize("solver", [tv_pocs, tv_pocs_warm])
def test_a_volume_and_its_slices_as_a_batch_get_the_same_tv(solver):
    """Training runs TV-POCS on (B, 1, H, W) patches, inference on (1, 1, X, Y, Z) volumes: same 2D TV."""
    x, _, _ = _recon((4, 1, 32, 32))
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    batch = solver(noisy, lambda v: v, image_axes=(2, 3), iterations=3, scale=1.0)
    vol = solver(noisy[:, 0].permute(1, 2, 0)[None, None], lambda v: v, image_axes=(2, 3), iterations=3, scale=1.0)
    torch.testing.assert_close(vol[0, 0].permute(2, 0, 1)[:, None], batch)
    along_x = solver(noisy[:, 0][None, None], lambda v: v, image_axes=(3, 4), iterations=3, scale=1.0)
    torch.testing.assert_close(along_x[0, 0][:, None], batch)
    assert (batch - noisy).abs().max() > 1e-3


def test_the_warm_dual_steps_are_chambolles_and_converge_to_skimages_tv_image():
    """_divergence is the adjoint of _gradient on duals that vanish where the gradient does (the far edge, as the
    update keeps them); many steps of tv_pocs_warm's update from a zero dual reach the same ROF solution as skimage
    run to convergence (the warm start changes where each round starts, not what it converges to)."""
    from skimage.restoration import denoise_tv_chambolle

    g = torch.Generator().manual_seed(0)
    u, p = torch.rand(2, 9, 11, generator=g, dtype=torch.float64), torch.rand(2, 2, 9, 11, generator=g, dtype=torch.float64)
    p[0, ..., -1, :], p[1, ..., :, -1] = 0, 0
    torch.testing.assert_close((classical._gradient(u) * p).sum(), (u * classical._divergence(p)).sum())
    img = torch.rand(2, 1, 24, 30, generator=g)
    ref = denoise_tv_chambolle(img[:, 0].numpy(), weight=0.1, channel_axis=0, eps=1e-9, max_num_iter=3000)
    out = tv_pocs_warm(img, lambda v: v, image_axes=(2, 3), iterations=1, inner=3000, weight=0.1, scale=1.0)
    np.testing.assert_allclose(out[:, 0].numpy(), ref, atol=5e-3)
    as_guide = guide_image("tv-pocs-warm", img, image_axes=(2, 3), project=lambda v: v, scale=1.0)
    torch.testing.assert_close(as_guide, tv_pocs_warm(img, lambda v: v, image_axes=(2, 3), scale=1.0))


def test_guide_image_is_the_naive_inverse_itself_or_refused_when_unknown():
    x, op, y = _recon((1, 1, 32, 32))
    naive = op.naive_inverse(y)
    assert guide_image("naive", naive, image_axes=(2, 3)) is naive
    tv = guide_image("tv-pocs", naive, project=lambda v: op.data_consistency(v, y), image_axes=(2, 3))
    assert tv.shape == naive.shape and not torch.equal(tv, naive)
    smooth = guide_image("nlm", naive, sigma=0.05, image_axes=(2, 3))
    assert smooth.shape == naive.shape and not torch.equal(smooth, naive)
    with pytest.raises(ValueError, match="unknown refiner guide"):
        guide_image("bm3d", naive, image_axes=(2, 3))
    with pytest.raises(ValueError, match="projection"):
        guide_image("tv-pocs", naive, image_axes=(2, 3))
    with pytest.raises(ValueError, match="sigma"):
        guide_image("nlm", naive, image_axes=(2, 3))
    with pytest.raises(ValueError, match="image_axes"):
        tv_pocs(naive, lambda v: v, image_axes=(1, 2))


def test_a_composite_guide_stacks_its_parts_as_channels_in_order():
    x, op, y = _recon((2, 1, 32, 32))
    naive = op.naive_inverse(y)
    project = lambda v: op.data_consistency(v, y)  # noqa: E731
    both = guide_image("naive+tv-pocs", naive, project=project, image_axes=(2, 3))
    assert both.shape == (2, 2, 32, 32)
    torch.testing.assert_close(both[:, :1], naive)
    torch.testing.assert_close(both[:, 1:], guide_image("tv-pocs", naive, project=project, image_axes=(2, 3)))
    assert guide_parts("naive+tv-pocs") == ["naive", "tv-pocs"] and guide_parts("nlm") == ["nlm"]
    for bad in ("naive+naive", "naive+bm3d", "naive+"):
        with pytest.raises(ValueError, match="unknown refiner guide"):
            guide_parts(bad)
    with pytest.raises(ValueError, match="projection"):  # each part keeps its own requirements
        guide_image("naive+tv-pocs", naive, image_axes=(2, 3))


def test_nlm_slices_denoise_each_image_with_its_own_sigma_whatever_the_layout():
    x, _, _ = _recon((3, 1, 40, 40))
    sigma = torch.tensor([0.02, 0.05, 0.1])
    noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    batch = nlm_slices(noisy, sigma.tolist(), image_axes=(2, 3))
    assert ((batch - x) ** 2).mean() < 0.5 * ((noisy - x) ** 2).mean()
    one = nlm_slices(noisy[1:2], 0.05, image_axes=(2, 3))
    torch.testing.assert_close(one, batch[1:2])
    vol = nlm_slices(noisy[1:2].unsqueeze(3), 0.05, image_axes=(2, 4))  # (1, 1, H, 1, W): one image along Y
    torch.testing.assert_close(vol[:, :, :, 0], batch[1:2])


def test_guide_refusal_is_the_one_rule_of_where_a_guide_runs():
    assert guide_refusal("naive", "denoise", "CT") is None
    assert guide_refusal("tv-pocs", "recon", "MR") is None and guide_refusal("tv-pocs", "sr", "CT") is None
    assert "recon and sr" in guide_refusal("tv-pocs", "denoise", "MR")
    assert guide_refusal("tv-pocs-warm", "recon", "MR") is None and "tv-pocs-warm projects" in guide_refusal(
        "tv-pocs-warm", "denoise", "MR")
    assert guide_refusal("nlm", "denoise", "MR") is None
    assert "Rician" in guide_refusal("nlm", "denoise", "CT") and "Rician" in guide_refusal("nlm", "recon", "MR")
    assert guide_refusal("naive+tv-pocs", "recon", "CT") is None  # a composite runs where all its parts run
    assert "recon and sr" in guide_refusal("naive+tv-pocs", "denoise", "CT")


def test_rician_unbias_removes_the_grey_background_that_averaged_magnitudes_leave():
    g = torch.Generator().manual_seed(3)
    signal = torch.zeros(1, 1, 48, 48)
    signal[..., 12:36, 12:36] = 1.0  # a bright square in air
    sigma = 0.1
    noisy = torch.sqrt((signal + sigma * torch.randn(signal.shape, generator=g)) ** 2
                       + (sigma * torch.randn(signal.shape, generator=g)) ** 2)
    air = signal == 0
    assert noisy[air].mean() > 1.1 * sigma  # the Rice mean in air: sigma sqrt(pi/2)
    out = nlm_slices(noisy, sigma, image_axes=(2, 3))
    assert out[air].mean() < 0.3 * sigma
    assert abs(out[~air].mean() - 1.0) < 0.02  # the signal keeps its level
    assert rician_unbias(np.array([0.0, -3.0], np.float32), 0.5).tolist() == [0.0, 0.0]  # an undershoot is no signal


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tv_of_a_stack_with_constant_planes_equals_skimage(dtype):
    """Constant planes (air at a volume's ends) skip skimage's 200 idle iterations and come back unchanged, which
    is what skimage returns for them; the other planes are skimage's own result."""
    from skimage.restoration import denoise_tv_chambolle

    from medldm.physics.classical import tv_slices

    images = np.random.default_rng(1).random((6, 24, 20)).astype(dtype)
    images[[0, 5]] = 0.0
    images[2] = 0.25
    ref = denoise_tv_chambolle(images, weight=0.05, channel_axis=0)
    out = tv_slices(images, 0.05)
    assert out.dtype == ref.dtype and out is not images
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(tv_slices(images[[0, 2]], 0.05), images[[0, 2]])  # all constant: nothing to run


@pytest.mark.slow
def test_guides_of_a_volume_over_worker_processes_are_identical_to_one_process():
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

    from medldm.physics.classical import PARALLEL_MIN_IMAGES, tv_slices

    images = np.random.default_rng(0).random((PARALLEL_MIN_IMAGES + 5, 24, 20)).astype(np.float32)
    np.testing.assert_array_equal(tv_slices(images, 0.05), denoise_tv_chambolle(images, weight=0.05, channel_axis=0))
    np.testing.assert_array_equal(tv_slices(images[:3], 0.05), denoise_tv_chambolle(images[:3], weight=0.05, channel_axis=0))
    # the NLM guide's slices likewise: the same images as one after another in this process
    x = torch.from_numpy(images)[None, None]  # (1, 1, N, H, W): images along axes 3 and 4
    one_by_one = np.stack([rician_unbias(denoise_nl_means(im, **nlm_settings(0.1)), 0.1) for im in images])
    np.testing.assert_array_equal(nlm_slices(x, 0.1, image_axes=(3, 4))[0, 0].numpy(), one_by_one.astype(np.float32))

import numpy as np
import pytest
import torch

from medldm.errors import InputError, ModelError
from medldm.io.volume import Volume
from medldm.sampling.measurement import simulate
from medldm.sampling.reconstructor import Reconstructor
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle


def volume(shape=(21, 18, 9), spacing=(1.0, 1.0, 1.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10, 4, 2.5]
    return Volume((phantom(shape) * 300 + 10)[None].astype(np.float32), affine, "MR")


def test_denoise_keeps_geometry_odd_sizes(models):
    vol = volume()
    res = models["denoise"](vol, steps=2, seed=1)
    assert res.volume.array.shape == vol.array.shape
    np.testing.assert_array_equal(res.volume.affine, vol.affine)
    assert res.provenance["input_sha256"] and res.provenance["task"] == "denoise"
    assert res.timings["total"] > 0
    est = res.provenance["noise_estimate"]  # how sigma was found, for whoever reads the output later
    assert est["method"] in ("air", "foreground", "background-only") and est["sigma"] == res.provenance["operator"]["sigma"]
    given = models["denoise"](vol, steps=1, sigma=12.5).provenance
    assert given["noise_estimate"] == {"sigma": 12.5, "method": "given"} and given["operator"]["sigma"] == 12.5


def test_mr_outputs_are_non_negative_and_ct_keeps_its_sign(models):
    """Magnitude MR has no negative voxels: DC and x >= 0 alternate (POCS) and x >= 0 comes last; the residual
    stays small and falls with the rounds; nonnegative=False keeps the exact projection (#30)."""
    from medldm.physics.base import Operator

    m = simulate(volume((24, 20, 4)), "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    exact = models["recon"](m, steps=1, nonnegative=False)
    clipped = models["recon"](m, steps=1)
    assert exact.volume.array.min() < 0 <= clipped.volume.array.min()  # the tiny model rings below 0
    assert exact.residual < 1e-5 and clipped.residual < 0.05
    assert clipped.provenance["parameters"]["nonnegative_rounds"] == 32
    x = torch.from_numpy(exact.volume.array)[None]
    few, many = (Operator.consistent_nonnegative(m.operator, x, m.y, rounds=r) for r in (1, 64))
    assert m.operator.residual(many, m.y) < m.operator.residual(few, m.y) and float(many.min()) >= 0
    denoised = models["denoise"](volume(), steps=1)
    assert denoised.volume.array.min() >= 0 and denoised.provenance["parameters"]["nonnegative_rounds"] == 0


def test_same_seed_same_output_and_batch_size_does_not_matter(models):
    vol = volume()
    # refine=False: the latent sampling path alone, where the seed matters
    a = models["denoise"](vol, steps=2, seed=3, batch_size=4, refine=False).volume.array
    b = models["denoise"](vol, steps=2, seed=3, batch_size=9, refine=False).volume.array
    c = models["denoise"](vol, steps=2, seed=4, refine=False).volume.array
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)  # batch shape changes float32 summation order only
    assert not np.allclose(a, c)


def test_air_planes_skip_the_networks_and_the_other_planes_do_not_change(models):
    """Constant planes (a padded volume's air: an all-zero measurement) are passed through without a network run;
    every other plane gets the noise it would have had (drawn by plane index), so it is unchanged."""
    rec = models["recon"]
    base = volume((24, 20, 6))
    padded = base.with_array(np.concatenate([np.zeros_like(base.array[..., :2]), base.array,
                                             np.zeros_like(base.array[..., :3])], -1), base.affine)
    calls = []
    hook = rec.bundle.unet.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        kw = dict(steps=2, samples=2, seed=5, dc=False, use_diffusion=True)
        full = rec(simulate(padded, "recon", seed=0, accelerations=[4], center_fractions=[0.08]), **kw)
    finally:
        hook.remove()
    varying = int((np.ptp(base.array[0], axis=(0, 1)) > 0).sum())  # the phantom's own end planes are constant too
    assert 0 < varying < 6
    assert sum(calls) == 2 * 2 * varying  # samples x steps x the planes with structure, not all 11
    assert full.provenance["constant_planes_passed_through"] == 11 - varying
    out = full.volume.array[0]
    assert not out[..., :2].any() and not out[..., -3:].any() and not full.uncertainty.array[0][..., -3:].any()
    # with and without skipping, on the same normalised slices (the sampler itself; a whole volume's
    # normalisation would move with the air planes' share)
    from medldm.sampling.slicewise import restore_slices, varying_slices

    cond = torch.rand(8, 1, 16, 16)
    guide = cond.flip(-1) * 0.5  # the refiner's own image, constant where cond is
    cond[[0, 3, 7]] = guide[[0, 3, 7]] = 0.0
    guide[5] = 0.0  # constant here only: plane 5 has structure in cond, so it runs
    seen = []

    def correct(x, idx):  # latent DC that depends on which planes it is handed (non-contiguous batches here)
        seen.append(idx.tolist())
        return x + 0.01 * idx.to(x)[:, None, None, None]

    common = dict(samples=2, steps=2, seed=1, batch_size=3, refine=True, guide=guide, correct=correct,
                  correct_every=1, refine_dc=correct)
    run = varying_slices(cond, guide)
    assert run.tolist() == [1, 2, 4, 5, 6]
    skipped = restore_slices(rec.bundle, cond, run_slices=run, **common)
    assert sorted({i for batch in seen for i in batch}) == [1, 2, 4, 5, 6] and [1, 2, 4] in seen
    every = restore_slices(rec.bundle, cond, **common)
    runs = [1, 2, 4, 5, 6]
    for key in ("decoded", "output"):
        torch.testing.assert_close(skipped[key][:, runs], every[key][:, runs], rtol=1e-4, atol=1e-5)
    assert not skipped["output"][:, [0, 3, 7]].any() and not skipped["decoded"][:, [0, 3, 7]].any()
    assert every["decoded"][:, [0, 3, 7]].any()  # the networks would have made something of them
    # a guide constant at another value than cond's does not make the plane skippable
    assert varying_slices(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)).tolist() == [0, 1]


def test_uncertainty_zero_when_deterministic_positive_when_not(models):
    vol = volume()
    det = models["denoise"](vol, steps=2, samples=3, use_diffusion=False)
    assert np.abs(det.uncertainty.array).max() < 1e-5
    sto = models["denoise"](vol, steps=2, samples=3, refine=False)
    assert sto.uncertainty.array.mean() > 0


def test_recon_data_consistency_lowers_the_residual(models):
    truth = volume((24, 20, 4))
    m = simulate(truth, "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    off = models["recon"](m, steps=2, dc=False)
    on = models["recon"](m, steps=2, dc=True)
    assert on.residual < 1e-3 < off.residual
    latent = models["recon"](m, steps=4, dc=False, latent_dc_every=2)
    assert latent.volume.array.shape == truth.array.shape


def test_sr_output_grid_covers_the_input_field_of_view(models):
    coarse = volume((20, 16, 5), spacing=(1.0, 1.0, 4.0))
    res = models["sr"](coarse, steps=2)
    assert res.volume.array.shape == (1, 20, 16, 20)
    fine = res.volume.affine
    assert np.allclose(np.linalg.norm(fine[:3, :3], axis=0), [1, 1, 1])
    # the first coarse voxel's lower edge coincides with the first fine voxel's lower edge
    edge_coarse = coarse.affine @ np.array([0, 0, -0.5, 1])
    edge_fine = fine @ np.array([0, 0, -0.5, 1])
    np.testing.assert_allclose(edge_coarse, edge_fine, atol=1e-9)
    assert res.residual < 1e-4


def test_task_mismatch_and_bad_inputs(models):
    with pytest.raises(InputError, match="k-space"):
        models["recon"](volume(), steps=1)
    with pytest.raises(InputError, match="NaN"):
        bad = volume()
        bad.array[0, 0, 0, 0] = np.nan
        models["denoise"](bad, steps=1)
    with pytest.raises(ModelError):
        Reconstructor.load("no-such-model")
    with pytest.raises(ValueError):
        models["denoise"](volume(), steps=0)
    for shape in [(1, 1, 1), (1, 1, 9)]:  # a voxel or a line is not an image: say the minimum size
        with pytest.raises(InputError, match=r"at least 2 voxels along two of its axes"):
            models["denoise"](Volume(np.ones((1, *shape), np.float32), np.eye(4), "MR"), steps=1)


def test_measured_kspace_uses_the_magnitude(models):
    from medldm.sampling.measurement import from_kspace

    img = torch.as_tensor(phantom((16, 16, 3)))
    k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img.permute(2, 0, 1) * 1j, dim=(-2, -1)), norm="ortho"),
                           dim=(-2, -1))  # purely imaginary image: its real part is zero, its magnitude is not
    m = from_kspace(k.numpy(), np.ones(16))
    np.testing.assert_allclose(m.naive_inverse()[0, 0].numpy(), img.numpy(), atol=1e-5)


def test_latent_optimisation_lowers_the_data_residual(models):
    truth = volume((24, 20, 4))
    m = simulate(truth, "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    plain = models["recon"](m, steps=2, dc=False, refine=False)
    opt = models["recon"](m, steps=2, dc=False, refine=False, latent_opt_steps=15)
    assert opt.residual < plain.residual
    soft = models["recon"](m, steps=2, dc=True, dc_weight=1.0)
    hard = models["recon"](m, steps=2, dc=True)
    assert hard.residual < soft.residual < models["recon"](m, steps=2, dc=False).residual


def test_untrained_refiner_is_identity_on_the_naive_inverse(tmp_path):
    from medldm.models.builders import build_refiner
    from medldm.models.bundle import load_bundle, save_bundle

    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    bundle = load_bundle(folder)
    bundle.refiner = build_refiner(bundle.config.refiner, 2)  # freshly initialised
    rec = Reconstructor(load_bundle(save_bundle(bundle, tmp_path / "m2")), device="cpu")
    vol = volume()
    out = rec(vol, steps=2, sigma=1.0).volume.array
    np.testing.assert_allclose(out, vol.array, rtol=1e-5, atol=1e-3)


def test_fastmri_file_is_read_as_its_kspace(models, tmp_path):
    import h5py

    truth = volume((24, 20, 4))
    m = simulate(truth, "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["kspace"] = m.y[0, 0].permute(2, 0, 1).numpy().astype(np.complex64)
    res = models["recon"](tmp_path / "scan.h5", steps=2)
    # measured k-space: its image phase is estimated from the centre lines (here 2) and one projection of a few
    # iterations ends it (MultiCoilCartesian), so the residual is small, not the 1e-7 of an exact projection
    assert res.volume.array.shape == truth.array.shape and res.residual < 5e-3


@pytest.mark.parametrize("task", ["recon", "sr"])
def test_a_cascaded_refiner_projects_between_passes_and_ends_consistent(models, task, tmp_path):
    """Two refiner passes with DC between them: a different output from one pass, still consistent with y,
    and refused where no measurement is at hand (restore_slices without refine_dc, the 3D path)."""
    from medldm.models.bundle import load_bundle
    from medldm.sampling.slicewise import restore_slices
    from medldm.sampling.volumetric import restore_volume
    from tests.helpers import make_tiny_bundle

    bundle = load_bundle(make_tiny_bundle(tmp_path / "one", task, "MR"))
    torch.manual_seed(3)
    torch.nn.init.normal_(bundle.refiner.final_conv.weight, std=0.05)  # a refiner that changes its input
    one = Reconstructor(bundle, device="cpu")
    cascaded = load_bundle(make_tiny_bundle(tmp_path / "two", task, "MR"))
    cascaded.refiner.load_state_dict(bundle.refiner.state_dict())
    cascaded.config.refiner.cascades = 2
    assert cascaded.refiner_cascades == 2 and bundle.refiner_cascades == 1
    if task == "recon":
        m = simulate(volume((24, 20, 4)), "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    else:
        m = one.measurement_for(volume((20, 16, 5), spacing=(1.0, 1.0, 2.0)))
    a, b = one(m, steps=2), Reconstructor(cascaded, device="cpu")(m, steps=2)
    assert a.residual < 1e-3 and b.residual < 1e-3
    assert np.abs(a.volume.array - b.volume.array).max() > 1e-4
    with pytest.raises(ModelError, match="measurement"):
        restore_slices(cascaded, torch.rand(2, 1, 32, 32), samples=1, steps=1, seed=0, batch_size=2)
    three_d = load_bundle(make_tiny_bundle(tmp_path / "3d", task, "MR", spatial_dims=3))
    three_d.config.refiner.cascades = 2
    with pytest.raises(ModelError, match="2D models only"):
        restore_volume(three_d, torch.rand(1, 1, 32, 32, 16), samples=1, steps=1, seed=0)


@pytest.mark.slow
def test_a_tv_pocs_guided_refiner_starts_from_the_tv_pocs_baseline(tmp_path):
    """An untrained refiner adds nothing to its guide: with ``guide: tv-pocs`` the default output is the
    evaluation's TV-POCS baseline, with the naive guide the zero-filled image made consistent; denoising has no
    guide to run."""
    from medldm.evaluation.baselines import tv_pocs
    from medldm.models.bundle import load_bundle

    m = simulate(volume((24, 20, 4)), "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    bundle = load_bundle(make_tiny_bundle(tmp_path / "tv", "recon", "MR"))
    assert not bundle.refiner.final_conv.weight.any() and bundle.refiner_residual_on == "naive"
    plain = Reconstructor(bundle, device="cpu")(m, steps=1, nonnegative=False).volume.array[0]
    bundle.config.refiner.guide = "tv-pocs"
    guided = Reconstructor(bundle, device="cpu")(m, steps=1)  # DC and x >= 0 at the end, as the baseline
    scale = float(np.abs(plain).max())
    zero_filled_dc = m.operator.data_consistency(m.naive_inverse(), m.y)[0, 0].numpy()
    np.testing.assert_allclose(plain, zero_filled_dc, atol=1e-4 * scale)
    np.testing.assert_allclose(guided.volume.array[0], tv_pocs(m), atol=1e-4 * scale)
    assert guided.residual < 1e-2 and np.abs(guided.volume.array[0] - plain).max() > 1e-2 * scale
    assert guided.provenance["parameters"]["refiner_guide"] == "tv-pocs"
    denoiser = load_bundle(make_tiny_bundle(tmp_path / "dn", "denoise", "MR"))
    denoiser.config.refiner.guide = "tv-pocs"
    with pytest.raises(ModelError, match="tv-pocs"):
        Reconstructor(denoiser, device="cpu")(volume(), steps=1)
    assert Reconstructor(denoiser, device="cpu")(volume(), steps=1, refine=False).volume.array.shape[1:] == (21, 18, 9)
    bundle.config.refiner.guide = "nlm"
    with pytest.raises(ModelError, match="nlm"):
        Reconstructor(bundle, device="cpu")(m, steps=1)


@pytest.mark.slow  # ~5 s per axis (a TV-POCS guide through a tiny model)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_two_image_guide_reaches_the_refiner_as_channels_and_the_correction_goes_to_the_naive_inverse(tmp_path, axis):
    """``guide: naive+tv-pocs``: the refiner sees (decoded, naive, TV-POCS) slices along the model's axis; a
    refiner that returns TV-POCS minus its first guide image makes the output the TV-POCS of those slices, so
    both images arrive, in order."""
    from medldm.models.bundle import load_bundle
    from medldm.physics.classical import tv_pocs

    m = simulate(volume((24, 20, 16)), "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    bundle = load_bundle(make_tiny_bundle(tmp_path / "both", "recon", "MR", slice_axis=axis))
    bundle.config.refiner.guide = "naive+tv-pocs"
    seen = []

    class TVMinusNaive(torch.nn.Module):
        def forward(self, inp):
            seen.append(inp.shape[1])
            return inp[:, 2:3] - inp[:, 1:2]

    bundle.refiner = TVMinusNaive()
    out = Reconstructor(bundle, device="cpu")(m, steps=1, nonnegative=False)
    scale = float(np.abs(out.volume.array).max())
    planes = tuple(2 + a for a in range(3) if a != axis)
    expected = tv_pocs(m.naive_inverse().float(), lambda x: m.operator.data_consistency(x, m.y), image_axes=planes)
    np.testing.assert_allclose(out.volume.array[0], expected[0, 0].numpy(), atol=1e-4 * scale)
    assert set(seen) == {3} and out.provenance["parameters"]["refiner_guide"] == "naive+tv-pocs"


def test_an_nlm_guided_refiner_starts_from_the_non_local_means_of_each_slice(tmp_path):
    from medldm.models.bundle import load_bundle
    from medldm.physics.classical import nlm_slices

    bundle = load_bundle(make_tiny_bundle(tmp_path / "dn", "denoise", "MR"))
    bundle.config.refiner.guide = "nlm"
    noisy = volume()
    rng = np.random.default_rng(0)
    noisy.array = noisy.array + rng.normal(0, 15, noisy.array.shape).astype(np.float32)
    out = Reconstructor(bundle, device="cpu")(noisy, steps=1, sigma=15.0).volume.array[0]
    expected = nlm_slices(torch.as_tensor(noisy.array)[None], 15.0, image_axes=(2, 3))[0, 0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3 * float(np.abs(expected).max()))
    assert np.abs(out - noisy.array[0]).max() > 1.0
    ct = load_bundle(make_tiny_bundle(tmp_path / "ct", "denoise", "CT"))
    ct.config.refiner.guide = "nlm"  # trained NLM guides are MR-only: a CT image noise is not Rician
    ct_vol = Volume(noisy.array * 0 + 40.0, noisy.affine, "CT")
    with pytest.raises(ModelError, match="nlm"):
        Reconstructor(ct, device="cpu")(ct_vol, steps=1, sigma=10.0)


def test_the_default_path_follows_the_model_and_samples_always_sample(tmp_path):
    from medldm.models.bundle import load_bundle, save_bundle

    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    bundle = load_bundle(folder)
    bundle.config = bundle.config.model_copy(update={"default_use_diffusion": False})
    rec = Reconstructor.load(save_bundle(bundle, tmp_path / "nodiff"), device="cpu")
    vol = volume()
    one = rec(vol, steps=2)
    assert one.provenance["parameters"]["use_diffusion"] is False
    np.testing.assert_array_equal(one.volume.array, rec(vol, steps=2, use_diffusion=False).volume.array)
    assert rec(vol, steps=2, seed=1).volume.array.tobytes() == one.volume.array.tobytes()  # no sample: seed-free
    two = rec(vol, steps=2, samples=2, refine=False)  # the untrained refiner would flatten the spread
    assert two.provenance["parameters"]["use_diffusion"] is True and two.uncertainty.array.mean() > 0
    assert rec(vol, steps=2, use_diffusion=True).provenance["parameters"]["use_diffusion"] is True


def test_a_guide_fitted_latent_path_sees_the_input_at_the_clean_estimates_intensity(tmp_path):
    """latent_fit_on "guide": the VAE gets the input divided by the NLM guide's percentile (noise lifts the
    input's), its decode is scaled back; the pixel path keeps the input's normalisation."""
    from medldm.models.bundle import load_bundle
    from medldm.physics.classical import nlm_slices
    from medldm.sampling.slicewise import restore_slices

    bundle = load_bundle(make_tiny_bundle(tmp_path / "dn", "denoise", "MR"))
    bundle.config.refiner.guide = "nlm"
    bundle.config.normalisation.latent_fit_on = "guide"
    noisy = volume()
    noisy.array = noisy.array + np.random.default_rng(0).normal(0, 15, noisy.array.shape).astype(np.float32)
    out = Reconstructor(bundle, device="cpu")(noisy, steps=1, sigma=15.0, refine=False, use_diffusion=False,
                                              dc=False, nonnegative=False)
    x = torch.as_tensor(noisy.array[0])
    scale = float(np.percentile(noisy.array, 99.5))
    factor = float(np.percentile(nlm_slices(x[None, None] / scale, 15.0 / scale, image_axes=(2, 3)).numpy(), 99.5))
    assert 0.5 < factor < 1.0 and out.provenance["latent_intensity"] == {"fit_on": "guide", "factor": pytest.approx(factor),
                                                                 "reference": "nlm"}
    slices = (x / scale).movedim(2, 0)[:, None]
    decoded = restore_slices(bundle, slices / factor, samples=1, steps=1, seed=0, batch_size=16, refine=False,
                             use_diffusion=False)["decoded"][0, :, 0].movedim(0, 2)
    np.testing.assert_allclose(out.volume.array[0], (decoded * factor * scale).numpy(), rtol=1e-4, atol=1e-3)

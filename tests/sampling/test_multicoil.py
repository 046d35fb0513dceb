"""Measured k-space with coils and image phase: the measurement, its data consistency, files end to end."""

import numpy as np
import pytest
import torch

from medldm.errors import ConfigError, InputError
from medldm.io.volume import Volume
from medldm.physics.coils import MAP_FIT_ROUNDS
from medldm.physics.fft import fftnc
from medldm.physics.kspace import phase_map
from medldm.sampling.measurement import as_measured, from_kspace, from_kspace_file, simulate
from tests.sampling.test_reconstructor import phantom


def _psnr(truth, x):
    return 10 * np.log10(truth.max() ** 2 / np.mean((truth - x) ** 2))


def test_single_coil_phase_no_longer_hurts_data_consistency():
    # A magnitude image with a smooth phase, measured on one coil: the phase is estimated from the centre lines
    # and carried by the operator, so data consistency improves the zero-filled magnitude instead of forcing a
    # real image onto complex data (what the single-coil reader did before).
    truth = phantom((32, 32, 3))
    phi = phase_map([0.4, 0.8, -0.6, 0.3, 0.2, -0.2], (32, 32), dtype=torch.float64).numpy()
    image = truth * np.exp(1j * phi)[..., None]
    k = fftnc(torch.from_numpy(np.moveaxis(image, -1, 0)), (-2, -1)).numpy()
    mask = np.zeros(32, bool)
    mask[::2] = True
    mask[12:21] = True
    m = from_kspace(k * mask, mask)
    zero_filled = m.naive_inverse()[0, 0].numpy()
    dc = m.operator.consistent_nonnegative(m.naive_inverse(), m.y)[0, 0].numpy()
    assert _psnr(truth, dc) > _psnr(truth, zero_filled) + 1.0
    from medldm.physics.kspace import CartesianUndersampling  # the old model: no phase, a real image

    old = CartesianUndersampling(mask=mask).consistent_nonnegative(m.naive_inverse(), m.y[:, :1])[0, 0].numpy()
    assert _psnr(truth, dc) > _psnr(truth, old) + 1.0


def test_simulated_multicoil_measured_like_a_file():
    truth = Volume(phantom((32, 32, 3))[None].astype(np.float32), np.eye(4), "MR")
    m0 = simulate(truth, "recon", 0, operator="MultiCoilCartesian", coils=4, accelerations=[2],
                  center_fractions=[0.3], mask_type="equispaced", phase=True)
    assert tuple(m0.y.shape) == (1, 4, 32, 32, 3)
    m = as_measured(m0)
    assert m.meta["coils"] == 4 and m.meta["measured_kspace"] and m.meta["seed"] == 0
    assert torch.equal(m.y, m0.y)
    x = m.naive_inverse()[0, 0].numpy()
    assert _psnr(truth.array[0], x) > 15  # the coil combination is an image of the object, not noise


def test_multicoil_reconstruction_end_to_end(models, tmp_path):
    import h5py

    truth = Volume(phantom((24, 20, 3))[None].astype(np.float32), np.eye(4), "MR")
    m0 = simulate(truth, "recon", 1, operator="MultiCoilCartesian", coils=3, accelerations=[2],
                  center_fractions=[0.3], mask_type="equispaced", phase=True)
    kspace = m0.y[0].permute(3, 0, 1, 2).numpy()  # fastMRI multi-coil layout [slices, coils, H, W]
    with h5py.File(tmp_path / "mc.h5", "w") as f:
        f["kspace"] = kspace
        f.attrs["spacing"] = [1.0, 1.0, 3.0]
    m = from_kspace_file(tmp_path / "mc.h5")
    res = models["recon"](m, steps=1)
    assert res.volume.array.shape == (1, 24, 20, 3) and res.volume.spacing == (1.0, 1.0, 3.0)
    # DC in the multi-coil model (estimated maps of a 24 x 20 phantom leave a floor: it halves the residual)
    assert res.residual < 0.6 * models["recon"](m, steps=1, dc=False).residual
    assert res.provenance["operator"]["coils"] == 3
    assert "fitted to the measured lines" in res.provenance["operator"]["maps_recipe"]["coil_maps"]
    direct = from_kspace_file(tmp_path / "mc.h5", map_fit_rounds=0).operator
    assert direct.maps_recipe["coil_maps"] == "direct calibration"
    again = models["recon"](tmp_path / "mc.h5", steps=1)  # a path works as well as a measurement
    np.testing.assert_allclose(again.volume.array, res.volume.array, atol=1e-5)


def test_map_fit_rounds():
    truth = Volume(phantom((24, 20, 3))[None].astype(np.float32), np.eye(4), "MR")
    m0 = simulate(truth, "recon", 1, operator="MultiCoilCartesian", coils=3, accelerations=[2],
                  center_fractions=[0.3], mask_type="equispaced", phase=True)
    direct = as_measured(m0, map_fit_rounds=0).operator
    assert direct.maps_recipe["coil_maps"] == "direct calibration"
    fitted = as_measured(m0).operator
    assert fitted.maps_recipe["coil_maps"].startswith(f"direct calibration, then {MAP_FIT_ROUNDS} round(s) fitted")
    assert fitted.params()["maps_sha256"] != direct.params()["maps_sha256"]  # other maps, and provenance says so
    with pytest.raises(ConfigError, match="map_fit_rounds"):
        as_measured(m0, map_fit_rounds=-1)
    k = m0.y[0, :1].permute(3, 0, 1, 2).numpy()  # one coil: the phase alone, nothing fitted
    one = from_kspace(k, np.asarray(m0.operator.mask_for((20,))))
    assert one.operator.maps_recipe["coil_maps"] == "none (one coil)"


def test_recon_matrix_crops_the_output(models):
    truth = Volume(phantom((24, 20, 3))[None].astype(np.float32), np.eye(4), "MR")
    m = as_measured(simulate(truth, "recon", 2, operator="MultiCoilCartesian", coils=2, accelerations=[2],
                             center_fractions=[0.3], mask_type="equispaced"))
    m.meta["recon_matrix"] = (12, 20)  # the readout oversampled twice
    res = models["recon"](m, steps=1)
    assert res.volume.array.shape == (1, 12, 20, 3)
    np.testing.assert_allclose(res.volume.affine[:3, 3], [6.0, 0.0, 0.0])  # the first kept voxel
    assert res.extras["naive_inverse"].shape == (1, 12, 20, 3)


def test_bad_kspace_input():
    with pytest.raises(InputError, match="complex"):
        from_kspace(np.ones((2, 3, 8, 8), np.float32), None)
    with pytest.raises(InputError, match="coils >= 1"):
        from_kspace(np.ones((2, 0, 8, 8), np.complex64), None)
    with pytest.raises(InputError, match="does not fit"):
        from_kspace(np.ones((2, 3, 8, 8), np.complex64), np.ones(6, bool))
    k = np.ones((1, 2, 8, 8), np.complex64)
    k[..., 1::2] = 0
    with pytest.raises(InputError, match="fully sampled line"):
        from_kspace(k, None)  # no calibration line at the centre
    k = np.ones((1, 2, 8, 8), np.complex64)
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        from_kspace(k, None)


def test_an_image_given_to_a_recon_model_says_where_kspace_goes(models):
    image = Volume(phantom((16, 16, 3))[None].astype(np.float32), np.eye(4), "MR")
    with pytest.raises(InputError, match=r"k-space \.h5 \(fastMRI or ISMRMRD\).*serving takes images only"):
        models["recon"](image, steps=1)


def test_an_oversampled_readout_is_cropped_before_reconstruction(models, tmp_path, monkeypatch):
    # a fastMRI header asks for the central half of the readout: the file's k-space becomes that of the kept rows
    # (exact: the readout is fully sampled), so everything runs on half the plane and the output grid is unchanged.
    # Exact for the maps of direct calibration; fitted maps follow a TV-POCS image, which a crop changes
    import h5py

    monkeypatch.setattr("medldm.physics.coils.MAP_FIT_ROUNDS", 0)

    from medldm.physics.sense import MultiCoilCartesian

    head = np.zeros((48, 20, 3), np.float32)
    head[12:36] = phantom((24, 20, 3))
    m0 = simulate(Volume(head[None], np.eye(4), "MR"), "recon", 1, operator="MultiCoilCartesian", coils=3,
                  accelerations=[2], center_fractions=[0.3], mask_type="equispaced", phase=True)
    header = ('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>'
              '<matrixSize><x>48</x><y>20</y><z>1</z></matrixSize><fieldOfView_mm><x>48</x><y>20</y><z>3</z>'
              '</fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>24</x><y>20</y><z>1</z></matrixSize>'
              '<fieldOfView_mm><x>24</x><y>20</y><z>3</z></fieldOfView_mm></reconSpace></encoding></ismrmrdHeader>')
    with h5py.File(tmp_path / "oversampled.h5", "w") as f:
        f["kspace"] = m0.y[0].permute(3, 0, 1, 2).numpy()
        f["ismrmrd_header"] = header.encode()
    m = from_kspace_file(tmp_path / "oversampled.h5")
    whole = as_measured(m0)
    assert tuple(m.y.shape) == (1, 3, 24, 20, 3) and m.meta["readout_cropped_from"] == 48
    np.testing.assert_allclose(m.affine[:3, 3], [12.0, 0.0, 0.0])  # the first kept row, as the output crop had it
    # data consistency on the kept rows is what it is in the whole field of view
    x = torch.rand((1, 1, 24, 20, 3), generator=torch.Generator().manual_seed(0))
    padded = torch.zeros((1, 1, 48, 20, 3))
    padded[:, :, 12:36] = x
    assert isinstance(m.operator, MultiCoilCartesian)
    torch.testing.assert_close(m.operator.data_consistency(x, m.y),
                               whole.operator.data_consistency(padded, whole.y)[:, :, 12:36], atol=1e-4, rtol=0)
    res = models["recon"](m, steps=1)
    assert res.volume.array.shape == (1, 24, 20, 3) and res.provenance["readout_cropped_from"] == 48
    np.testing.assert_allclose(res.volume.affine[:3, 3], [12.0, 0.0, 0.0])

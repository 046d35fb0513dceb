"""`medldm reconstruct` for CT: sparse-view recon from sinogram files and from CT images (--views), and
thick-slice CT super-resolution of a DICOM series; CT stays in HU and the geometry is exact."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medldm.io import Volume, read_dicom_series, write_dicom_series
from medldm.io.sinogram_h5 import write_sinogram_h5
from medldm.physics.resolution import coarse_to_fine_affine
from medldm.sampling.measurement import from_ct_volume, to_sinogram
from tests.batch.conftest import run
from tests.helpers import make_tiny_bundle
from tests.physics.test_ct import hu_phantom


def _ct(n=32, z=3, spacing=(0.8, 0.8, 2.0)) -> Volume:
    arr = np.stack([hu_phantom(n)[0][0, 0].numpy()] * z, axis=-1).astype(np.float32)
    return Volume(arr[None], np.diag([*spacing, 1.0]), "CT", {})


@pytest.fixture(scope="module")
def ct_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_in")
    vol = _ct()
    m = from_ct_volume(vol, views=20)
    write_sinogram_h5(root / "sino" / "head.h5", to_sinogram(m), np.arange(20) * 9.0, pixel_spacing=(0.8, 0.8),
                      slice_spacing=2.0)
    (root / "ct").mkdir()
    nib.save(nib.Nifti1Image(vol.array[0], vol.affine), root / "ct" / "head_ct.nii.gz")
    return root, vol


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_sinogram_recon_writes_hu_nifti_and_a_ct_dicom_series(ct_input, tmp_path):
    root, vol = ct_input
    model = make_tiny_bundle(tmp_path / "m", "recon", "CT")
    code, _ = run(root / "sino", tmp_path / "out", task="recon", model=str(model))
    assert code == 0
    unit = _manifest(tmp_path / "out")["units"][0]
    assert unit["kind"] == "sinogram" and unit["status"] == "ok" and unit["modality"] == "CT", unit
    rec = nib.load(tmp_path / "out" / unit["outputs"]["reconstruction"])
    assert rec.shape == (32, 32, 3)
    np.testing.assert_allclose(rec.affine, vol.affine, atol=1e-5)
    dicom = read_dicom_series(tmp_path / "out" / unit["outputs"]["dicom"])
    assert dicom.modality == "CT"
    np.testing.assert_allclose(dicom.array[0], rec.get_fdata(), atol=1.0)  # HU, integer-stored
    assert rec.get_fdata().min() < -500 and rec.get_fdata().max() > 0  # HU range, not normalised units
    prov = json.loads((tmp_path / "out" / unit["outputs"]["provenance"]).read_text())
    assert prov["operator"]["operator"] == "SparseViewCT" and len(prov["operator"]["angles"]) == 20
    assert prov["residual"] is not None


def test_views_simulates_ct_images_and_images_are_skipped_without_it(ct_input, tmp_path, capsys):
    root, _ = ct_input
    model = make_tiny_bundle(tmp_path / "m", "recon", "CT")
    code, _ = run(root / "ct", tmp_path / "plain", task="recon", model=str(model))
    assert code == 2  # nothing to reconstruct: the image is skipped, the message names --views
    captured = capsys.readouterr()
    assert "--views" in captured.out + captured.err
    code, _ = run(root / "ct", tmp_path / "sim", task="recon", model=str(model), views=30, dose=1e5)
    unit = _manifest(tmp_path / "sim")["units"][0]
    assert code == 0 and unit["status"] == "ok", unit
    prov = json.loads((tmp_path / "sim" / unit["outputs"]["provenance"]).read_text())
    assert prov["operator"]["views"] == 30 and prov["operator"]["I0"] == 1e5
    assert _manifest(tmp_path / "sim")["parameters"]["views"] == 30


@pytest.mark.parametrize("kwargs, message", [({"task": "denoise", "views": 30}, "--views"),
                                             ({"task": "recon", "dose": 1e4}, "--dose")])
def test_views_and_dose_usage_errors(ct_input, tmp_path, capsys, kwargs, message):
    code, _ = run(ct_input[0] / "ct", tmp_path / "o", **kwargs)
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_sinograms_are_skipped_by_other_tasks(ct_input, tmp_path):
    model = make_tiny_bundle(tmp_path / "m", "denoise", "CT")
    code, _ = run(ct_input[0], tmp_path / "o", task="denoise", model=str(model))
    units = {u["kind"]: u for u in _manifest(tmp_path / "o")["units"]}
    assert code == 0 and units["sinogram"]["status"] == "skipped" and "CT sinogram" in units["sinogram"]["reason"]


def test_thick_slice_ct_series_sr_keeps_hu_and_field_of_view(tmp_path):
    vol = _ct(n=24, z=4, spacing=(0.9, 0.9, 3.0))
    meta = {"PatientName": "Doe^John", "PatientID": "P9", "SeriesDescription": "CT head 3 mm"}
    write_dicom_series(vol, tmp_path / "in" / "ct3mm", source_meta=meta, modality="CT")
    model = make_tiny_bundle(tmp_path / "m", "sr", "CT")
    code, _ = run(tmp_path / "in", tmp_path / "out", task="sr", model=str(model), factor=2, steps=1)
    unit = _manifest(tmp_path / "out")["units"][0]
    assert code == 0 and unit["status"] == "ok", unit
    src = read_dicom_series(tmp_path / "in" / "ct3mm")
    out = read_dicom_series(tmp_path / "out" / unit["outputs"]["dicom"])
    assert out.modality == "CT" and out.array.shape == (1, 24, 24, 8)
    np.testing.assert_allclose(out.affine, coarse_to_fine_affine(src.affine, 2, 2), atol=1e-4)
    assert out.array.min() < -500  # air stays near -1000 HU

"""The app's work without the page: inputs, simulation, run, downloads, and what bad input says."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest

from medldm.app import page, session
from medldm.errors import InputError, MedldmError
from medldm.io.volume import Volume
from medldm.sampling.measurement import Measurement
from medldm.sampling.reconstructor import Reconstructor
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle

MB = 2**20


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return Reconstructor.load(make_tiny_bundle(tmp_path_factory.mktemp("m") / "m", "denoise", "MR"), device="cpu")


@pytest.fixture
def nifti(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(phantom((32, 32, 4)) * 800, np.eye(4)), path)
    return path


def _prepare(tmp_path, **kw):
    args = dict(task="denoise", modality="MR", model_name="mr-denoise", upload=None, example=None, simulate=False,
                seed=0, workdir=tmp_path, max_bytes=64 * MB)
    return session.prepare(**{**args, **kw})


def test_an_upload_is_the_degraded_scan_unless_simulation_is_asked(tmp_path, nifti):
    as_is = _prepare(tmp_path, upload=nifti)
    assert isinstance(as_is.data, Volume) and as_is.truth is None
    simulated = _prepare(tmp_path, upload=nifti, simulate=True, seed=3)
    assert isinstance(simulated.data, Measurement) and simulated.truth is not None
    assert "Rician" in simulated.description and "seed 3" in simulated.description
    assert not np.allclose(simulated.data.y[0].numpy(), simulated.truth.array)


def test_bad_inputs_say_what_is_wrong(tmp_path, nifti):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file"):
        _prepare(tmp_path, upload=tmp_path / "notes.txt")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a nifti")
    with pytest.raises(InputError, match="bad.nii.gz"):
        _prepare(tmp_path, upload=bad)
    (tmp_path / "k.h5").write_bytes(b"")
    with pytest.raises(InputError, match="already a measurement"):
        _prepare(tmp_path, upload=tmp_path / "k.h5", simulate=True)
    with pytest.raises(InputError, match="choose an example or upload"):
        _prepare(tmp_path)
    with pytest.raises(InputError, match="needs MR"):
        _prepare(tmp_path, example=next(k for k, v in session.EXAMPLES.items() if v == "CT"))


def test_zip_members_cannot_land_outside_the_work_folder_and_size_is_bounded(tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escape.dcm", b"x" * 100)
        zf.writestr("/abs/path/b.dcm", b"y" * 100)
    folder = session.unzip_series(archive, tmp_path / "work", max_bytes=MB)
    assert sorted(p.name for p in folder.iterdir()) == ["00000_escape.dcm", "00001_b.dcm"]
    assert not (tmp_path / "escape.dcm").exists() and folder.parent == tmp_path / "work"
    with pytest.raises(InputError, match="unpacks to"):
        session.unzip_series(archive, tmp_path / "w2", max_bytes=10)
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(InputError, match="not a readable ZIP"):
        session.unzip_series(tmp_path / "junk.zip", tmp_path / "w3", max_bytes=MB)


def test_a_simulated_run_gives_maps_metrics_and_downloads(tmp_path, nifti, rec):
    prepared = _prepare(tmp_path, upload=nifti, simulate=True)
    out = session.reconstruct(rec, prepared, steps=2, samples=2, seed=0, workdir=tmp_path)
    assert set(out.arrays) == {"input", "output", "|output - input|", "uncertainty (std)", "|error|"}
    assert all(a.shape == (32, 32, 4) for a in out.arrays.values())
    assert [r[""] for r in out.metrics] == ["input (naive inverse)", f"medldm {rec.config.name}"]
    assert all(np.isfinite(r["PSNR dB"]) for r in out.metrics)
    names = {p.name for p in out.files.values()}
    assert names == {"reconstruction.nii.gz", "uncertainty.nii.gz", "reconstruction_dicom.zip", "provenance.json"}
    assert all(p.is_file() and tmp_path in p.parents for p in out.files.values())
    with zipfile.ZipFile(out.files["derived DICOM series (zip)"]) as zf:
        assert len(zf.namelist()) == 4  # one file per slice
    np.testing.assert_allclose(nib.load(out.files["reconstruction (NIfTI)"]).get_fdata(), out.arrays["output"], rtol=1e-5)


def test_the_page_state_gives_a_status_or_a_typed_error(tmp_path, nifti, rec):
    app = page.App(tmp_path, 64 * MB, "cpu")
    app._models["tiny"] = rec
    status, table, state, files, prov = app.run("tiny", page.NONE, str(nifti), True, 2, 1, 0)
    assert status.startswith("**Done**") and "PSNR" in table and "uncertainty (std)" not in state["arrays"]
    assert prov["parameters"]["steps"] == 2 and len(files) == 3
    images = page.render(state, 0.5, 0.5, 0.5, 400, 800)
    assert images[0].ndim == 3 and images[3] is None  # no uncertainty map from one sample
    with pytest.raises(MedldmError, match="samples must be between"):
        app.run("tiny", page.NONE, str(nifti), True, 2, 0, 0)
    for _ in range(page.KEEP_RUNS + 2):
        app.new_workdir()
    assert len(list(tmp_path.glob("run-*"))) == page.KEEP_RUNS


def test_kspace_and_zipped_dicom_uploads_reconstruct(tmp_path, tmp_path_factory):
    from medldm.demo import write_input
    from medldm.io import write_dicom_series
    from medldm.sampling.measurement import simulate

    vol = Volume((phantom((32, 32, 3)) * 800)[None].astype(np.float32), np.eye(4), "MR")
    write_input("mr-recon", simulate(vol, "recon", 0, accelerations=[4], center_fractions=[0.08]), tmp_path / "k")
    recon = Reconstructor.load(make_tiny_bundle(tmp_path_factory.mktemp("r") / "m", "recon", "MR"), device="cpu")
    prepared = _prepare(tmp_path, task="recon", model_name="mr-recon", upload=tmp_path / "k" / "undersampled.h5")
    out = session.reconstruct(recon, prepared, steps=1, samples=1, seed=0, workdir=tmp_path / "w1")
    assert out.arrays["output"].shape == (32, 32, 3) and out.metrics == [] and out.residual is not None

    write_dicom_series(vol, tmp_path / "series")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "series").iterdir()):
            zf.write(f, f"nested/folder/{f.name}")
    prepared = _prepare(tmp_path / "w2", upload=archive)
    assert isinstance(prepared.data, Volume) and prepared.data.spatial_shape == (32, 32, 3)

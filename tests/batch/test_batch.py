"""`medldm reconstruct` end to end on a realistic folder: statuses, outputs, geometry, resume, kills, dry runs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

import medldm
from medldm.io import fastmri_h5_to_volume, read_dicom_series
from medldm.physics.resolution import coarse_to_fine_affine
from tests.batch.conftest import PATIENT, copy_output, hidden_entries, noisy_mr, run, tree_digest, write_mr_series
from tests.helpers import make_tiny_bundle


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _by_input(manifest, fragment):
    hits = [u for u in manifest["units"] if any(fragment in p for p in u["inputs"])]
    assert len(hits) == 1, (fragment, [u["id"] for u in manifest["units"]])
    return hits[0]


def test_manifest_statuses_reasons_and_exit_code(denoise_run):
    out, code, stdout = denoise_run
    assert code == 1  # the bad cases fail, the rest goes on
    m = _manifest(out)
    assert m["task"] == "denoise" and m["summary"] == {"ok": 2, "failed": 2, "skipped": 2}
    series = _by_input(m, "a1")
    assert series["status"] == "ok" and series["kind"] == "dicom" and len(series["inputs"]) == 5
    assert {p.split("/")[-2] for p in series["inputs"]} == {"a1", "a2"}  # one series over two folders
    assert series["id"].startswith("dicom-s3-denoise-")
    assert _by_input(m, "sub-01_T1w")["status"] == "ok"
    gap = _by_input(m, "gap")
    assert gap["status"] == "failed" and "missing slice" in gap["reason"]
    nan = _by_input(m, "broken.nii.gz")
    assert nan["status"] == "failed" and "NaN/Inf" in nan["reason"]
    report = _by_input(m, "report.dcm")
    assert report["status"] == "skipped" and "no pixel data" in report["reason"]
    h5 = _by_input(m, "knee.h5")
    assert h5["status"] == "skipped" and "--task recon" in h5["reason"]
    assert [i["path"].endswith("README.txt") for i in m["ignored"]] == [True]
    for u in m["units"]:
        assert u["id"] in stdout and u["status"] in stdout  # the summary table
        if u["status"] == "ok":
            assert u["seconds"] > 0 and (out / u["id"] / "provenance.json").is_file()
    assert "Doe" not in (out / "manifest.json").read_text()  # never patient names
    assert hidden_entries(out) == []  # no temp folders or files left


def test_nifti_output_keeps_axes_affine_and_shape(denoise_run, batch_input):
    out, _, _ = denoise_run
    unit = _by_input(_manifest(out), "sub-01_T1w")
    src = nib.load(batch_input[0] / "nifti" / "sub-01_T1w.nii.gz")
    rec = nib.load(out / unit["outputs"]["reconstruction"])
    unc = nib.load(out / unit["outputs"]["uncertainty"])
    assert rec.shape == src.shape == unc.shape
    np.testing.assert_allclose(rec.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(rec.affine, batch_input[2]["t1_affine"], atol=1e-5)
    assert np.all(np.isfinite(rec.get_fdata())) and np.all(unc.get_fdata() >= 0)
    assert "dicom" not in unit["outputs"] and "reconstruction_h5" not in unit["outputs"]


def test_dicom_output_has_the_geometry_of_the_nifti(denoise_run):
    out, _, _ = denoise_run
    unit = _by_input(_manifest(out), "a1")
    nii = nib.load(out / unit["outputs"]["reconstruction"])
    vol = read_dicom_series(out / unit["outputs"]["dicom"])
    assert vol.array.shape[1:] == nii.shape
    np.testing.assert_allclose(vol.affine, nii.affine, atol=1e-4)
    data = nii.get_fdata()
    np.testing.assert_allclose(vol.array[0], data, atol=(data.max() - data.min()) / 30000 + 1e-3)
    template = vol.meta["dicom"]
    assert template["PatientName"] == PATIENT  # derived series stays in the patient's study
    import pydicom

    ds = pydicom.dcmread(vol.meta["files"][0])
    assert "DERIVED" in ds.ImageType
    desc = ds.DerivationDescription
    assert "denoise" in desc and "tiny-mr-denoise" in desc and medldm.__version__ in desc


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dicom_output_passes_dciodvfy(denoise_run):
    out, _, _ = denoise_run
    unit = _by_input(_manifest(out), "a1")
    for path in sorted((out / unit["outputs"]["dicom"]).iterdir()):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert not errors, errors


def test_provenance(denoise_run):
    out, _, _ = denoise_run
    unit = _by_input(_manifest(out), "a1")
    prov = json.loads((out / unit["outputs"]["provenance"]).read_text())
    assert prov["task"] == "denoise" and prov["model"]["name"] == "tiny-mr-denoise"
    assert prov["parameters"]["steps"] == 2 and prov["parameters"]["samples"] == 2
    assert prov["unit"]["id"] == unit["id"] and prov["medldm_version"] == medldm.__version__
    assert PATIENT.split("^")[0] not in json.dumps(prov)


def test_recon_h5_outputs(batch_input, bundles, tmp_path):
    out = tmp_path / "recon"
    code, _ = run(batch_input[0], out, task="recon", model=str(bundles["recon"]))
    assert code == 0
    m = _manifest(out)
    unit = _by_input(m, "knee.h5")
    assert unit["status"] == "ok", unit["reason"]
    assert all(u["status"] == "skipped" for u in m["units"] if u is not unit)
    with h5py.File(out / unit["outputs"]["reconstruction_h5"]) as f:
        recon = f["reconstruction"][()]
    assert recon.shape == (4, 24, 20) and recon.dtype == np.float32
    nii = nib.load(out / unit["outputs"]["reconstruction"])
    assert nii.shape == (24, 20, 4)  # fastMRI volume axes (H, W, slices)
    np.testing.assert_allclose(nii.affine, fastmri_h5_to_volume(batch_input[0] / "kspace" / "knee.h5").affine)
    np.testing.assert_allclose(np.transpose(recon, (1, 2, 0)), nii.get_fdata(), atol=1e-5)
    assert "uncertainty" not in unit["outputs"] and "dicom" not in unit["outputs"]


def test_sr_output_covers_the_input_field_of_view(bundles, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = (4.0, -2.0, 9.0)
    # the tiny model's refiner needs slices above 16 px along one side: (20, 12) fine slices along X
    nib.save(nib.Nifti1Image(noisy_mr((16, 20, 6), 7), affine), src / "thick.nii.gz")
    code, _ = run(src, tmp_path / "out", task="sr", model=str(bundles["sr"]), factor=2, steps=1)
    assert code == 0
    unit = _manifest(tmp_path / "out")["units"][0]
    assert unit["modality"] == "MR"  # from the model: the file does not say
    rec = nib.load(tmp_path / "out" / unit["outputs"]["reconstruction"])
    assert rec.shape == (16, 20, 12)
    np.testing.assert_allclose(rec.affine, coarse_to_fine_affine(affine, 2, 2))

    def extent(aff, n):  # world z of the outer voxel faces
        return [(aff @ [0, 0, k, 1])[2] for k in (-0.5, n - 0.5)]

    np.testing.assert_allclose(extent(rec.affine, 12), extent(affine, 6))


def test_resume_skips_finished_units(denoise_run, tmp_path):
    out = copy_output(denoise_run[0], tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    code, stdout = run(_input_of(out), out, task="denoise", model=_model_of(out), samples=2)
    assert code == 1  # the bad units are retried and fail again
    m = _manifest(out)
    done = [u for u in m["units"] if u["reason"] == "already done"]
    assert len(done) == 2 and all(u["status"] == "skipped" and u["previous_status"] == "ok" for u in done)
    assert all(u["outputs"]["reconstruction"].startswith(u["id"]) for u in done)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    assert "already done" in stdout
    seconds = {u["id"]: u["previous_seconds"] for u in done}
    run(_input_of(out), out, task="denoise", model=_model_of(out), samples=2)  # a third run: still the first's record
    again = [u for u in _manifest(out)["units"] if u["reason"] == "already done"]
    assert all(u["previous_status"] == "ok" and u["previous_seconds"] == seconds[u["id"]] > 0 for u in again)


def _input_of(out):
    return Path(_manifest(out)["input"])


def _model_of(out):
    return _manifest(out)["model"]


def test_killed_run_is_cleaned_up_and_redone(denoise_run, tmp_path, caplog):
    out = copy_output(denoise_run[0], tmp_path / "out")
    m = _manifest(out)
    nifti, series = _by_input(m, "sub-01_T1w"), _by_input(m, "a1")
    # killed while writing the NIfTI unit: a temp folder and no result; killed after the series unit's rename
    # but before its manifest entry was written
    shutil.rmtree(out / nifti["id"])
    (out / f".{nifti['id']}.tmp").mkdir()
    (out / f".{nifti['id']}.tmp" / "reconstruction.nii.gz").write_bytes(b"half a file")
    m["units"] = [u for u in m["units"] if u["id"] not in (nifti["id"], series["id"])]
    (out / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.INFO, logger="medldm.batch"):
        code, _ = run(_input_of(out), out, task="denoise", model=_model_of(out), samples=2)
    assert code == 1
    m2 = _manifest(out)
    redone, kept = _by_input(m2, "sub-01_T1w"), _by_input(m2, "a1")
    assert redone["status"] == "ok" and nib.load(out / redone["outputs"]["reconstruction"]).shape == (20, 16, 5)
    assert kept["reason"] == "already done" and set(kept["outputs"]) == set(series["outputs"])
    assert hidden_entries(out) == []
    logged = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("medldm.batch"))
    assert nifti["id"] in logged and str(_input_of(out)) not in logged  # units named by id only


def test_overwrite_redoes_finished_units(denoise_run, tmp_path):
    out = copy_output(denoise_run[0], tmp_path / "out")
    old = _by_input(_manifest(out), "sub-01_T1w")
    old_created = json.loads((out / old["outputs"]["provenance"]).read_text())["created"]
    code, _ = run(_input_of(out), out, task="denoise", model=_model_of(out), samples=1, overwrite=True)
    assert code == 1
    new = _by_input(_manifest(out), "sub-01_T1w")
    assert new["status"] == "ok" and new["id"] == old["id"]
    assert "uncertainty" not in new["outputs"] and not (out / old["outputs"]["uncertainty"]).exists()
    assert json.loads((out / new["outputs"]["provenance"]).read_text())["created"] >= old_created
    assert hidden_entries(out) == []


def test_info_logs_hold_no_identifiers(batch_input, bundles, tmp_path, caplog):
    """What a run logs at INFO (often kept in shared job logs) names no patient, series UID or input path (#28)."""
    import pydicom

    root = batch_input[0]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "study").rglob("*.dcm"))]
    identifiers = {str(h.get(tag)) for h in headers for tag in ("SeriesInstanceUID", "SOPInstanceUID", "PatientName",
                                                                    "PatientID", "StudyInstanceUID") if h.get(tag)}
    with caplog.at_level(logging.INFO, logger="medldm"):
        run(root, tmp_path / "out", task="denoise", model=str(bundles["denoise"]), samples=1)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "read a DICOM series" in logged and "wrote a derived MR series" in logged  # the run did log
    assert len(identifiers) > 5 and not [i for i in identifiers if i in logged]
    assert str(root) not in logged and str(tmp_path) not in logged


def test_deidentified_run_holds_no_identifier_in_any_output_byte(batch_input, bundles, tmp_path):
    """--deidentify: derived DICOM per the Basic Profile, manifest and provenance name inputs by digests, and no
    file written (names included) holds a UID, name or path of the input (#28)."""
    import pydicom

    root = batch_input[0]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "study").rglob("*.dcm"))]
    identifiers = {str(h.get(tag)) for h in headers for tag in ("SeriesInstanceUID", "SOPInstanceUID", "PatientName",
                                                                    "StudyInstanceUID", "FrameOfReferenceUID",
                                                                    "SeriesDescription") if h.get(tag)}
    identifiers |= {str(root), *(str(p.relative_to(root)) for p in root.rglob("*") if len(p.name) >= 6)}
    out = tmp_path / "out"
    code, stdout = run(root, out, task="denoise", model=str(bundles["denoise"]), samples=1, deidentify=True)
    assert code == 1  # the broken inputs still fail
    m = _manifest(out)
    assert "input paths as HMAC" in m["deidentified"] and len(m["input"]) == 16
    assert m["parameters"]["deidentify"] is True and m["parameters"]["deid_dates"] == "shift"
    assert sum(u["status"] == "ok" for u in m["units"]) >= 2 and len(identifiers) > 10
    leaks = [f"{p.relative_to(out)}: {i}" for p in out.rglob("*") for i in identifiers
             if i in str(p.relative_to(out)) or (p.is_file() and i.encode() in p.read_bytes())]
    assert leaks == [] and not [i for i in identifiers if i in stdout]
    series = next(u for u in m["units"] if u["kind"] == "dicom" and u["status"] == "ok")
    ds = pydicom.dcmread(next((out / series["outputs"]["dicom"]).glob("*.dcm")))
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientName != PATIENT
    assert all(len(i) == 16 for u in m["units"] for i in u["inputs"]) and "series_uid" not in series
    # a rerun without --deidentify must not reuse the de-identified results silently
    code, _ = run(root, out, task="denoise", model=str(bundles["denoise"]), samples=1)
    assert code == 2


def test_skip_bad_slices_reconstructs_the_rest_and_says_so(bundles, tmp_path):
    files = write_mr_series(tmp_path / "in" / "series")
    files[-1].write_bytes(files[-1].read_bytes()[:-64])  # the last slice truncated in transfer
    code, _ = run(tmp_path / "in", tmp_path / "strict", task="denoise", model=str(bundles["denoise"]), samples=1)
    assert code == 1
    code, _ = run(tmp_path / "in", tmp_path / "out", task="denoise", model=str(bundles["denoise"]), samples=1,
                  skip_bad_slices=True)
    (unit,) = _manifest(tmp_path / "out")["units"]
    assert code == 0 and unit["status"] == "ok" and [s["file"] for s in unit["skipped_slices"]] == [files[-1].name]
    provenance = json.loads((tmp_path / "out" / unit["outputs"]["provenance"]).read_text())
    assert provenance["skipped_slices"] == unit["skipped_slices"]
    assert nib.load(tmp_path / "out" / unit["outputs"]["reconstruction"]).shape[-1] == len(files) - 1


def test_dry_run_writes_nothing(batch_input, bundles, tmp_path):
    out = tmp_path / "out"
    code, stdout = run(batch_input[0], out, task="denoise", model=str(bundles["denoise"]), dry_run=True)
    assert code == 0 and not out.exists()
    assert stdout.count("run denoise with model") == 4 and "no pixel data" in stdout and "nothing written" in stdout


def test_default_model_missing_and_unknown_modality(tmp_path, shipped_dir):
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(noisy_mr((20, 16, 2), 0), np.eye(4)), src / "scan.nii.gz")
    code, _ = run(src, tmp_path / "a", task="denoise")
    assert code == 1
    reason = _manifest(tmp_path / "a")["units"][0]["reason"]
    assert "modality unknown" in reason and "--modality" in reason
    code, _ = run(src, tmp_path / "b", task="denoise", modality="mr")
    assert code == 1
    reason = _manifest(tmp_path / "b")["units"][0]["reason"]
    assert "'mr-denoise' is not a shipped model" in reason
    shutil.copytree(make_tiny_bundle(tmp_path / "m", "denoise", "MR"), shipped_dir / "mr-denoise")
    code, _ = run(src, tmp_path / "c", task="denoise", modality="mr", steps=1)  # the default is picked up
    unit = _manifest(tmp_path / "c")["units"][0]
    assert code == 0 and unit["model"] == "mr-denoise" and unit["modality"] == "MR"


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "deblur"}, "--task must be one of"),
    ({"task": "denoise", "factor": 2}, "--factor"),
    ({"task": "denoise", "model": "/nonexistent/model"}, "--model"),
    ({"task": "sr", "model": "DENOISE"}, "does 'denoise'"),
    ({"task": "recon", "only": "nifti"}, "nothing to reconstruct"),
    ({"task": "denoise", "inside": True}, "inside the input"),
    ({"task": "sr", "sigma": 5.0}, "--sigma"),
    ({"task": "denoise", "sigma": float("nan")}, "--sigma"),
])
def test_usage_errors_exit_2_and_write_nothing(batch_input, bundles, tmp_path, capsys, kwargs, message):
    src = batch_input[0]
    if kwargs.pop("only", None):
        src = src / "nifti"
    out = src / "out" if kwargs.pop("inside", False) else tmp_path / "out"
    if kwargs.get("model") == "DENOISE":
        kwargs["model"] = str(bundles["denoise"])
    code, _ = run(src, out, **kwargs)
    assert code == 2 and not out.exists()
    assert message in capsys.readouterr().err


def test_cli_reconstruct(batch_input, bundles, tmp_path):
    from typer.testing import CliRunner

    from medldm.cli import app

    nifti = batch_input[0] / "nifti" / "sub-01_T1w.nii.gz"  # a single file is an input too
    result = CliRunner().invoke(app, ["reconstruct", str(nifti), str(tmp_path / "out"), "--task", "denoise",
                                      "--model", str(bundles["denoise"]), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("nifti-denoise-") == 1 and not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["reconstruct", str(nifti), str(tmp_path / "out"), "--task", "nope"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["reconstruct", str(nifti), str(tmp_path / "out"), "--task", "denoise",
                                      "--model", str(bundles["denoise"]), "--runtime", "onnx"])
    assert result.exit_code == 2 and "runtime must be one of auto, torch, openvino" in result.output
    result = CliRunner().invoke(app, ["reconstruct", str(nifti), str(tmp_path / "out"), "--task", "denoise",
                                      "--model", str(bundles["denoise"]), "--runtime", "openvino", "--device", "cuda"])
    assert result.exit_code == 2 and "the openvino runtime runs on the CPU" in result.output
    assert not (tmp_path / "out").exists()
    key = tmp_path / "site.key"
    key.write_text("short")
    base = ["reconstruct", str(nifti), str(tmp_path / "out"), "--task", "denoise", "--model", str(bundles["denoise"])]
    for extra, message in ((["--deid-secret-file", str(key)], "with --deidentify only"),
                           (["--deidentify", "--deid-secret-file", str(key)], "too short to be a key"),
                           (["--deidentify", "--deid-secret-file", str(tmp_path / "none")], "cannot read it"),
                           (["--deidentify", "--deid-dates", "blur"], "shift or remove")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output
    key.write_text("a site key of 32 characters 0123")
    result = CliRunner().invoke(app, base + ["--deidentify", "--deid-secret-file", str(key), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_input_never_modified(batch_input, denoise_run):
    root, digest, _ = batch_input
    assert tree_digest(root) == digest


def test_rerun_with_other_parameters_refuses_to_reuse_results(batch_input, bundles, tmp_path, capsys):
    nifti = batch_input[0] / "nifti" / "sub-01_T1w.nii.gz"
    out = tmp_path / "out"
    assert run(nifti, out, task="denoise", model=str(bundles["denoise"]), steps=1)[0] == 0
    before = _manifest(out)
    code, _ = run(nifti, out, task="denoise", model=str(bundles["denoise"]), steps=2)
    assert code == 2 and "other steps (steps=1)" in capsys.readouterr().err
    assert _manifest(out) == before  # nothing touched
    assert run(nifti, out, task="denoise", model=str(bundles["denoise"]), steps=1)[0] == 0  # same: resumes
    assert _manifest(out)["units"][0]["reason"] == "already done"
    code, _ = run(nifti, out, task="denoise", model=str(bundles["denoise"]), steps=2, overwrite=True)
    assert code == 0 and _manifest(out)["parameters"]["steps"] == 2 and _manifest(out)["units"][0]["status"] == "ok"


def test_a_known_noise_level_replaces_the_estimate(batch_input, bundles, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(batch_input[0] / "nifti" / "sub-01_T1w.nii.gz", src)  # the folder also holds a broken file
    code, _ = run(src, tmp_path / "out", task="denoise", model=str(bundles["denoise"]), sigma=7.5, steps=1)
    manifest = _manifest(tmp_path / "out")
    assert code == 0 and manifest["parameters"]["sigma"] == 7.5
    for unit in manifest["units"]:
        prov = json.loads((tmp_path / "out" / unit["outputs"]["provenance"]).read_text())
        assert prov["operator"]["sigma"] == 7.5
    code, _ = run(src, tmp_path / "estimated", task="denoise", model=str(bundles["denoise"]), steps=1)
    unit = _manifest(tmp_path / "estimated")["units"][0]
    assert json.loads((tmp_path / "estimated" / unit["outputs"]["provenance"]).read_text())["operator"]["sigma"] != 7.5


def test_diffusion_flag_reaches_the_reconstructor_and_the_manifest(batch_input, bundles, tmp_path):
    from typer.testing import CliRunner

    from medldm.cli import app

    nifti = batch_input[0] / "nifti" / "sub-01_T1w.nii.gz"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["reconstruct", str(nifti), str(out), "--task", "denoise", "--model",
                                      str(bundles["denoise"]), "--steps", "1", "--no-diffusion"])
    assert result.exit_code == 0, result.output
    unit = _manifest(out)["units"][0]
    assert _manifest(out)["parameters"]["diffusion"] is False
    assert json.loads((out / unit["id"] / "provenance.json").read_text())["parameters"]["use_diffusion"] is False

"""Discovery, ids, modality inference and manifest merging, without running a model."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medldm.batch import exit_code, format_table, merge_rank_manifests, read_previous
from medldm.batch.units import discover, infer_nifti_modality


def test_discovery_units_and_stable_ids(batch_input, tmp_path):
    root = batch_input[0]
    units, ignored = discover(root, "denoise")
    kinds = [u.kind for u in units]
    assert kinds == ["dicom", "dicom", "nifti", "nifti", "fastmri", "dicom-object"]
    assert [i["reason"] for i in ignored] == ["not a DICOM file"]
    ids = [u.id for u in units]
    assert len(set(ids)) == len(ids) and all("doe" not in i.lower() for i in ids)
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)  # same data in another place: the same ids, so resuming still works
    assert [u.id for u in discover(moved, "denoise")[0]] == ids
    assert not set(u.id for u in discover(root, "sr")[0] if u.kind != "dicom-object") & set(ids)


def test_single_file_inputs(batch_input):
    root = batch_input[0]
    (unit,), _ = discover(root / "study" / "a1" / "IM00001.dcm", "denoise")
    assert unit.kind == "dicom" and unit.modality == "MR" and unit.runnable
    (unit,), _ = discover(root / "study" / "report.dcm", "denoise")
    assert unit.kind == "dicom-object" and "no pixel data" in unit.skip
    (unit,), _ = discover(root / "kspace" / "knee.h5", "recon")
    assert unit.kind == "fastmri" and unit.runnable


@pytest.mark.parametrize("name, sidecar, explicit, expected", [
    ("sub-01_T2w.nii.gz", None, None, ("MR", "file name")),
    ("head_ct.nii", None, None, ("CT", "file name")),
    ("scan.nii.gz", {"Modality": "CT"}, None, ("CT", "sidecar")),
    ("scan.nii.gz", {"Modality": "PT"}, None, (None, None)),
    ("scan.nii.gz", None, "ct", ("CT", "--modality")),
    ("scan.nii.gz", None, None, (None, None)),
])
def test_nifti_modality_inference(tmp_path, name, sidecar, explicit, expected):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    if sidecar is not None:
        stem = name[: -len(".nii.gz")] if name.endswith(".gz") else name[: -len(".nii")]
        (tmp_path / f"{stem}.json").write_text(json.dumps(sidecar))
    assert infer_nifti_modality(path, explicit) == expected


def _unit(uid, status, seconds=1.0):
    return {"id": uid, "status": status, "reason": "r", "seconds": seconds, "inputs": [], "outputs": {}}


def test_merge_rank_manifests(tmp_path):
    order = ["a", "b", "c", "d"]
    for rank, units in ((1, [_unit("b", "failed"), _unit("d", "ok")]), (0, [_unit("a", "ok"), _unit("c", "skipped")])):
        (tmp_path / f"manifest.rank{rank}.json").write_text(json.dumps({"task": "denoise", "rank": rank,
                                                                         "units": units}))
    merged = merge_rank_manifests(tmp_path, 2, order)
    assert [u["id"] for u in merged["units"]] == order
    assert merged["summary"] == {"ok": 2, "failed": 1, "skipped": 1} and "rank" not in merged
    assert json.loads((tmp_path / "manifest.json").read_text())["units"] == merged["units"]
    assert not list(tmp_path.glob("manifest.rank*.json"))
    assert exit_code(merged["units"]) == 1
    assert set(read_previous(tmp_path)) == {"a", "d"}  # only finished units are carried into a rerun


def test_merge_keeps_rank_files_when_one_is_missing(tmp_path):
    (tmp_path / "manifest.rank0.json").write_text(json.dumps({"units": [_unit("a", "ok")]}))
    merged = merge_rank_manifests(tmp_path, 2)
    assert merged["missing_ranks"] == [1] and (tmp_path / "manifest.rank0.json").exists()


def test_summary_table():
    table = format_table([_unit("dicom-s3-denoise-0123456789", "ok", 2.5), _unit("nifti-x", "failed")])
    lines = table.splitlines()
    assert lines[0].split() == ["unit", "status", "seconds", "reason"]
    assert "2.50" in lines[1] and lines[-1] == "1 ok, 1 failed, 0 skipped"
    assert exit_code([_unit("a", "ok"), _unit("b", "skipped")]) == 0


def test_volume_too_large_for_memory_gets_a_clear_reason(monkeypatch):
    import medldm.batch.outputs as batch_io
    from medldm.errors import InputError

    monkeypatch.setattr(batch_io, "available_memory_bytes", lambda: 2**30)
    batch_io.check_memory(100_000, samples=4)  # 5.6 MB: fine
    with pytest.raises(InputError, match="GiB is free"):
        batch_io.check_memory(512**3, samples=4)


def test_files_that_are_not_ours_by_content_are_ignored_with_the_reason(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    (tmp_path / "IM_notdicom.dcm").write_bytes(png)
    (tmp_path / "photo.nii.gz").write_bytes(png)
    (tmp_path / "notes.h5").write_text("not hdf5 at all\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "truncated.nii.gz").write_bytes(b"\x1f\x8b" + bytes(10))  # gzip by content: a unit that fails later
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "sub-01_T1w.nii")
    units, ignored = discover(tmp_path, "denoise")
    reasons = {i["path"].rsplit("/", 1)[-1]: i["reason"] for i in ignored}
    assert reasons == {"IM_notdicom.dcm": "named .dcm but its content is not DICOM (a PNG image)",
                       "notes.h5": "named .h5 but its content is text",
                       "notes.txt": "not a DICOM file",
                       "photo.nii.gz": "named .nii.gz but its content is a PNG image"}
    assert sorted(u.inputs[0].name for u in units) == ["sub-01_T1w.nii", "truncated.nii.gz"]
    assert not any(u.fail for u in units)  # nothing fails before the run: exit codes stay about real inputs

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medldm.data.prepare import MNI_MARGIN_MM, MNI_VAL_Z_MM, prepare_data
from medldm.data.sources import HEAD_CT_PATH, find_real_t1_validation, load_head_ct
from medldm.errors import InputError

HAS_CT = HEAD_CT_PATH.is_file()


def _world_z(path: Path) -> tuple[float, float]:
    img = nib.load(path)
    zs = [float((img.affine @ np.array([0, 0, k, 1.0]))[2]) for k in (0, img.shape[2] - 1)]
    return min(zs), max(zs)


def _disjoint(a, b) -> bool:  # inclusive [lo, hi] ranges
    return a[1] < b[0] or b[1] < a[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    path = prepare_data(out, n_synthetic=2, resolution=2, include_ct=HAS_CT, include_extra_mr=False, progress=False)
    return path, json.loads(path.read_text())


@pytest.mark.slow  # the fixture prepares real and synthetic volumes (~5 s)
def test_files_and_splits(prepared):
    path, dl = prepared
    assert dl["training"] and dl["validation"]
    for split in ("training", "validation", "test_ood"):
        for e in dl[split]:
            assert (path.parent / e["image"]).is_file() and e["modality"] in ("MR", "CT")
    train = {e["image"] for e in dl["training"]}
    held = {e["image"] for e in dl["validation"] + dl["test_ood"]}
    assert not train & held
    sources = {e["source"] for e in dl["training"]}
    assert {"mni152", "synthetic"} <= sources and ("invesalius_head_ct" in sources) == HAS_CT
    assert sum(e["source"] == "synthetic" for e in dl["training"]) >= 2  # >= 1 part per subject


@pytest.mark.slow  # the fixture prepares real and synthetic volumes (~5 s)
def test_mni_holdout_no_overlap(prepared):
    path, dl = prepared
    h = dl["holdout"]["mni152"]
    assert h["validation_world_z_mm"] == list(MNI_VAL_Z_MM) and h["margin_mm"] == MNI_MARGIN_MM
    e0, e1 = h["excluded_from_training_k"]
    v0, v1 = h["validation_k"]
    assert e0 < v0 < v1 < e1
    for e in dl["training"]:
        if e["source"] in h["applies_to_sources"] and e["source_k"]:
            assert _disjoint(e["source_k"], [e0, e1 - 1]), e
    # In world space too, for the template's own parts (synthetic parts are warped: source_k is the check).
    (val,) = [e for e in dl["validation"] if e["source"] == "mni152"]
    vz = _world_z(path.parent / val["image"])
    assert MNI_VAL_Z_MM[0] <= vz[0] and vz[1] < MNI_VAL_Z_MM[1]
    for e in dl["training"]:
        if e["source"] == "mni152":
            tz = _world_z(path.parent / e["image"])
            assert tz[1] <= vz[0] - MNI_MARGIN_MM or tz[0] >= vz[1] + MNI_MARGIN_MM


@pytest.mark.slow  # the fixture prepares real and synthetic volumes (~5 s)
@pytest.mark.skipif(not HAS_CT, reason="invesalius-examples not installed")
def test_ct_holdout_no_overlap(prepared):
    path, dl = prepared
    h = dl["holdout"]["invesalius_head_ct"]
    assert h["training_k"][1] <= h["margin_k"][0] < h["margin_k"][1] <= h["validation_k"][0]
    (tr,) = [e for e in dl["training"] if e["modality"] == "CT"]
    (va,) = [e for e in dl["validation"] if e["modality"] == "CT"]
    assert _disjoint(tr["source_k"], va["source_k"])
    tz, vz = _world_z(path.parent / tr["image"]), _world_z(path.parent / va["image"])
    assert vz[0] - tz[1] >= 1.5 * (h["margin_k"][1] - h["margin_k"][0] + 1) - 1e-3  # 8 unused 1.5 mm slices
    assert nib.load(path.parent / tr["image"]).get_data_dtype() == np.int16  # HU stored exactly


@pytest.mark.slow  # the fixture prepares real and synthetic volumes (~5 s)
def test_idempotent(prepared):
    path, dl = prepared
    files = {p: p.stat().st_mtime_ns for p in path.parent.rglob("*.nii.gz")}
    again = prepare_data(path.parent, n_synthetic=2, resolution=2, include_ct=HAS_CT, include_extra_mr=False,
                         progress=False)
    assert json.loads(again.read_text()) == dl
    assert {p: p.stat().st_mtime_ns for p in path.parent.rglob("*.nii.gz")} == files
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert all(len(j["hash"]) == 16 for j in manifest["jobs"].values())


@pytest.mark.slow
def test_fewer_subjects_removes_stale_files(tmp_path):
    prepare_data(tmp_path, n_synthetic=2, resolution=2, include_ct=False, include_real_t1=False, progress=False)
    assert list(tmp_path.glob("mr/synth_0001_*"))
    dl = json.loads(prepare_data(tmp_path, n_synthetic=1, resolution=2, include_ct=False,
                                 include_real_t1=False, progress=False).read_text())
    assert not list(tmp_path.glob("mr/synth_0001_*"))
    assert all(e["subject"] == "synth_0000" for e in dl["training"] if e["source"] == "synthetic")


def test_head_ct_missing_message(tmp_path):
    with pytest.raises(InputError, match="apt-get install invesalius-examples"):
        load_head_ct(tmp_path / "Cranium.inv3")


@pytest.mark.skipif(not HAS_CT, reason="invesalius-examples not installed")
def test_head_ct_orientation():
    v = load_head_ct()
    assert v.array.shape == (1, 256, 256, 108) and v.modality == "CT"
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    np.testing.assert_allclose(v.spacing, (0.9570312, 0.9570312, 1.5), rtol=1e-6)
    a = v.array[0]
    assert a.min() == -1024 and a.max() > 2000
    # Anatomy check of the orientation: the skull cross-section shrinks towards the vertex (k up = S).
    bone = (a > 300).sum(axis=(0, 1))
    assert bone[100:].sum() < bone[40:48].sum()


def test_real_t1():
    v = find_real_t1_validation()
    if v is None:
        pytest.skip("insighttoolkit5-examples not installed")
    assert v.array.shape == (1, 128, 62, 128) and nib.aff2axcodes(v.affine) == ("R", "A", "S")
    head = find_real_t1_validation(brain_only=False)
    assert (v.array > 0).sum() < (head.array > 0).sum()


def test_pyradiomics_brain_geometry():
    from medldm.data.sources import PYRADIOMICS_SDIST, load_pyradiomics_brain

    if not PYRADIOMICS_SDIST.is_file():
        pytest.skip("pyradiomics source archive not fetched (.ci/setup does it)")
    v = load_pyradiomics_brain("brain2")
    assert v.array.shape == (1, 256, 256, 23) and nib.aff2axcodes(v.affine) == ("R", "A", "S")
    np.testing.assert_allclose(v.spacing, (0.78125, 0.78125, 6.5))
    assert v.meta["thick_axis"] == 2 and v.array.max() > 1000  # raw scanner values, not rescaled


def test_brainsmall_orientation():
    from medldm.data.sources import BRAINSMALL_PATH, load_brainsmall

    if not BRAINSMALL_PATH.is_file():
        pytest.skip("libvolpack1-dev not installed")
    v = load_brainsmall()
    assert v.array.shape == (1, 84, 128, 128) and nib.aff2axcodes(v.affine) == ("R", "A", "S")
    # Anatomy check: the head (bright voxels) fills more of the upper half of k (cranium) than the neck level.
    head = (v.array[0] > 40).sum(axis=(0, 1))
    assert head[80:100].sum() > head[10:30].sum()


def test_extra_sources_missing_messages(tmp_path):
    from medldm.data.sources import load_brainsmall, load_pyradiomics_brain

    with pytest.raises(InputError, match="pip download"):
        load_pyradiomics_brain("brain1", tmp_path / "none.tar.gz")
    with pytest.raises(InputError, match="unknown pyradiomics brain"):
        load_pyradiomics_brain("lung1", tmp_path / "none.tar.gz")
    with pytest.raises(InputError, match="libvolpack1-dev"):
        load_brainsmall(tmp_path / "none.den")
    bad = tmp_path / "bad.den"
    bad.write_bytes(b"\0" * 70)
    with pytest.raises(InputError, match="header says"):
        load_brainsmall(bad)


@pytest.mark.slow
def test_extra_real_heads_enter_training_only(tmp_path):
    from medldm.data.sources import BRAINSMALL_PATH, PYRADIOMICS_SDIST

    if not (PYRADIOMICS_SDIST.is_file() and BRAINSMALL_PATH.is_file()):
        pytest.skip("pyradiomics archive or libvolpack1-dev missing (.ci/setup installs both)")
    dl = json.loads(prepare_data(tmp_path, n_synthetic=0, resolution=2, include_ct=False, include_real_t1=False,
                                 progress=False).read_text())
    extra = [e for e in dl["training"] if e["source"] in ("pyradiomics_brain", "volpack_brainsmall")]
    assert sorted(e["source"] for e in extra) == ["pyradiomics_brain", "pyradiomics_brain", "volpack_brainsmall"]
    assert [e.get("thick_axis") for e in extra] == [2, 2, None]  # 6.5 mm slices: axial planes only
    assert all(e["source"] not in ("pyradiomics_brain", "volpack_brainsmall") for e in dl["validation"])
    assert all((tmp_path / e["image"]).is_file() for e in extra)

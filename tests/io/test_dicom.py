"""DICOM series: reader geometry and sorting, every rejected input, writer round trips and dciodvfy."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

import medldm
from medldm.errors import InputError
from medldm.io import Volume, find_dicom_series, read_dicom_series, read_volume, write_dicom_series, write_nifti
from tests.io.conftest import axial_affine_ras, synthetic_data, write_series


def _rotation(ax=0.3, ay=-0.2, az=0.5) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rot, spacing, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


# ---------------------------------------------------------------- reader


def test_read_axial_geometry_array_and_meta(tmp_path):
    data = synthetic_data()
    write_series(tmp_path, data)
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (1, 16, 12, 6) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], data)
    np.testing.assert_allclose(vol.affine, axial_affine_ras(), atol=1e-6)
    assert vol.modality == "MR"
    tpl = vol.meta["dicom"]
    assert tpl["SeriesNumber"] == 7 and tpl["SeriesDescription"] == "T1 synthetic"
    assert len(tpl["SOPInstanceUIDs"]) == 6 and tpl["SOPClassUID"] == pydicom.uid.MRImageStorage
    assert vol.meta["source"] == str(tmp_path)


def test_voxel_origin_matches_first_ipp_via_nibabel(tmp_path):
    ipp0 = (-20.0, -30.0, 10.0)
    write_series(tmp_path / "dcm", synthetic_data(), ipp0=ipp0)
    vol = read_dicom_series(tmp_path / "dcm")
    nii = nib.load(str(write_nifti(vol, tmp_path / "v.nii.gz")))
    world = nii.affine @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(world[:3], [-ipp0[0], -ipp0[1], ipp0[2]], atol=1e-5)
    # DICOM rows run to patient left, columns to posterior, slices superior.
    assert nib.aff2axcodes(nii.affine) == ("L", "P", "S")


def test_sorted_by_position_not_instance_number_or_name(tmp_path):
    data = synthetic_data(seed=3)
    rng = np.random.default_rng(1)
    names = [f"f{n:03d}.dcm" for n in rng.permutation(6)]
    write_series(tmp_path, data, instance_numbers=list(rng.permutation(6) + 1), names=names)
    vol = read_dicom_series(sorted(tmp_path.iterdir(), reverse=True))
    np.testing.assert_array_equal(vol.array[0], data)
    np.testing.assert_allclose(vol.affine, axial_affine_ras(), atol=1e-6)


def test_rescale_slope_intercept_applied(tmp_path):
    data = synthetic_data(lo=0, hi=200) * 2.5 - 100.0
    write_series(tmp_path, data, slope=2.5, intercept=-100.0)
    np.testing.assert_allclose(read_dicom_series(tmp_path).array[0], data, atol=1e-4)


def test_single_slice_uses_slice_thickness(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 1)), step=3.0)
    vol = read_dicom_series(paths[0])
    assert vol.array.shape == (1, 8, 8, 1)
    assert vol.spacing == pytest.approx((0.7, 0.8, 3.0))


def test_find_series_groups_across_folders_and_skips(tmp_path):
    uid = generate_uid()
    data = synthetic_data(shape=(8, 8, 4))
    write_series(tmp_path / "a", data[..., :2], series_uid=uid)
    write_series(tmp_path / "b" / "deep", data[..., 2:], series_uid=uid, ipp0=(-20.0, -30.0, 15.0))
    write_series(tmp_path / "c", data, ipp0=(0, 0, 0))
    (tmp_path / "notes.txt").write_text("not dicom")
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID, sr.SeriesInstanceUID = BasicTextSRStorage, generate_uid(), generate_uid()
    sr.Modality = "SR"
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)

    found = find_dicom_series(tmp_path)
    assert sorted(len(s) for s in found) == [4, 4]
    spanning = next(s for s in found if s.series_uid == uid)
    assert len(spanning.folders) == 2
    np.testing.assert_array_equal(read_dicom_series(spanning).array[0], data)
    reasons = {p.name: r for p, r in found.skipped}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert "no pixel data" in reasons["report.dcm"] and "SR" in reasons["report.dcm"]
    with pytest.raises(InputError, match="contains 2 image series"):
        read_dicom_series(tmp_path)


def test_read_only_input_folder_is_untouched(tmp_path):
    src = tmp_path / "ro"
    write_series(src, synthetic_data(shape=(8, 8, 3)))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    for p in [*src.iterdir(), src]:
        p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
    try:
        find_dicom_series(src)
        read_dicom_series(src)
        after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    finally:
        for p in [src, *src.iterdir()]:
            p.chmod(stat.S_IRWXU)
    assert after == before


# ---------------------------------------------------------------- rejected inputs


def test_bad_not_dicom_single_file(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello" * 100)
    with pytest.raises(InputError, match="not a DICOM file"):
        read_dicom_series(path)


def test_bad_no_pixel_data(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 2)), per_slice={0: {"PixelData": None}})
    with pytest.raises(InputError, match="no pixel data") as err:
        read_dicom_series(paths)
    assert paths[0].name in str(err.value)


def test_bad_mixed_orientations(tmp_path):
    tilted = (1.0, 0.0, 0.0, 0.0, 0.8, 0.6)
    write_series(tmp_path, synthetic_data(shape=(8, 8, 3)), per_slice={1: {"ImageOrientationPatient": list(tilted)}})
    with pytest.raises(InputError, match="mixed orientations"):
        read_dicom_series(tmp_path)


def test_bad_duplicate_positions(tmp_path):
    pos = [(0, 0, 0), (0, 0, 2), (0, 0, 2), (0, 0, 4)]
    write_series(tmp_path, synthetic_data(shape=(8, 8, 4)), positions=pos)
    with pytest.raises(InputError, match="duplicate slice position"):
        read_dicom_series(tmp_path)


def test_bad_missing_slice(tmp_path):
    pos = [(0, 0, z) for z in (0, 2, 4, 8, 10)]
    write_series(tmp_path, synthetic_data(shape=(8, 8, 5)), positions=pos)
    with pytest.raises(InputError, match="missing slice"):
        read_dicom_series(tmp_path)


def test_bad_non_uniform_spacing(tmp_path):
    pos = [(0, 0, z) for z in (0, 2, 4, 6.2, 8.2)]
    write_series(tmp_path, synthetic_data(shape=(8, 8, 5)), positions=pos)
    with pytest.raises(InputError, match="non-uniform slice spacing"):
        read_dicom_series(tmp_path)


def test_bad_inconsistent_rows_cols(tmp_path):
    write_series(tmp_path, synthetic_data(shape=(8, 8, 3)), per_slice={2: {"Rows": 4, "Columns": 16}})
    with pytest.raises(InputError, match="inconsistent rows/columns"):
        read_dicom_series(tmp_path)


@pytest.mark.skipif(get_decoder(JPEGLosslessSV1).is_available, reason="a JPEG Lossless decoder is installed")
def test_bad_undecodable_compressed_transfer_syntax(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 1)))
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8not really jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(InputError, match="compressed transfer syntax .* cannot be decoded: install pylibjpeg"):
        read_dicom_series(paths[0])


def test_bad_nan_inf(tmp_path):
    with pytest.warns(UserWarning):  # pydicom rightly complains about a non-numeric DS while we build it
        write_series(tmp_path, synthetic_data(shape=(8, 8, 2)), per_slice={1: {"RescaleSlope": "NaN"}})
    with pytest.raises(InputError, match="NaN/Inf"):
        read_dicom_series(tmp_path)


def _set_vr(path, tag: tuple[int, int], vr: bytes) -> None:
    """Overwrite the explicit VR of ``tag`` in the file: pydicom parses it, and only fails when decoding the value."""
    raw = bytearray(path.read_bytes())
    i = raw.find(tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little"), 132)
    assert i > 0
    raw[i + 4: i + 6] = vr
    path.write_bytes(bytes(raw))


def _set_raw(path, keyword: str, vr: str, value) -> None:
    """Store ``value`` under ``keyword`` with ``vr`` whether or not it is valid DICOM."""
    from pydicom import config
    from pydicom.dataelem import DataElement

    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        ds = pydicom.dcmread(path)
        ds[keyword] = DataElement(keyword, vr, value, validation_mode=config.IGNORE)
        ds.save_as(path, enforce_file_format=False)
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes


# pydicom decodes values lazily: these files parse, and only fail once the value is used.
LATE_DECODE = {
    "Modality": ((0x0008, 0x0060), b"SL", "BytesLengthException"),  # "MR" is 2 bytes, SL needs 4
    "SOPInstanceUID": ((0x0008, 0x0018), b"UK", "Unknown Value Representation"),
    "PixelSpacing": ((0x0028, 0x0030), b"Ds", "Unknown Value Representation"),
    "RescaleSlope": ((0x0028, 0x1053), b"FD", "BytesLengthException"),
}


@pytest.mark.parametrize("keyword", list(LATE_DECODE))
def test_bad_header_value_that_only_fails_when_decoded(tmp_path, keyword):
    tag, vr, why = LATE_DECODE[keyword]
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 4)))
    _set_vr(paths[0], tag, vr)
    # Read directly: the file is refused with the element and the decoder's complaint.
    with pytest.raises(InputError, match="unreadable DICOM header") as err:
        read_dicom_series(paths)
    assert str(paths[0]) in str(err.value) and keyword in str(err.value) and why in str(err.value)
    # Found: the file is skipped, and its series is known to be incomplete, so reading it refuses too.
    found = find_dicom_series(tmp_path)
    assert [len(s) for s in found] == [3] and found[0].unreadable[0][0] == paths[0]
    assert dict(found.skipped)[paths[0]].startswith("unreadable DICOM header")
    for source in (found[0], tmp_path):
        with pytest.raises(InputError, match="is incomplete without this file") as err:
            read_dicom_series(source)
        assert str(err.value).startswith(str(paths[0]))
    # Left out, the first slice would silently shorten the volume: the caller has to ask for that.
    assert read_dicom_series(found[0].files).array.shape == (1, 8, 8, 3)


def test_undecodable_element_the_reader_never_uses_is_ignored(tmp_path):
    data = synthetic_data(shape=(8, 8, 3))
    paths = write_series(tmp_path, data)
    _set_vr(paths[1], (0x0020, 0x0013), b"SL")  # InstanceNumber "2 ": 2 bytes, not an SL
    found = find_dicom_series(tmp_path)
    assert [len(s) for s in found] == [3] and not found.skipped and not found[0].unreadable
    np.testing.assert_array_equal(read_dicom_series(found[0]).array[0], data)


@pytest.mark.parametrize("keyword,tag,vr,match", [
    ("Rows", (0x0028, 0x0010), b"LT", r"invalid Rows '\\x08': expected one integer"),
    ("Rows", (0x0028, 0x0010), b"PN", "invalid Rows .*: expected one integer"),
    ("Columns", (0x0028, 0x0011), b"AE", "invalid Columns .*: expected one integer"),
    ("SamplesPerPixel", (0x0028, 0x0002), b"DA", "invalid SamplesPerPixel .*: expected one integer"),
])
def test_bad_integer_of_wrong_type(tmp_path, keyword, tag, vr, match):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 2)))
    _set_vr(paths[0], tag, vr)
    with pytest.raises(InputError, match=match) as err:
        read_dicom_series(paths)
    assert str(paths[0]) in str(err.value)


def test_bad_series_number_marks_the_series_incomplete(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 3)))
    _set_vr(paths[0], (0x0020, 0x0011), b"AT")  # "7 " decodes to an empty list of tags
    _set_raw(paths[1], "SeriesNumber", "IS", ["7", "8"])  # two values where one belongs
    found = find_dicom_series(tmp_path)
    reasons = dict(found.skipped)
    assert reasons[paths[0]] == "invalid SeriesNumber []: expected one integer"
    assert reasons[paths[1]].startswith("invalid SeriesNumber [")
    assert found[0].files == paths[2:] and [p for p, _ in found[0].unreadable] == paths[:2]
    with pytest.raises(InputError, match=r"invalid SeriesNumber \[\].*incomplete.*\(1 more such file"):
        read_dicom_series(found[0])


def test_bad_single_slice_thickness_of_wrong_type(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 1)))
    _set_vr(paths[0], (0x0018, 0x0050), b"US")
    with pytest.raises(InputError, match=r"invalid SliceThickness \[.*\]: expected one number"):
        read_dicom_series(paths[0])


def test_bad_unknown_transfer_syntax(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 2)))
    ds = pydicom.dcmread(paths[1])
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    ds.save_as(paths[1], enforce_file_format=False)
    with pytest.raises(InputError, match=r"unknown transfer syntax '1\.2\.3\.4'") as err:
        read_dicom_series(paths)
    assert str(paths[1]) in str(err.value)


@pytest.mark.parametrize("keyword,value,match", [
    ("ImagePositionPatient", "1e999\\0\\0", r"ImagePositionPatient \[inf, 0\.0, 0\.0\] is not finite"),
    ("ImagePositionPatient", "0\\nan\\0", "ImagePositionPatient .* is not finite"),
    ("ImageOrientationPatient", "nan\\0\\0\\0\\1\\0", "ImageOrientationPatient .* is not finite"),
    ("PixelSpacing", "inf\\1", "PixelSpacing .* is not finite"),
    ("PixelSpacing", "0\\0", "PixelSpacing must be positive"),
    ("PixelSpacing", "-1\\1", "PixelSpacing must be positive"),
    ("RescaleIntercept", "-inf", "RescaleIntercept .* is not finite"),
])
def test_bad_non_finite_geometry_and_rescale(tmp_path, keyword, value, match):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 3)))
    for path in paths:
        _set_raw(path, keyword, "DS", value)
    with pytest.raises(InputError, match=match):
        read_dicom_series(paths)


@pytest.mark.parametrize("spacing", ["1e-300\\1e-300", "1e308\\1e308"])
def test_bad_geometry_degenerate_or_overflowing(tmp_path, spacing):
    """Each value finite, but the voxel volume is 0 or overflows: the last check before a volume leaves."""
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 1)))
    _set_raw(paths[0], "PixelSpacing", "DS", spacing)
    with pytest.raises(InputError, match="voxel geometry is not finite or degenerate"):
        read_dicom_series(paths[0])


# ---------------------------------------------------------------- writer


def test_writer_header_and_references(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="medldm")
    write_series(tmp_path / "src", synthetic_data())
    vol = read_dicom_series(tmp_path / "src")
    out = write_dicom_series(vol, tmp_path / "out", derivation_description="denoised by test")
    assert caplog.records and "Doe" not in caplog.text  # logs never carry patient names
    assert [p.name for p in out] == [f"IM{k:05d}.dcm" for k in range(1, 7)]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    ds = pydicom.dcmread(out[2])
    tpl = vol.meta["dicom"]
    assert ds.SeriesInstanceUID != tpl["SeriesInstanceUID"] and ds.SOPInstanceUID not in tpl["SOPInstanceUIDs"]
    for kw in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "StudyDate"):
        assert str(ds[kw].value) == tpl[kw]
    assert str(ds.PatientName) == "Doe^Jane"
    assert ds.SeriesNumber == 1007 and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.SeriesDescription == "T1 synthetic medldm" and ds.DerivationDescription == "denoised by test"
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [tpl["SOPInstanceUIDs"][2]]
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == tpl["SeriesInstanceUID"] and len(ref.ReferencedInstanceSequence) == 6
    equip = ds.ContributingEquipmentSequence[0]
    assert equip.Manufacturer == "medldm" and equip.SoftwareVersions == medldm.__version__
    with pytest.raises(InputError, match="already contains"):
        write_dicom_series(vol, tmp_path / "out")


def test_roundtrip_oblique_float_data(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 30.0, size=(12, 10, 5)).astype(np.float32)
    affine = _affine(_rotation(), (0.9, 1.1, 2.0), (12.5, -40.0, 7.25))
    vol = Volume(data[None], affine, "MR", {})
    write_dicom_series(vol, tmp_path)
    back = read_dicom_series(tmp_path)
    slope = float(pydicom.dcmread(next(tmp_path.iterdir())).RescaleSlope)
    assert np.max(np.abs(back.array - vol.array)) <= slope / 2 + 1e-4
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)


def test_non_negative_mr_is_stored_unsigned(tmp_path):
    data = np.abs(np.random.default_rng(6).normal(60.0, 40.0, size=(12, 10, 4))).astype(np.float32)  # max ~ 131
    files = write_dicom_series(Volume(data[None], np.eye(4), "MR", {}), tmp_path)
    ds = pydicom.dcmread(files[0])
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == 0.0
    back = read_dicom_series(tmp_path).array
    assert back.min() >= 0 and np.max(np.abs(back - data[None])) <= float(ds.RescaleSlope) / 2 + 1e-4
    integral = np.round(data * 10)  # integral magnitudes within uint16 are the stored values, no rescale written
    files = write_dicom_series(Volume(integral[None], np.eye(4), "MR", {}), tmp_path / "int")
    ds = pydicom.dcmread(files[0])
    assert ds.PixelRepresentation == 0 and "RescaleSlope" not in ds
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "int").array[0], integral)


def test_writer_lps_signs(tmp_path):
    affine = _affine(np.eye(3), (0.5, 0.75, 3.0), (10.0, 20.0, 30.0))  # RAS: i -> R, j -> A, k -> S
    files = write_dicom_series(Volume(synthetic_data(shape=(6, 4, 2))[None], affine, "MR", {}), tmp_path)
    first, second = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], [-10.0, -20.0, 30.0])
    np.testing.assert_allclose([float(v) for v in second.ImagePositionPatient], [-10.0, -20.0, 33.0])
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient], [-1, 0, 0, 0, -1, 0], atol=1e-12)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [0.75, 0.5])
    assert (first.Rows, first.Columns) == (4, 6)


def test_ct_hu_kept_integral(tmp_path):
    data = synthetic_data(lo=-1024, hi=3000)
    write_series(tmp_path / "src", data, modality="CT", intercept=-1024.0)
    vol = read_dicom_series(tmp_path / "src")
    assert vol.modality == "CT"
    files = write_dicom_series(vol, tmp_path / "out")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.RescaleType == "HU"
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0 and ds.PixelRepresentation == 1
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "out").array, vol.array)


def test_super_resolved_spacing_and_source_refs(tmp_path):
    write_series(tmp_path / "src", synthetic_data(), step=2.5)
    vol = read_dicom_series(tmp_path / "src")
    fine = vol.affine.copy()
    fine[:3, 2] /= 2  # twice the slices at half the spacing
    sr = vol.with_array(np.repeat(vol.array, 2, axis=-1), affine=fine)
    files = write_dicom_series(sr, tmp_path / "out")
    ds = pydicom.dcmread(files[5])
    assert float(ds.SliceThickness) == pytest.approx(1.25) and float(ds.SpacingBetweenSlices) == pytest.approx(1.25)
    assert len(ds.SourceImageSequence) == 6  # counts differ: every source slice is referenced
    back = read_dicom_series(tmp_path / "out")
    np.testing.assert_allclose(back.affine, fine, atol=1e-4)


def test_writer_rejects_missing_modality_and_channels(tmp_path):
    with pytest.raises(InputError, match="modality"):
        write_dicom_series(Volume(np.zeros((1, 4, 4, 2))), tmp_path / "a")
    with pytest.raises(InputError, match="one channel"):
        write_dicom_series(Volume(np.zeros((2, 4, 4, 2)), modality="MR"), tmp_path / "b")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("modality", ["MR", "CT"])
@pytest.mark.parametrize("with_source", [True, False])
def test_dciodvfy_reports_no_errors(tmp_path, modality, with_source):
    data = synthetic_data(shape=(8, 6, 2), lo=-500, hi=500)
    if with_source:
        write_series(tmp_path / "src", data, modality=modality)
        vol = read_dicom_series(tmp_path / "src").with_array(data[None] + 0.25)  # non-integral: real rescale
    else:
        vol = Volume(data[None] * 1.5, _affine(_rotation(), (1.0, 1.0, 2.0), (0, 0, 0)), modality, {})
    files = write_dicom_series(vol, tmp_path / "out", derivation_description="test")
    for path in files:
        result = subprocess.run(["dciodvfy", os.fspath(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert not errors, errors


def test_read_volume_dispatches_dicom(tmp_path):
    paths = write_series(tmp_path, synthetic_data(shape=(8, 8, 2)))
    assert read_volume(tmp_path).array.shape == (1, 8, 8, 2)
    assert read_volume(paths[0]).array.shape == (1, 8, 8, 1)


def test_left_handed_volume_comes_back_world_equivalent(tmp_path):
    # Slice axis against row x column: the reader re-sorts along the normal, so k is flipped but every voxel
    # keeps its world position.
    affine = _affine(np.eye(3), (1.0, 1.0, 2.0), (0.0, 0.0, 10.0))
    affine[:3, 2] *= -1
    data = synthetic_data(shape=(6, 5, 4))
    write_dicom_series(Volume(data[None], affine, "MR", {}), tmp_path)
    back = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(back.array[0], data[:, :, ::-1])
    np.testing.assert_allclose(back.affine @ [0, 0, 3, 1], affine @ [0, 0, 0, 1], atol=1e-4)


def test_skip_bad_slices_leaves_out_an_unreadable_end_slice_but_not_a_gap(tmp_path):
    paths = write_series(tmp_path / "s", synthetic_data(shape=(8, 6, 5)))
    last, middle = paths[-1], paths[2]
    last.write_bytes(last.read_bytes()[:-40])  # a truncated copy: its pixel data are short
    with pytest.raises(InputError):
        read_dicom_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s", skip_bad_slices=True)
    assert vol.array.shape == (1, 8, 6, 4)
    assert [s["file"] for s in vol.meta["skipped_slices"]] == [last.name] and vol.meta["skipped_slices"][0]["reason"]
    np.testing.assert_array_equal(vol.array, read_dicom_series(paths[:-1]).array)
    middle.write_bytes(middle.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"2 unreadable slice\(s\) were left out, which leaves this gap"):
        read_dicom_series(tmp_path / "s", skip_bad_slices=True)

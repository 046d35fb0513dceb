"""De-identified derived DICOM: no identifying value of the source in any output byte, a consistent mapping within
one Deidentifier (and under one secret), dates shifted or removed, burned-in sources refused, dciodvfy clean."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medldm.errors import InputError
from medldm.io import read_dicom_series, write_dicom_series
from medldm.io.deidentify import Deidentifier
from tests.io.conftest import synthetic_data, write_series

IDENTIFYING = {"PatientName": "Doe^Jane", "PatientID": "MRN-778812", "PatientBirthDate": "19610314",
               "AccessionNumber": "ACC99123", "StudyID": "ST4411", "StudyDescription": "Brain MRI for Jane Doe",
               "InstitutionName": "St Example Hospital", "ReferringPhysicianName": "House^Gregory",
               "StationName": "MRSCANNER07", "DeviceSerialNumber": "SN-5550123", "ProtocolName": "DoeJane_T1",
               "StudyDate": "20240101", "SeriesDate": "20240101", "PatientAge": "062Y", "PatientWeight": "71.5",
               "SeriesDescription": "T1 of Jane Doe"}


def _source(folder: Path, series: int = 7, **extra) -> Path:
    per_slice = {k: {**IDENTIFYING, "SeriesNumber": series, **extra} for k in range(3)}
    write_series(folder, synthetic_data(shape=(8, 6, 3)), per_slice=per_slice)
    return folder


def _identifiers(folder: Path) -> set[str]:
    """Every identifying value of the source series: the values above, its UIDs, the folder's path."""
    values = {v for v in IDENTIFYING.values() if len(v) >= 6} | {str(folder)}
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        values |= {str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                               "FrameOfReferenceUID")}
    return values


def _leaks(out: Path, identifiers: set[str]) -> list[str]:
    return [f"{p.name}: {i}" for p in out.rglob("*") if p.is_file() for i in identifiers
            if i.encode() in p.read_bytes()]


def test_no_identifying_value_reaches_any_output_byte(tmp_path):
    src = _source(tmp_path / "src")
    files = write_dicom_series(read_dicom_series(src), tmp_path / "out", deidentify=Deidentifier())
    assert len(files) == 3 and _leaks(tmp_path / "out", _identifiers(src)) == []
    ds = pydicom.dcmread(files[0])
    assert ds.PatientIdentityRemoved == "YES" and "medldm --deidentify" in ds.DeidentificationMethod
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]  # Basic Profile, dates modified (shifted)
    assert ds.PatientName and ds.PatientName != IDENTIFYING["PatientName"]  # replaced, not just dropped
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and "StudyDescription" not in ds
    assert ds.StudyDate != IDENTIFYING["StudyDate"] and len(ds.StudyDate) == 8  # a valid, shifted date
    # the image and its geometry are the reconstruction's own
    plain = write_dicom_series(read_dicom_series(src), tmp_path / "plain")
    a, b = read_dicom_series(tmp_path / "out"), read_dicom_series(tmp_path / "plain")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert len(plain) == 3


def test_one_deidentifier_keeps_a_study_one_study(tmp_path):
    src1, src2 = _source(tmp_path / "s1"), _source(tmp_path / "s2", series=8)
    # the second series of the same study: same study and frame of reference
    first = pydicom.dcmread(next(src1.glob("*.dcm")))
    for p in src2.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = first.StudyInstanceUID, first.FrameOfReferenceUID
        ds.save_as(p)
    deid = Deidentifier()
    out1 = write_dicom_series(read_dicom_series(src1), tmp_path / "o1", deidentify=deid)
    out2 = write_dicom_series(read_dicom_series(src2), tmp_path / "o2", deidentify=deid)
    a, b = pydicom.dcmread(out1[0]), pydicom.dcmread(out2[0])
    assert a.StudyInstanceUID == b.StudyInstanceUID != first.StudyInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID and a.PatientID == b.PatientID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    # another run maps elsewhere; the same secret maps alike
    other = pydicom.dcmread(write_dicom_series(read_dicom_series(src1), tmp_path / "o3", deidentify=Deidentifier())[0])
    assert other.StudyInstanceUID != a.StudyInstanceUID and other.PatientName != a.PatientName
    s1 = pydicom.dcmread(write_dicom_series(read_dicom_series(src1), tmp_path / "k1",
                                            deidentify=Deidentifier(secret="site key 0123456789"))[0])
    s2 = pydicom.dcmread(write_dicom_series(read_dicom_series(src1), tmp_path / "k2",
                                            deidentify=Deidentifier(secret="site key 0123456789"))[0])
    assert (s1.StudyInstanceUID, s1.PatientName, s1.StudyDate) == (s2.StudyInstanceUID, s2.PatientName, s2.StudyDate)


def test_dates_removed_on_request(tmp_path):
    src = _source(tmp_path / "src")
    files = write_dicom_series(read_dicom_series(src), tmp_path / "out", deidentify=Deidentifier(dates="remove"))
    ds = pydicom.dcmread(files[0])
    dated = [e.keyword for e in ds.iterall() if e.VR in ("DA", "DT", "TM") and e.value not in ("", None)]
    assert dated == []
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100"]
    with pytest.raises(ValueError, match="shift' or 'remove"):
        Deidentifier(dates="blur")


def test_a_source_with_burned_in_annotation_is_refused(tmp_path):
    src = _source(tmp_path / "src", BurnedInAnnotation="YES")
    vol = read_dicom_series(src)
    with pytest.raises(InputError, match="BurnedInAnnotation YES"):
        write_dicom_series(vol, tmp_path / "out", deidentify=Deidentifier())
    assert not (tmp_path / "out").exists()
    # without --deidentify the derived series says what its pixels hold
    assert pydicom.dcmread(write_dicom_series(vol, tmp_path / "plain")[0]).BurnedInAnnotation == "YES"


def test_path_digests_are_keyed_and_redact_messages():
    a, b = Deidentifier(secret="k" * 20), Deidentifier(secret="k" * 20)
    assert a.hash_text("/data/Doe_Jane/IM1.dcm") == b.hash_text("/data/Doe_Jane/IM1.dcm")
    assert Deidentifier().hash_text("/data/Doe_Jane/IM1.dcm") != a.hash_text("/data/Doe_Jane/IM1.dcm")
    message = a.redact("/data/Doe_Jane/IM1.dcm: truncated pixel data (under /data/Doe_Jane)",
                       [Path("/data/Doe_Jane/IM1.dcm"), Path("/data/Doe_Jane")])
    assert "Doe" not in message and message.startswith("<input ") and "truncated pixel data" in message


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("dates", ["shift", "remove"])
def test_deidentified_series_pass_dciodvfy(tmp_path, dates):
    files = write_dicom_series(read_dicom_series(_source(tmp_path / "src")), tmp_path / "out",
                               deidentify=Deidentifier(dates=dates))
    for path in files:
        result = subprocess.run(["dciodvfy", os.fspath(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert not errors, errors

"""Synthetic DICOM series written directly with pydicom, independent of medldm's writer.

Reader tests must not depend on the writer being right, so this builds files from first principles:
pixel_k[j, i] = (data[i, j, k] - intercept) / slope at ImagePositionPatient = ipp0 + k * step * normal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, CTImageStorage, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def synthetic_data(shape=(16, 12, 6), seed=0, lo=0, hi=1000) -> np.ndarray:
    """Integer-valued float32 test data, (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, size=shape).astype(np.float32)


def write_series(
    folder: Path,
    data: np.ndarray,
    *,
    iop=AXIAL,
    ipp0=(-20.0, -30.0, 10.0),
    pixel_spacing=(0.8, 0.7),  # (between rows, between columns)
    step=2.5,
    positions=None,  # explicit list of IPPs overrides ipp0/step
    modality="MR",
    slope=1.0,
    intercept=0.0,
    series_uid=None,
    instance_numbers=None,
    names=None,
    transfer_syntax=ExplicitVRLittleEndian,
    per_slice=None,  # {k: {keyword: value}} overrides, applied last
) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = data.shape
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    series_uid = series_uid or generate_uid()
    study_uid, for_uid = generate_uid(), generate_uid()
    signed = intercept < 0 or float(np.min(data)) < 0
    paths = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.SOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "P001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.SeriesNumber = 7
        ds.SeriesDescription = "T1 synthetic"
        ds.StudyDate = "20240101"
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        pos = positions[k] if positions is not None else np.asarray(ipp0, float) + k * step * normal
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = float(step)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((data[:, :, k].T - intercept) / slope).astype(np.int16 if signed else np.uint16)
        ds.PixelData = stored.tobytes()
        for kw, value in (per_slice or {}).get(k, {}).items():
            if value is None:
                delattr(ds, kw)
            else:
                setattr(ds, kw, value)
        name = names[k] if names is not None else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_affine_ras(ipp0=(-20.0, -30.0, 10.0), pixel_spacing=(0.8, 0.7), step=2.5) -> np.ndarray:
    """RAS affine expected for write_series' default axial geometry."""
    return np.array([
        [-pixel_spacing[1], 0, 0, -ipp0[0]],
        [0, -pixel_spacing[0], 0, -ipp0[1]],
        [0, 0, step, ipp0[2]],
        [0, 0, 0, 1],
    ], dtype=float)


@pytest.fixture
def make_series():
    return write_series

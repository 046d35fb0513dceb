"""Write a Volume as a derived single-frame MR or CT DICOM series that passes dciodvfy.

The result is a new series in the source study: patient, study and frame of reference are kept so PACS files
it next to the original, while series and instance UIDs are new and ImageType says DERIVED\\SECONDARY.
Geometry is recomputed from the volume affine for every slice, so outputs on a new grid (super-resolution)
are placed correctly. Each file goes to a temporary name first, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

import medldm
from medldm.errors import InputError
from medldm.io.dicom_read import LPS_TO_RAS
from medldm.io.volume import MODALITIES, Volume

if TYPE_CHECKING:
    from medldm.io.deidentify import Deidentifier

log = logging.getLogger(__name__)

_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}
_ORTHO_TOL = 1e-4

# Copied verbatim from the source when present; all are optional or type 2 in the target IODs.
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
                  "ReferringPhysicianName", "FrameOfReferenceUID", "PositionReferenceIndicator",
                  "BodyPartExamined", "PatientPosition", "Laterality", "ProtocolName",
                  "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName", "DeviceSerialNumber")
_MR_KEYS = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
            "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "ImagedNucleus", "FlipAngle",
            "ImagingFrequency")
_CT_KEYS = ("KVP", "ConvolutionKernel", "XRayTubeCurrent", "ExposureTime", "Exposure")
# Type 2 attributes that must exist (possibly empty) for the IOD to validate.
_TYPE2_COMMON = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "ReferringPhysicianName", "PositionReferenceIndicator", "Manufacturer",
                 "PatientPosition", "Laterality")
_TYPE2_MR = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime")
_TYPE2_CT = ("KVP",)


def _ds(value: float) -> float:
    """The value as it will read back from a 16-character DS string."""
    return float(DSfloat(float(value), auto_format=True))


def choose_pixel_encoding(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored integers, RescaleSlope, RescaleIntercept) representing ``values`` without clipping.

    Integral data within int16 (CT HU) or uint16 (MR) keep slope 1 and intercept 0, so stored values are the data.
    Non-negative data (magnitude MR) are stored unsigned with intercept 0; anything else is spread over the full
    int16 range. The quantisation error is at most slope / 2.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.round(values)))
    if integral and lo >= 0 and hi <= 65535:
        return values.astype(np.uint16), 1.0, 0.0
    if integral and lo >= -32768 and hi <= 32767:
        return values.astype(np.int16), 1.0, 0.0
    if hi == lo:
        return np.zeros(values.shape, np.uint16 if lo >= 0 else np.int16), 1.0, _ds(lo)
    if lo >= 0:
        slope = _ds(hi / 65000.0)  # headroom so DS rounding cannot push the maximum off the range
        return np.clip(np.round(values / slope), 0, 65535).astype(np.uint16), slope, 0.0
    # Round slope/intercept to what DS can hold first, then quantise against those exact values.
    slope = _ds((hi - lo) / 65000.0)
    intercept = _ds((hi + lo) / 2.0)
    stored = np.round((values - intercept) / slope)
    return np.clip(stored, -32768, 32767).astype(np.int16), slope, intercept


def _geometry(affine: np.ndarray, path_label: str):
    """Per-volume DICOM geometry in LPS from the RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_vec, row_vec, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    if dx <= 0 or dy <= 0:
        raise InputError(path_label, "affine has a zero-length in-plane axis")
    row_dir, col_dir = col_vec / dx, row_vec / dy  # IOP: direction along a row, then down a column
    if abs(float(row_dir @ col_dir)) > _ORTHO_TOL:
        raise InputError(path_label, "affine in-plane axes are not orthogonal; DICOM cannot store a sheared image plane")
    normal = np.cross(row_dir, col_dir)
    spacing = abs(float(step @ normal))
    if spacing <= 1e-6:
        raise InputError(path_label, "affine slice axis lies in the image plane")
    return lps, row_dir, col_dir, normal, dx, dy, spacing


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _fmt(values) -> list[str]:
    # DS strings are limited to 16 characters; auto_format keeps full precision within that.
    return [DSfloat(float(v), auto_format=True) for v in values]


def _source_template(volume: Volume, source_meta) -> dict:
    if source_meta is None:
        source_meta = volume.meta.get("dicom") or {}
    if isinstance(source_meta.get("dicom"), dict):  # a whole Volume.meta was passed
        source_meta = source_meta["dicom"]
    return dict(source_meta)


def write_dicom_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    source_meta: dict | None = None,
    series_description_suffix: str = " medldm",
    derivation_description: str = "",
    series_number: int | None = None,
    modality: str | None = None,
    deidentify: Deidentifier | None = None,
) -> list[Path]:
    """Write ``volume`` (one channel) as a derived series into ``out_dir``; returns the files in slice order.

    ``source_meta`` is the ``meta["dicom"]`` template from read_dicom_series (default: the volume's own).
    Without it the series gets a new anonymous patient and study. ``deidentify`` (a ``Deidentifier``, one per
    run) applies the PS3.15 Basic Profile to every file; the source's free-text series description is then not
    kept, and a source marked BurnedInAnnotation YES is refused before anything is written.
    """
    out = Path(out_dir)
    src = _source_template(volume, source_meta)
    if deidentify is not None:
        deidentify.check_source(src.get("BurnedInAnnotation"), out)
    modality = (modality or volume.modality or src.get("Modality") or "").upper()
    if modality not in MODALITIES:
        raise InputError(out, f"cannot write DICOM without a modality in {MODALITIES} (got {modality or None!r}); "
                              f"pass modality=")
    array = np.asarray(volume.array)
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[0] != 1:
        raise InputError(out, f"DICOM series hold one channel; volume has {array.shape[0]} (write one at a time)")
    data = array[0]
    if not np.all(np.isfinite(data)):
        raise InputError(volume.meta.get("source") or out, "volume contains NaN/Inf voxels; cannot write DICOM")

    lps, row_dir, col_dir, normal, dx, dy, spacing = _geometry(volume.affine, str(out))
    stored, slope, intercept = choose_pixel_encoding(data)
    nx, ny, nz = data.shape

    now = _dt.datetime.now()
    base = _series_header(src, modality, now, series_number=series_number, deidentified=deidentify is not None,
                          description_suffix=series_description_suffix, derivation=derivation_description)
    src_refs = _source_references(src, modality)
    if src_refs and src.get("SeriesInstanceUID"):
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = src["SeriesInstanceUID"]
        ref_series.ReferencedInstanceSequence = DicomSequence([copy.deepcopy(r) for r in src_refs])
        base.ReferencedSeriesSequence = DicomSequence([ref_series])
    _image_plane_and_pixels(base, modality, data, stored, slope, intercept, row_dir, col_dir, dx, dy, spacing)

    out.mkdir(parents=True, exist_ok=True)
    names = [out / f"IM{k + 1:05d}.dcm" for k in range(nz)]
    clash = [p.name for p in names if p.exists()]
    if clash:
        raise InputError(out, f"already contains {clash[0]} (and {len(clash) - 1} more) from an earlier write; "
                              f"use an empty folder")

    per_slice_refs = len(src_refs) == nz
    written = []
    for k, path in enumerate(names):
        ds = _slice_dataset(base, stored, k, lps[:3, 3] + k * lps[:3, 2], normal,
                            [src_refs[k]] if per_slice_refs else src_refs)
        if deidentify is not None:
            deidentify(ds)
        _atomic_save(ds, path)
        written.append(path)
    log.info("wrote a derived %s series: %d slices (%dx%d)", modality, nz, nx, ny)  # no UID or path at INFO
    log.debug("derived series %s in %s", base.SeriesInstanceUID, out)
    return written


def _series_header(src: dict, modality: str, now: _dt.datetime, *, series_number: int | None, deidentified: bool,
                   description_suffix: str, derivation: str) -> Dataset:
    """Patient and study kept from the source (new anonymous ones without it), a new derived series, and the
    contributing equipment: the attributes every slice of the series shares but geometry and pixels."""
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    src_number = src.get("SeriesNumber")
    if series_number is None:
        series_number = (int(src_number) + 1000) if src_number not in (None, "") else 1000

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient names may carry any script
    for kw in _PATIENT_STUDY + (_MR_KEYS if modality == "MR" else _CT_KEYS):
        if src.get(kw) not in (None, ""):
            setattr(base, kw, src[kw])
    if "StudyInstanceUID" not in base:
        base.StudyInstanceUID = generate_uid()
        base.StudyDate, base.StudyTime = date, time
        base.PatientName = base.get("PatientName", "Anonymous^Patient")
        base.PatientID = base.get("PatientID", "MEDLDM-" + base.StudyInstanceUID[-8:])
        base.StudyID = base.get("StudyID", "MEDLDM")
    if "FrameOfReferenceUID" not in base:
        base.FrameOfReferenceUID = generate_uid()
    for kw in _TYPE2_COMMON + (_TYPE2_MR if modality == "MR" else _TYPE2_CT):
        if kw not in base:
            setattr(base, kw, None)
    if modality == "MR":
        # Type 1 in the MR Image module; "RM" (research mode) and "NONE" when the source does not say.
        base.ScanningSequence = src.get("ScanningSequence") or "RM"
        base.SequenceVariant = src.get("SequenceVariant") or "NONE"

    base.SOPClassUID = _SOP_CLASS[modality]
    base.Modality = modality
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = int(series_number)
    base.SeriesDate, base.SeriesTime = date, time
    kept = "" if deidentified else str(src.get("SeriesDescription", "") or "")  # free text: may identify
    base.SeriesDescription = (kept + description_suffix).strip()[:64] or "medldm"
    base.ContentDate, base.ContentTime = date, time
    base.InstanceCreationDate, base.InstanceCreationTime = date, time
    # Value 3 is mandatory for both IODs: CT allows AXIAL/LOCALIZER, MR a defined term (OTHER fits all).
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
    base.DerivationDescription = (derivation or f"medldm {medldm.__version__}")[:1024]
    base.AcquisitionNumber = None
    base.PatientOrientation = None
    # a reconstruction shows what its source's pixels show, burned-in text included
    base.BurnedInAnnotation = "YES" if str(src.get("BurnedInAnnotation", "")).upper() == "YES" else "NO"

    equipment = Dataset()
    equipment.Manufacturer = "medldm"
    equipment.ManufacturerModelName = "medldm"
    equipment.SoftwareVersions = str(medldm.__version__)
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = base.DerivationDescription[:64]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence([_code("109102", "DCM", "Processing Equipment")])
    base.ContributingEquipmentSequence = DicomSequence([equipment])
    return base


def _source_references(src: dict, modality: str) -> list[Dataset]:
    """One (class, instance) reference per source image, for the Source Image and Referenced Series sequences."""
    src_sops = list(src.get("SOPInstanceUIDs") or [])
    src_classes = list(src.get("SOPClassUIDs") or [src.get("SOPClassUID", _SOP_CLASS[modality])] * len(src_sops))
    refs = []
    for sop, cls in zip(src_sops, src_classes):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, sop
        refs.append(item)
    return refs


def _image_plane_and_pixels(base: Dataset, modality: str, data: np.ndarray, stored: np.ndarray, slope: float,
                            intercept: float, row_dir, col_dir, dx: float, dy: float, spacing: float) -> None:
    """The Image Plane and Image Pixel attributes every slice shares, the rescale and a display window."""
    nx, ny = data.shape[:2]
    base.PixelSpacing = _fmt([dy, dx])  # (between rows, between columns)
    base.ImageOrientationPatient = _fmt(np.concatenate([row_dir, col_dir]))
    base.SliceThickness = _fmt([spacing])[0]
    base.SpacingBetweenSlices = _fmt([spacing])[0]

    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = ny, nx
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    # The MR IOD has no Modality LUT: rescale is a tolerated extension (dciodvfy warns), so MR writes it
    # only when needed; CT requires it.
    if modality == "CT" or (slope, intercept) != (1.0, 0.0):
        base.RescaleIntercept = _fmt([intercept])[0]
        base.RescaleSlope = _fmt([slope])[0]
    if modality == "CT":
        base.RescaleType = "HU"
    lo, hi = float(data.min()), float(data.max())
    base.WindowCenter = _fmt([(lo + hi) / 2])[0]
    base.WindowWidth = _fmt([max(hi - lo, 1.0)])[0]


def _slice_dataset(base: Dataset, stored: np.ndarray, k: int, position: np.ndarray, normal: np.ndarray,
                   refs: list[Dataset]) -> Dataset:
    """Slice k of the series: the shared header, a new instance UID, its position, sources and pixels."""
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = _fmt(position)
    ds.SliceLocation = _fmt([position @ normal])[0]
    if refs:
        items = []
        for r in refs:
            item = copy.deepcopy(r)
            item.PurposeOfReferenceCodeSequence = DicomSequence(
                [_code("121322", "DCM", "Source image for image processing operation")])
            items.append(item)
        ds.SourceImageSequence = DicomSequence(items)
    # Rows are Y and columns X: the transpose undoes the reader's array[0, i, j, k] = pixel_k[j, i].
    ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = f"MEDLDM_{medldm.__version__}"[:16]
    return ds


def _atomic_save(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True, implicit_vr=False, little_endian=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

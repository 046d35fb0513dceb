"""Read single-frame DICOM image series (CT, MR, ...) into a Volume.

Slices are ordered by their position projected on the slice normal, never by InstanceNumber or file name:
both are routinely wrong or reset after anonymisation and PACS export. Geometry comes from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing in DICOM's LPS frame and is converted to RAS+.
Everything a user can get wrong raises InputError naming the file or series, so a bad export is reported in
one line instead of a pydicom traceback.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from medldm.errors import InputError
from medldm.io.dicom_values import (as_float, as_floats, as_int, decode_header, error_text, jsonable,
                                   parse_file, text_value)
from medldm.io.dicom_stack import stack_slices
from medldm.io.volume import MODALITIES, Volume

log = logging.getLogger(__name__)

# DICOM patient coordinates are LPS; RAS+ flips the first two axes. The matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_ORIENT_TOL = 1e-3  # direction-cosine difference (~0.06 deg): scanners round IOP to ~6 digits
_DICOMDIR_UID = "1.2.840.10008.1.3.10"

# Header values the writer copies into a derived series; kept JSON-friendly so meta can be serialised.
TEMPLATE_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "Modality",
    "BodyPartExamined", "PatientPosition", "Laterality", "ProtocolName",
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName", "DeviceSerialNumber",
    "SoftwareVersions", "SliceThickness", "SpacingBetweenSlices", "SpecificCharacterSet", "BurnedInAnnotation",
    # MR Image module
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
    "EchoTime", "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "ImagedNucleus",
    "FlipAngle", "ImagingFrequency",
    # CT Image module
    "KVP", "ConvolutionKernel", "XRayTubeCurrent", "ExposureTime", "Exposure", "RescaleType",
)

# Elements the reader, the batch and the writer's template use: one that does not decode makes a file unreadable.
_NEEDED = frozenset(TEMPLATE_KEYWORDS) | {
    "TransferSyntaxUID", "MediaStorageSOPClassUID", "SOPClassUID", "SOPInstanceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
}


@dataclass
class SeriesInfo:
    """One image series found on disk (files may live in several folders).

    ``unreadable`` lists (path, why) for image files that name this series but whose header cannot be used:
    the series is incomplete, and read_dicom_series refuses it naming the first such file.
    """

    series_uid: str
    files: list[Path]
    modality: str | None = None
    description: str = ""
    series_number: int | None = None
    sop_class_uid: str = ""
    study_uid: str = ""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def folders(self) -> list[Path]:
        return sorted({f.parent for f in self.files})

    def __len__(self) -> int:
        return len(self.files)


class SeriesList(list):
    """find_dicom_series result: the image series, plus ``skipped``: (path, reason) for every file left out."""

    def __init__(self, series=(), skipped=()):
        super().__init__(series)
        self.skipped: list[tuple[Path, str]] = list(skipped)


def _read_header(path: Path, **kwargs) -> tuple[pydicom.FileDataset | None, str]:
    """(dataset, "") for a usable file, (dataset, why) when it parsed but a header value cannot be decoded,
    (None, why) when it cannot be parsed at all."""
    with warnings.catch_warnings():
        # pydicom warns on every slightly non-conformant value; the reader reports real problems itself.
        warnings.simplefilter("ignore")
        ds, why = parse_file(path, **kwargs)
        return ds, (decode_header(ds, _NEEDED) if ds is not None else why)


def _try_read(path: Path, **kwargs) -> tuple[pydicom.FileDataset | None, str]:
    """(dataset, "") or (None, why); never raises for a bad file. Every header value except pixel data and
    deferred ones is decoded here, so reading them later cannot raise pydicom's lazy decoding errors."""
    ds, why = _read_header(path, **kwargs)
    return (None, why) if why else (ds, "")


def _file_meta(ds, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(keyword, "") or "") if meta is not None else ""


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID") or _file_meta(ds, "MediaStorageSOPClassUID")
    return UID(str(uid)).name if uid else "unknown SOP class"


def _modality(ds) -> str | None:
    m = str(ds.get("Modality", "") or "").upper()
    return m if m in MODALITIES else None


def _scan_entry(path: Path, ds) -> tuple[SeriesInfo | None, str, str]:
    """(one-file SeriesInfo, SOPInstanceUID, "") for an image file, else (None, "", why it is left out)."""
    if _file_meta(ds, "MediaStorageSOPClassUID") == _DICOMDIR_UID:
        return None, "", "DICOMDIR (directory index)"
    if "PixelData" not in ds:
        return None, "", f"no pixel data ({_sop_class_name(ds)})"
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        return None, "", "no SeriesInstanceUID"
    info = SeriesInfo(uid, [path], _modality(ds), str(ds.get("SeriesDescription", "") or ""),
                      as_int(ds, "SeriesNumber", path), str(ds.get("SOPClassUID", "") or ""),
                      str(ds.get("StudyInstanceUID", "") or ""))
    return info, str(ds.get("SOPInstanceUID", "") or ""), ""


def find_dicom_series(folder: str | os.PathLike) -> SeriesList:
    """Scan ``folder`` recursively and group image files by SeriesInstanceUID.

    Non-DICOM files, DICOMDIRs, objects without pixel data (structured reports, presentation states...) and
    files whose header cannot be used are left out and listed in the result's ``skipped`` with a reason; an image
    file of the last kind is also listed in its series' ``unreadable``, which read_dicom_series then refuses.
    Series are sorted by series number.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    groups: dict[str, list[SeriesInfo]] = {}
    unreadable: dict[str, list[tuple[Path, str]]] = {}
    seen_sops: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        # defer_size keeps pixel data on disk while the header is parsed: scanning stays cheap.
        ds, reason = _read_header(path, defer_size=1024)
        if ds is None:
            skipped.append((path, reason))
            continue
        info, sop = None, ""
        if not reason:
            try:
                info, sop, reason = _scan_entry(path, ds)
            except InputError as err:
                reason = err.problem
            except Exception as exc:  # noqa: BLE001 - e.g. a deferred value that does not decode
                reason = f"unreadable DICOM header ({error_text(exc)})"
        if info is None:
            skipped.append((path, reason))
            uid = text_value(ds, "SeriesInstanceUID") if reason.startswith(("unreadable", "invalid")) else ""
            if uid and "PixelData" in ds:  # a slice of that series: reading the others would leave it out
                unreadable.setdefault(uid, []).append((path, reason))
        elif sop and sop in seen_sops:
            # The same instance copied into two folders would otherwise look like a duplicate slice.
            skipped.append((path, f"duplicate copy of SOPInstanceUID already in {seen_sops[sop]}"))
        else:
            if sop:
                seen_sops[sop] = path
            groups.setdefault(info.series_uid, []).append(info)

    series = []
    for uid, members in groups.items():
        first = members[0]
        first.files = [m.files[0] for m in members]
        first.unreadable = unreadable.get(uid, [])
        series.append(first)
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    log.debug("found %d image series under %s (%d files skipped)", len(series), root, len(skipped))
    return SeriesList(series, skipped)


def _require_complete(info: SeriesInfo) -> None:
    if info.unreadable:
        path, why = info.unreadable[0]
        more = f" ({len(info.unreadable) - 1} more such file(s))" if len(info.unreadable) > 1 else ""
        raise InputError(path, f"{why}; series {info.series_uid} is incomplete without this file{more}")


def _resolve(source) -> tuple[list[Path], str]:
    """Turn any accepted source into (files, label used in error messages)."""
    if isinstance(source, SeriesInfo):
        if not source.files:
            raise InputError(source.series_uid, "series has no files")
        _require_complete(source)
        return list(source.files), f"series {source.series_uid}"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            found = find_dicom_series(path)
            if not found:
                raise InputError(path, f"no DICOM image series found ({len(found.skipped)} files skipped)")
            if len(found) > 1:
                listing = "; ".join(
                    f"{s.series_uid} (#{s.series_number}, {s.description!r}, {len(s)} files)" for s in found
                )
                raise InputError(path, f"contains {len(found)} image series, pick one with find_dicom_series(): {listing}")
            _require_complete(found[0])
            return list(found[0].files), str(path)
        if not path.exists():
            raise InputError(path, "does not exist")
        return [path], str(path)
    files = [Path(f) for f in source]
    if not files:
        raise InputError(None, "no DICOM files given")
    return files, str(files[0].parent) if len(files) > 1 else str(files[0])


def _decoder_available(ts: str) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(UID(ts)).is_available)
    except Exception:  # noqa: BLE001 - unknown syntax: no decoder
        return False


def _pixels(ds, path: Path) -> np.ndarray:
    ts = _file_meta(ds, "TransferSyntaxUID") or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            px = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises RuntimeError/ValueError/NotImplementedError
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        if ts is not None and not UID(ts).is_transfer_syntax:
            raise InputError(path, f"unknown transfer syntax {ts!r} ({error_text(exc)})") from None
        if ts is not None and UID(ts).is_compressed:
            if not _decoder_available(ts):
                raise InputError(path, (
                    f"compressed transfer syntax {UID(ts).name} ({ts}) cannot be decoded: install pylibjpeg, "
                    f"pylibjpeg-libjpeg and pylibjpeg-openjpeg (or python-gdcm), or decompress the series first "
                    f"(e.g. gdcmconv --raw); decoder said: {first_line}"
                )) from None
            raise InputError(path, f"corrupt {UID(ts).name} pixel data ({first_line})") from None
        raise InputError(path, f"cannot decode pixel data ({error_text(exc)})") from None
    if px.ndim != 2:
        raise InputError(path, f"expected one 2D greyscale frame per file, pixel data has shape {px.shape}")
    slope, intercept = as_float(ds, "RescaleSlope", path, 1.0), as_float(ds, "RescaleIntercept", path, 0.0)
    # Per slice: some scanners (Philips MR) vary the slope from slice to slice.
    return px.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _template(slices: list[tuple[Path, pydicom.Dataset]]) -> dict:
    first = slices[0][1]
    tpl = {}
    for kw in TEMPLATE_KEYWORDS:
        if kw in first:
            value = jsonable(first.get(kw))
            if value is not None:
                tpl[kw] = value
    tpl["SOPInstanceUIDs"] = [str(ds.get("SOPInstanceUID", "")) for _, ds in slices]
    tpl["SOPClassUIDs"] = [str(ds.get("SOPClassUID", "")) for _, ds in slices]
    tpl["SOPClassUID"] = tpl["SOPClassUIDs"][0]
    return tpl


def read_dicom_series(source: SeriesInfo | str | os.PathLike | Sequence[str | os.PathLike], *,
                      skip_bad_slices: bool = False) -> Volume:
    """Read one DICOM image series into a Volume with array ``(1, X, Y, Z)``.

    ``source`` is a SeriesInfo from find_dicom_series, a list of files, a single file (one slice) or a folder
    holding exactly one image series. X runs along ImageOrientationPatient's row direction (column index),
    Y down the rows, Z along the slice normal: ``array[0, i, j, k] == rescaled pixel_array_k[j, i]``.

    ``skip_bad_slices``: leave out slices whose file or pixel data cannot be read (listed in
    ``meta["skipped_slices"]`` with the reason) instead of refusing the series; the geometry checks then run
    on the rest, so a left-out slice inside the stack is still refused as a gap.
    """
    files, label = _resolve(source)
    slices: list[tuple[Path, pydicom.Dataset]] = []
    skipped: list[dict] | None = [] if skip_bad_slices else None
    for f in files:
        ds, reason = _try_read(f)
        if ds is None or "PixelData" not in ds:
            reason = reason if ds is None else f"no pixel data ({_sop_class_name(ds)}): not an image"
            if skipped is None:
                raise InputError(f, reason)
            skipped.append({"file": f.name, "reason": reason})
            continue
        slices.append((f, ds))
    if not slices:
        raise InputError(label, f"no readable slice (all {len(files)} left out: {skipped[0]['reason']})")
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise InputError(label, f"files belong to {len(uids)} different series ({sorted(uids)}); read one at a time")
    return _assemble(slices, label, skipped)


def _decodable(slices, skipped: list[dict]) -> tuple[list, dict]:
    """The slices whose pixel data decode, with their pixels; the others go to ``skipped``."""
    kept, pixels = [], {}
    for path, ds in slices:
        try:
            pixels[path] = _pixels(ds, path)
            kept.append((path, ds))
        except InputError as err:
            skipped.append({"file": path.name, "reason": str(err)})
    return kept, pixels


def _assemble(slices: list[tuple[Path, pydicom.Dataset]], label: str, skipped: list[dict] | None = None) -> Volume:
    pixels: dict = {}
    if skipped is not None:
        slices, pixels = _decodable(slices, skipped)
        if not slices:
            raise InputError(label, f"no slice with readable pixel data (first: {skipped[0]['reason']})")
    left_out = f"; {len(skipped)} unreadable slice(s) were left out, which leaves this gap" if skipped else ""
    # (the gap and spacing checks below name it: a left-out slice inside the stack is refused, not bridged)
    for path, ds in slices:
        if (as_int(ds, "NumberOfFrames", path) or 1) > 1:
            raise InputError(path, "multi-frame (enhanced) DICOM is not supported; convert to single-frame files")
        if (as_int(ds, "SamplesPerPixel", path) or 1) != 1:
            raise InputError(path, "colour (SamplesPerPixel > 1) images are not supported")

    sizes = {(as_int(ds, "Rows", p) or 0, as_int(ds, "Columns", p) or 0) for p, ds in slices}
    if len(sizes) > 1:
        raise InputError(label, f"inconsistent rows/columns within the series: {sorted(sizes)}")

    first_path, first = slices[0]
    iop0 = as_floats(first, "ImageOrientationPatient", 6, first_path)
    spacing0 = as_floats(first, "PixelSpacing", 2, first_path)
    if np.any(spacing0 <= 0):
        raise InputError(first_path, f"PixelSpacing must be positive, got {spacing0.tolist()}")
    for path, ds in slices[1:]:
        iop = as_floats(ds, "ImageOrientationPatient", 6, path)
        if np.max(np.abs(iop - iop0)) > _ORIENT_TOL:
            raise InputError(label, f"mixed orientations within the series: {path.name} has {np.round(iop, 4).tolist()}, "
                                    f"{first_path.name} has {np.round(iop0, 4).tolist()} (localiser mixed in?)")
        ps = as_floats(ds, "PixelSpacing", 2, path)
        if np.max(np.abs(ps - spacing0)) > 1e-3 * max(float(spacing0.max()), 1e-6):
            raise InputError(label, f"inconsistent PixelSpacing within the series: {ps.tolist()} vs {spacing0.tolist()}")

    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise InputError(first_path, f"degenerate ImageOrientationPatient {iop0.tolist()}")
    normal /= np.linalg.norm(normal)

    slices, positions, step_vec = stack_slices(slices, normal, label, left_out)
    n = len(slices)

    stack = np.stack([pixels[p] if p in pixels else _pixels(ds, p) for p, ds in slices])  # (Z, rows, cols)
    array = np.ascontiguousarray(np.transpose(stack, (2, 1, 0))[None])  # (1, X=cols, Y=rows, Z)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing0[1]  # PixelSpacing is (between rows, between columns)
    lps[:3, 1] = col_dir * spacing0[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    with np.errstate(all="ignore"):  # overflow is what is being checked for
        det = np.linalg.det(affine[:3, :3]) if np.all(np.isfinite(affine)) else np.nan
        if not (np.isfinite(det) and abs(det) > 1e-12):
            raise InputError(label, f"voxel geometry is not finite or degenerate (affine {affine.tolist()})")

    ordered = [p for p, _ in slices]
    meta = {
        "source": label,
        "format": "dicom",
        "files": [str(p) for p in ordered],
        "dicom": _template(slices),
        **({"skipped_slices": skipped} if skipped else {}),
    }
    volume = Volume(array=array, affine=affine, modality=_modality(slices[0][1]), meta=meta)
    volume.check_finite()
    # identifiers (UIDs, paths) only at DEBUG: INFO logs end up in places patient data must not (#28)
    log.info("read a DICOM series: %d slices of %dx%d", n, array.shape[1], array.shape[2])
    log.debug("its SeriesInstanceUID: %s", slices[0][1].get("SeriesInstanceUID", "?"))
    return volume

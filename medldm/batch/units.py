"""Units and manifests for `medldm reconstruct`: turn an input folder (or file) into units of work.

A unit is one DICOM image series (grouped by SeriesInstanceUID, wherever its files live), one NIfTI file or
one .h5 file (fastMRI k-space, or a CT sinogram: ``medldm.io.sinogram_h5``). Files that cannot become a unit by themselves but say something about the input (a
non-image DICOM object, an unreadable .dcm) become units that are skipped or failed up front, so the
manifest accounts for them. The manifest helpers (atomic JSON, rank merge, summary table) are in
``medldm.batch.manifest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medldm.errors import InputError
from medldm.io.volume import MODALITIES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TASKS = ("denoise", "recon", "sr")
IMAGE_KINDS = ("dicom", "nifti")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_H5_SUFFIXES = (".h5", ".hdf5")
# BIDS anatomical/functional suffixes: a file named sub-01_T1w.nii.gz is MR without asking the user.
_BIDS_MR = ("t1w", "t2w", "flair", "pdw", "pd", "t2starw", "t2star", "pdt2", "t1map", "t2map", "r1map", "r2map",
            "inplanet1", "inplanet2", "angio", "dwi", "bold", "asl", "m0scan", "mtr", "mese", "megre", "unit1")
_BIDS_CT = ("ct",)
MAX_IGNORED_LISTED = 200  # the manifest lists this many ignored files; ignored_count has them all


@dataclass
class Unit:
    id: str
    kind: str  # dicom | nifti | fastmri | sinogram | dicom-object (non-image, skipped) | file (unreadable, failed)
    inputs: list[Path]
    modality: str | None = None
    modality_source: str | None = None
    series: Any = None  # SeriesInfo for DICOM series found in a folder
    series_uid: str | None = None
    skip: str | None = None  # decided at discovery: the unit is listed but not run
    fail: str | None = None

    @property
    def runnable(self) -> bool:
        return self.skip is None and self.fail is None


def short_hash(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:10]


def _rel(path: Path, root: Path) -> str:
    # Ids hash the path relative to the input root, so moving the whole input folder keeps them stable.
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


# first bytes of formats people keep next to scans, to say what a misnamed file is
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
               (b"PK\x03\x04", "a ZIP archive"), (b"GIF8", "a GIF image"), (b"II*\x00", "a TIFF image"),
               (b"MM\x00*", "a TIFF image"))
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _content_kind(path: Path) -> str:
    """What the first bytes say a file is: 'nifti', 'gzip' (a .nii.gz, checked when read), 'hdf5', or a
    description ("a PNG image", "text", "empty", "unrecognised binary data")."""
    try:
        with open(path, "rb") as f:
            head = f.read(600)
    except OSError:
        return "unreadable"
    if not head:
        return "empty"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if len(head) >= 348 and (head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")):
        return "nifti"
    if head.startswith(_HDF5_SIGNATURE) or head[512:520] == _HDF5_SIGNATURE:  # HDF5 may follow a user block
        return "hdf5"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def _not_ours(path: Path) -> str | None:
    """Why a file named .nii/.nii.gz/.h5 is not one by content (then it is ignored, not failed), else None."""
    kind = _content_kind(path)
    if _is_nifti(path):
        ok = ("gzip",) if path.name.lower().endswith(".gz") else ("nifti",)
    else:
        ok = ("hdf5",)
    if kind in ok or kind == "unreadable":  # an unreadable file fails as a unit and says why
        return None
    return f"named {''.join(path.suffixes[-2:]) if _is_nifti(path) else path.suffix} but its content is {kind}"


def infer_nifti_modality(path: Path, explicit: str | None) -> tuple[str | None, str | None]:
    """(modality, where it came from): --modality, a BIDS JSON sidecar, or a BIDS file-name suffix."""
    if explicit:
        return explicit.upper(), "--modality"
    name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    sidecar = path.with_name(name + ".json")
    if sidecar.is_file():
        try:
            value = str(json.loads(sidecar.read_text(encoding="utf-8")).get("Modality", "")).upper()
        except (OSError, ValueError, AttributeError):
            value = ""
        if value in MODALITIES:
            return value, "sidecar"
    suffix = name.rsplit("_", 1)[-1].lower() if "_" in name else ""
    if suffix in _BIDS_MR:
        return "MR", "file name"
    if suffix in _BIDS_CT:
        return "CT", "file name"
    return None, None


def _raw_modality(path: Path) -> str:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        return str(ds.get("Modality", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - the series read reports unreadable files properly
        return ""


def _series_unit(info, task: str, explicit: str | None) -> Unit:
    number = info.series_number
    prefix = f"dicom-s{number}" if number is not None and 0 <= number < 10**6 else "dicom"
    unit = Unit(f"{prefix}-{task}-{short_hash(task, info.series_uid)}", "dicom", list(info.files), series=info,
                series_uid=info.series_uid)
    if info.modality:
        unit.modality, unit.modality_source = info.modality, "dicom"
        return unit
    raw = _raw_modality(info.files[0])
    if raw:
        unit.skip = f"series {info.series_uid}: modality {raw} is not supported (only {', '.join(MODALITIES)})"
    elif explicit:
        unit.modality, unit.modality_source = explicit.upper(), "--modality"
    else:
        unit.fail = f"series {info.series_uid}: no Modality tag; pass --modality mr|ct"
    return unit


def _file_unit(path: Path, root: Path, task: str, reason: str) -> Unit | None:
    """A file find_dicom_series left out: a unit, or None when it is simply not ours (README, sidecar...)."""
    rel = _rel(path, root)
    if reason.startswith("no pixel data"):
        return Unit(f"dicom-object-{short_hash(rel)}", "dicom-object", [path], skip=f"{path}: {reason}")
    if reason.startswith(("DICOMDIR", "duplicate copy")):
        return None
    if reason == "not a DICOM file":  # neither a preamble nor raw DICOM elements: not DICOM by content
        return None
    return Unit(f"file-{task}-{short_hash(task, rel)}", "file", [path], fail=f"{path}: {reason}")


def _single_dicom(path: Path, task: str, explicit: str | None) -> Unit:
    from medldm.io.dicom_read import SeriesInfo, _try_read

    ds, reason = _try_read(path, defer_size=1024)
    if ds is None:
        return Unit(f"file-{task}-{short_hash(task, path.name)}", "file", [path], fail=f"{path}: {reason}")
    if "PixelData" not in ds:
        return Unit(f"dicom-object-{short_hash(path.name)}", "dicom-object", [path], skip=f"{path}: no pixel data")
    modality = str(ds.get("Modality", "") or "").upper()
    number = ds.get("SeriesNumber")
    try:
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    uid = str(ds.get("SeriesInstanceUID", "") or "") or path.name
    info = SeriesInfo(uid, [path], modality if modality in MODALITIES else None, series_number=number)
    return _series_unit(info, task, explicit)


def _find_series(root: Path):
    from medldm.io.dicom_read import find_dicom_series

    try:
        return find_dicom_series(root)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        # pydicom decodes header values lazily, so one file with a corrupt VR or value can escape the reader's
        # own checks and abort the whole scan; rescanning file by file confines it to a failed unit.
        log.warning("DICOM scan stopped on %s; rescanning file by file", type(exc).__name__)
        return _find_series_per_file(root)


def _find_series_per_file(root: Path):
    """find_dicom_series with every header access guarded; same grouping, sorting and skip reasons."""
    from medldm.io import dicom_read as dr

    groups: dict[str, list] = {}
    seen: dict[str, Path] = {}
    skipped = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds, reason = dr._try_read(path, defer_size=1024)
        if ds is None:
            skipped.append((path, reason))
            continue
        try:
            if dr._file_meta(ds, "MediaStorageSOPClassUID") == dr._DICOMDIR_UID:
                skipped.append((path, "DICOMDIR (directory index)"))
                continue
            if "PixelData" not in ds:
                skipped.append((path, f"no pixel data ({dr._sop_class_name(ds)})"))
                continue
            uid, sop = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
            number = ds.get("SeriesNumber")
            info = dr.SeriesInfo(uid, [path], dr._modality(ds), str(ds.get("SeriesDescription", "") or ""),
                                 int(number) if number not in (None, "") else None,
                                 str(ds.get("SOPClassUID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""))
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).splitlines() or [""])[0][:200]
            skipped.append((path, f"unreadable DICOM header ({type(exc).__name__}: {first})"))
            continue
        if not uid:
            skipped.append((path, "no SeriesInstanceUID"))
        elif sop and sop in seen:
            skipped.append((path, f"duplicate copy of SOPInstanceUID already in {seen[sop]}"))
        else:
            seen[sop] = path
            groups.setdefault(uid, []).append(info)
    series = []
    for members in groups.values():
        first = members[0]
        first.files = [m.files[0] for m in members]
        series.append(first)
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    return dr.SeriesList(series, skipped)


def discover(source: str | Path, task: str, modality: str | None = None,
             simulate_views: bool = False) -> tuple[list[Unit], list[dict]]:
    """Units in a stable order (DICOM series, NIfTI, .h5, then unreadable and non-image files) and the files
    ignored (not DICOM, NIfTI or .h5; DICOMDIRs; duplicate copies of an instance).

    ``simulate_views``: recon of CT images by simulating their sparse-view sinograms (``--views``)."""
    from medldm.io.sinogram_h5 import is_sinogram_h5

    src = Path(source)
    if not src.exists():
        raise InputError(src, "does not exist")
    root = src if src.is_dir() else src.parent
    series, nifti, h5, others, ignored = [], [], [], [], []

    def add_file(path: Path, reason: str):
        if _is_nifti(path) or path.suffix.lower() in _H5_SUFFIXES:
            why = _not_ours(path)
            if why:
                ignored.append({"path": str(path), "reason": why})
                return
        if _is_nifti(path):
            nifti.append(path)
        elif path.suffix.lower() in _H5_SUFFIXES:
            h5.append(path)
        else:
            unit = _file_unit(path, root, task, reason)
            if unit is None:
                if reason == "not a DICOM file" and path.suffix.lower() in _DICOM_SUFFIXES:
                    reason = f"named {path.suffix} but its content is not DICOM ({_content_kind(path)})"
                ignored.append({"path": str(path), "reason": reason})
            else:
                others.append(unit)

    if src.is_dir():
        found = _find_series(src)
        series = [_series_unit(info, task, modality) for info in found]
        for path, reason in found.skipped:
            add_file(path, reason)
    elif _is_nifti(src) or src.suffix.lower() in _H5_SUFFIXES:
        add_file(src, "")
    else:
        series = [_single_dicom(src, task, modality)]

    units = list(series)
    for path in sorted(nifti):
        mod, where = infer_nifti_modality(path, modality)
        units.append(Unit(f"nifti-{task}-{short_hash(task, _rel(path, root))}", "nifti", [path], mod, where))
    for path in sorted(h5):
        kind, mod = ("sinogram", "CT") if is_sinogram_h5(path) else ("fastmri", "MR")
        units.append(Unit(f"h5-{task}-{short_hash(task, _rel(path, root))}", kind, [path], mod, kind))
    units += sorted(others, key=lambda u: (u.kind, str(u.inputs[0])))

    for unit in units:
        if not unit.runnable:
            continue
        if task == "recon" and unit.kind in IMAGE_KINDS and not simulate_views:
            unit.skip = ("image input: --task recon reconstructs fastMRI k-space and CT sinograms (.h5); "
                         "add --views N to simulate a CT image's sparse-view sinogram")
        elif task == "recon" and unit.kind in IMAGE_KINDS and unit.modality not in (None, "CT"):
            unit.skip = f"--views simulates CT projections; this image is {unit.modality}"
        elif task != "recon" and unit.kind in ("fastmri", "sinogram"):
            unit.skip = f"{'fastMRI k-space' if unit.kind == 'fastmri' else 'CT sinogram'}: reconstructed with --task recon only"
    seen: set[str] = set()
    for unit in units:  # two inputs hashing alike would share an output folder
        if unit.id in seen:
            unit.id = f"{unit.id}-{short_hash(*map(str, unit.inputs))[:6]}"
        seen.add(unit.id)
    return units, ignored


# ----------------------------------------------------------------------------------------- manifests

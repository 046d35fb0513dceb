"""NIfTI read/write through nibabel.

nibabel's ``img.affine`` is already the best affine (sform, else qform, else pixdim) in RAS+, which is exactly
Volume's convention, so no axis juggling happens here: only the channel axis moves (NIfTI keeps it last).
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medldm.errors import InputError
from medldm.io.volume import Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, modality: str | None = None) -> Volume:
    """Read a NIfTI file: 3D data become ``(1, X, Y, Z)``, 4D data ``(T, X, Y, Z)`` (last axis -> channels)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "not a file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise InputError(path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    return _to_volume(img, str(path), modality)


def nifti_from_bytes(data: bytes, source: str, modality: str | None = None) -> Volume:
    """``read_nifti`` of an uncompressed single-file NIfTI-1 or NIfTI-2 held in memory (nibabel's from_bytes)."""
    kind = nib.Nifti2Image if len(data) >= 4 and int.from_bytes(data[:4], "little") in (540, 0x1C020000) \
        else nib.Nifti1Image
    try:
        img = kind.from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        raise InputError(source, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    return _to_volume(img, source, modality)


def _to_volume(img, source: str, modality: str | None) -> Volume:
    try:
        # get_fdata applies scl_slope/scl_inter; float32 halves memory and is what the models consume.
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged data
        raise InputError(source, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]  # vector images store components on the 5th axis with a singleton time
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        array = data[None]
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    else:
        raise InputError(source, f"unsupported NIfTI shape {data.shape}: expected 3D or 4D")
    meta = {"source": source, "format": "nifti", "nifti_header": _header_summary(img)}
    volume = Volume(array=np.ascontiguousarray(array, dtype=np.float32), affine=np.asarray(img.affine),
                    modality=modality, meta=meta)
    volume.check_finite()
    return volume


def _header_summary(img) -> dict:
    hdr = img.header
    qcode, scode = (int(c) for c in (hdr["qform_code"], hdr["sform_code"]))
    descrip = hdr["descrip"].item()
    return {
        "qform_code": qcode,
        "sform_code": scode,
        "descrip": descrip.decode("latin-1", "replace").strip("\x00 ") if isinstance(descrip, bytes) else str(descrip),
    }


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a float32 NIfTI with the volume affine as both qform and sform (code 1, scanner).

    One channel gives a 3D file, several a 4D file with channels last. The file is written under a temporary
    name and renamed, so readers never see a partial file.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(path, "NIfTI output must end in .nii or .nii.gz")
    img = _nifti_image(volume)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix at the end: nibabel chooses gzip from the file name.
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.debug("wrote NIfTI %s shape %s", path, img.shape)
    return path


def nifti_bytes(volume: Volume) -> bytes:
    """The ``.nii.gz`` bytes ``write_nifti`` would write, made in memory (gzip level 1, as nibabel's default)."""
    return gzip.compress(_nifti_image(volume).to_bytes(), compresslevel=1)


def _nifti_image(volume: Volume) -> nib.Nifti1Image:
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim == 3:
        array = array[..., None]  # 2D (C, X, Y) -> one slice
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    img = nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(np.float32)
    return img

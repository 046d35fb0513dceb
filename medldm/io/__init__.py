"""Volume I/O: NIfTI, DICOM series (read and derived-series write) and fastMRI HDF5.

All readers return a :class:`Volume` (channel-first array, RAS+ affine) and raise InputError for bad input.
"""

from __future__ import annotations

import os
from pathlib import Path

from importlib import import_module

from medldm.errors import InputError
from medldm.io.volume import Volume

# Exports resolve on first use: importing medldm.io.volume (which runs this file) must not pull in pydicom,
# nibabel and h5py (~0.4 s) for commands that never touch files.
_LAZY = {
    "SeriesInfo": "dicom_read", "SeriesList": "dicom_read", "find_dicom_series": "dicom_read",
    "read_dicom_series": "dicom_read", "write_dicom_series": "dicom_write",
    "read_fastmri_h5": "fastmri_h5", "fastmri_h5_to_volume": "fastmri_h5", "write_fastmri_recon_h5": "fastmri_h5",
    "read_nifti": "nifti", "write_nifti": "nifti", "Deidentifier": "deidentify",
}

__all__ = ["Volume", "read_volume", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"medldm.io.{_LAZY[name]}"), name)
    raise AttributeError(name)


_H5_SUFFIXES = (".h5", ".hdf5")


def _has_dicm_prefix(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_volume(path: str | os.PathLike, *, modality: str | None = None) -> Volume:
    """Read any supported input by its form: a folder (one DICOM series), ``.nii``/``.nii.gz``,
    ``.h5``/``.hdf5`` (fastMRI k-space -> zero-filled magnitude), or a single DICOM file.

    ``modality`` fills in where the file does not say (NIfTI; DICOM without an MR/CT Modality tag).
    """
    from medldm.io.dicom_read import read_dicom_series
    from medldm.io.fastmri_h5 import fastmri_h5_to_volume
    from medldm.io.nifti import is_nifti_path, read_nifti

    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        volume = read_dicom_series(path)
    elif is_nifti_path(path):
        return read_nifti(path, modality=modality)
    elif path.suffix.lower() in _H5_SUFFIXES:
        return fastmri_h5_to_volume(path)
    elif path.suffix.lower() == ".dcm" or _has_dicm_prefix(path):
        volume = read_dicom_series(path)
    else:
        raise InputError(path, "unknown format: expected a DICOM folder or file, .nii/.nii.gz or fastMRI .h5")
    if volume.modality is None and modality is not None:
        volume = Volume(array=volume.array, affine=volume.affine, modality=modality, meta=volume.meta)
    return volume

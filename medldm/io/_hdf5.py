"""What the HDF5 readers (fastMRI k-space, CT sinograms) share: the up-front file checks and attribute values."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from medldm.errors import InputError


def checked_hdf5_path(path: str | os.PathLike) -> Path:
    """The path, once it is an existing HDF5 file; else an InputError saying which it is not."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "not a file")
    if not h5py.is_hdf5(path):
        raise InputError(path, "not an HDF5 file")
    return path


def python_value(value):
    """An HDF5 attribute as a plain Python value (JSON-friendly)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value

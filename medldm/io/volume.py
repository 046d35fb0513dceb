"""The one volume type that flows through medldm.

Convention: ``array`` is channel-first, ``(C, X, Y, Z)`` for 3D or ``(C, X, Y)`` for 2D, where X, Y, Z are
the voxel index axes i, j, k. ``affine`` maps voxel indices (i, j, k, 1) to world millimetres in RAS+
(as NIfTI, nibabel and MONAI). DICOM's LPS patient coordinates are converted on read and back on write.

Orientation rule: the networks see images on the closest-canonical RAS+ grid, as training does (MONAI
``Orientationd(axcodes="RAS")``). Image inputs are reoriented with ``to_ras`` when their measurement is built
and the results go back to the input's orientation; k-space and sinogram measurements keep their acquisition
grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from medldm.errors import InputError

MODALITIES = ("MR", "CT")


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim not in (3, 4):
            raise InputError(self.meta.get("source"), f"volume array must be (C, X, Y[, Z]), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise InputError(self.meta.get("source"), f"affine must be 4x4, got {self.affine.shape}")
        if not np.all(np.isfinite(self.affine)):
            raise InputError(self.meta.get("source"), "the affine (voxel-to-world geometry) holds NaN/Inf values")
        if self.modality is not None:
            self.modality = self.modality.upper()
            if self.modality not in MODALITIES:
                raise InputError(self.meta.get("source"), f"modality must be one of {MODALITIES}, got {self.modality!r}")

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each index axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0)[: self.spatial_dims])

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None, **meta) -> "Volume":
        """Same geometry and metadata, new data (and optionally a new affine)."""
        return replace(self, array=array, affine=self.affine if affine is None else affine, meta={**self.meta, **meta})

    def check_finite(self) -> "Volume":
        if not np.all(np.isfinite(self.array)):
            bad = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(self.meta.get("source"), f"volume contains {bad} NaN/Inf voxels")
        return self


RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)  # nibabel's orientation of a RAS+ grid


def reorient(array: np.ndarray, affine: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (..., X, Y, Z) with ``affine`` -> the same voxels on the grid whose axes follow ``target`` (a
    nibabel orientation, e.g. ``RAS``) and that grid's affine: axes permuted and flipped, nothing resampled."""
    affine = np.asarray(affine, dtype=np.float64)
    transform = ornt_transform(io_orientation(affine), target)
    spatial = np.moveaxis(np.asarray(array), (-3, -2, -1), (0, 1, 2))
    moved = np.moveaxis(apply_orientation(spatial, transform), (0, 1, 2), (-3, -2, -1))
    return np.ascontiguousarray(moved), affine @ inv_ornt_aff(transform, spatial.shape[:3])


def to_ras(volume: Volume) -> tuple[Volume, np.ndarray | None]:
    """A 3D volume on its closest-canonical RAS+ grid, and the orientation it had (None when it was RAS+
    already, or 2D: then the volume is returned as it is)."""
    if volume.spatial_dims != 3:
        return volume, None
    orientation = io_orientation(volume.affine)
    if np.isnan(orientation).any():
        raise InputError(volume.meta.get("source"), "the affine has a zero axis; its orientation is undefined")
    if np.array_equal(orientation, RAS):
        return volume, None
    array, affine = reorient(volume.array, volume.affine, RAS)
    return volume.with_array(array, affine), orientation

"""The one volume type that flows through medldm.

Convention: ``array`` is channel-first, ``(C, X, Y, Z)`` for 3D or ``(C, X, Y)`` for 2D, where X, Y, Z are
the voxel index axes i, j, k. ``affine`` maps voxel indices (i, j, k, 1) to world millimetres in RAS+
(as NIfTI, nibabel and MONAI). DICOM's LPS patient coordinates are converted on read and back on write.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

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

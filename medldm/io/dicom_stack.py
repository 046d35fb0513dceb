"""Order a DICOM series' slices along their normal and check the stack: no duplicate position, no gap, uniform
spacing. Positions, never InstanceNumber or file names, decide the order (both are often wrong after export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from medldm.errors import InputError
from medldm.io.dicom_values import as_float, as_floats

_DUP_TOL_MM = 1e-3
_GAP_FACTOR = 1.5
_UNIFORM_TOL = 0.01  # fraction of the median step


def stack_slices(slices: list[tuple[Path, pydicom.Dataset]], normal: np.ndarray, label: str, left_out: str = ""
                 ) -> tuple[list[tuple[Path, pydicom.Dataset]], np.ndarray, np.ndarray]:
    """(slices in order along ``normal``, their ImagePositionPatient (n, 3), the step between slices (3,)).
    ``left_out`` ends a gap or spacing refusal (why a gap may be there: slices skipped as unreadable)."""
    first_path, first = slices[0]
    positions = np.stack([as_floats(ds, "ImagePositionPatient", 3, p) for p, ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]

    n = len(slices)
    if n > 1:
        steps = np.diff(along)
        dup = np.flatnonzero(steps < _DUP_TOL_MM)
        if dup.size:
            a, b = slices[dup[0]][0].name, slices[dup[0] + 1][0].name
            raise InputError(label, f"duplicate slice position {along[dup[0]]:.3f} mm ({a} and {b}); multiple echoes, "
                                    f"phases or time points in one series are not supported")
        med = float(np.median(steps))
        gaps = np.flatnonzero(steps > _GAP_FACTOR * med)
        if gaps.size:
            g = gaps[0]
            raise InputError(label, f"missing slice: gap of {steps[g]:.3f} mm between {slices[g][0].name} and "
                                    f"{slices[g + 1][0].name} (median step {med:.3f} mm){left_out}")
        if np.max(np.abs(steps - med)) > _UNIFORM_TOL * med:
            raise InputError(label, f"non-uniform slice spacing: steps from {steps.min():.4f} to {steps.max():.4f} mm "
                                    f"(median {med:.4f} mm, tolerance 1%){left_out}")
        # Mean step vector, not normal*step: keeps gantry-tilted (sheared) stacks in their true place.
        step_vec = (positions[-1] - positions[0]) / (n - 1)
    else:
        thick = as_float(first, "SpacingBetweenSlices", first_path) or as_float(first, "SliceThickness", first_path)
        step_vec = normal * (thick or 1.0)

    return slices, positions, step_vec

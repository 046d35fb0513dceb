"""Validation cases: held-out real volumes degraded with fixed, documented settings and seeds.

Every case is (name, ground truth Volume, Measurement). The settings per task mirror the targets in
the README: 4x and 8x random Cartesian masks, 4x (and 2x) thick slices, Rician sigma 5%, CT at
I0 = 1e4 photons (dose), 60 and 90 of 180 views at I0 = 1e5 (sparse view) and 3x thick CT slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medldm.io.volume import Volume
from medldm.sampling.measurement import Measurement, simulate

SETTINGS: dict[tuple[str, str], dict[str, dict]] = {
    ("recon", "MR"): {"4x": {"accelerations": [4], "center_fractions": [0.08]},
                      "8x": {"accelerations": [8], "center_fractions": [0.04]}},
    ("sr", "MR"): {"4x": {"factors": [4]}, "2x": {"factors": [2]}},
    ("recon", "CT"): {"60views": {"views": [60], "I0_range": [1e5, 1e5], "pixel_mm": 0.957},
                      "90views": {"views": [90], "I0_range": [1e5, 1e5], "pixel_mm": 0.957}},
    ("sr", "CT"): {"3x": {"factors": [3]}},
    ("denoise", "MR"): {"sigma5%": {"sigma_range": [0.05, 0.05], "reference": "p99.5"}},
    ("denoise", "CT"): {"I0=1e4": {"I0_range": [1e4, 1e4], "pixel_mm": 0.957}},
}


@dataclass
class Case:
    name: str
    truth: Volume
    measurement: Measurement


def crop_centre(volume: Volume, size: tuple[int, int, int] | None) -> Volume:
    """Centre crop (X, Y, Z) with the affine moved to the new first voxel: keeps evaluation cheap."""
    if size is None:
        return volume
    shape = volume.spatial_shape
    start = [max(0, (s - c) // 2) for s, c in zip(shape, size)]
    sl = tuple(slice(a, a + min(c, s)) for a, c, s in zip(start, size, shape))
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.array([*start, 1.0]))[:3]
    return volume.with_array(volume.array[(slice(None),) + sl], affine)


def make_cases(task: str, modality: str, volumes: dict[str, Volume], seed: int = 0) -> list[Case]:
    cases = []
    for vol_name, vol in volumes.items():
        for setting, kwargs in SETTINGS[(task, modality)].items():
            m = simulate(vol, task, seed, **kwargs)
            m.meta["setting"] = setting
            cases.append(Case(f"{vol_name}/{setting}", vol, m))
    return cases

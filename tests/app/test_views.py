"""The app's drawing: planes, window/level, orientation, display spacing."""

from __future__ import annotations

import numpy as np

from medldm.app import views


def test_three_planes_are_one_rgb_image_resampled_to_display_millimetres():
    vol = np.zeros((10, 12, 4), np.float32)
    img = views.three_planes(vol, (5, 6, 2), (1.0, 1.0, 3.0), 0.0, 1.0)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    # axial 12 x 10, coronal 12 (z: 4 slices of 3 mm) x 10, sagittal 12 x 12; two gaps
    assert img.shape[:2] == (12, 10 + 10 + 12 + 2 * views.GAP)


def test_window_maps_level_minus_half_width_to_black_and_plus_half_to_white():
    vol = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 50.0, 100.0)], axis=-1)
    dark = views.three_planes(vol, (0, 0, 0), (1, 1, 1), 40.0, 60.0)  # axial plane at z = 0: value 0
    bright = views.three_planes(vol, (0, 0, 2), (1, 1, 1), 40.0, 60.0)  # z = 2: value 100
    assert dark[:4, :4].max() == 0 and bright[:4, :4].min() == 255


def test_axial_plane_is_drawn_anterior_up():
    vol = np.zeros((4, 6, 3), np.float32)
    vol[:, -1, :] = 1.0  # the most anterior row (largest y on a RAS+ grid)
    img = views.three_planes(vol, (0, 0, 1), (1, 1, 1), 0.0, 1.0)
    assert img[0, :4].min() == 255 and img[5, :4].max() == 0


def test_display_arrays_move_every_map_to_ras_and_report_spacing():
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])  # x and y flipped against RAS+, 2 mm slices
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out, spacing = views.display_arrays({"output": a, "uncertainty (std)": None, "input": a[None]}, lps)
    assert set(out) == {"output", "input"} and spacing == (1.0, 1.0, 2.0)
    np.testing.assert_array_equal(out["output"], a[::-1, ::-1, :])
    np.testing.assert_array_equal(out["input"], out["output"])


def test_heat_maps_start_at_zero_and_grey_maps_share_the_window():
    vol = np.full((4, 4, 2), 25.0, np.float32)
    imgs = views.panels({"output": vol, "|error|": vol}, (1, 1, 1), (0, 0, 0), level=50.0, width=100.0)
    assert imgs["output"][:4, :4, 0].max() == 63  # 25 of 0..100 in grey
    assert not np.array_equal(imgs["|error|"][:4, :4, 0], imgs["|error|"][:4, :4, 1])  # a colour map (magma)

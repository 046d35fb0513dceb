"""The sinogram HDF5 layout: round trip, and clear errors for files that do not follow it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medldm.errors import InputError
from medldm.io.sinogram_h5 import is_sinogram_h5, read_sinogram_h5, sinogram_geometry, write_sinogram_h5


def test_round_trip_keeps_data_angles_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    sino = rng.random((3, 10, 23)).astype(np.float32)
    path = write_sinogram_h5(tmp_path / "s.h5", sino, np.arange(10) * 18.0, pixel_spacing=(0.8, 0.8),
                             slice_spacing=2.5, image_size=(16, 16), I0=5e4)
    assert is_sinogram_h5(path)
    back, angles, attrs = read_sinogram_h5(path)
    np.testing.assert_array_equal(back, sino)
    np.testing.assert_array_equal(angles, np.arange(10) * 18.0)
    geo = sinogram_geometry(attrs, path)
    assert geo == {"pixel_mm": 0.8, "slice_mm": 2.5, "image_size": (16, 16), "I0": 5e4}


def test_defaults_when_attributes_are_absent(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = np.zeros((1, 4, 6), np.float32)
        f["angles"] = np.arange(4) * 45.0
    sino, _, attrs = read_sinogram_h5(tmp_path / "s.h5")
    assert sinogram_geometry(attrs) == {"pixel_mm": 1.0, "slice_mm": 1.0, "image_size": None, "I0": None}


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


@pytest.mark.parametrize("datasets, message", [
    ({"sinogram": np.zeros((1, 4, 6))}, "needs the datasets"),
    ({"sinogram": np.zeros((4, 6)), "angles": np.arange(4.0)}, r"\[slices, views, detectors\]"),
    ({"sinogram": np.zeros((1, 4, 6)), "angles": np.arange(5.0)}, "5 entries but the sinogram has 4 views"),
    ({"sinogram": np.full((1, 4, 6), np.nan), "angles": np.arange(4.0)}, "NaN/Inf"),
    ({"sinogram": np.zeros((1, 4, 6), np.complex64), "angles": np.arange(4.0)}, "real"),
    ({"sinogram": np.zeros((0, 4, 6)), "angles": np.arange(4.0)}, "is empty"),  # found by fuzz_formats.py
    ({"sinogram": np.full((1, 4, 6), 1e38), "angles": np.arange(4.0)}, "post-log line integrals"),
])
def test_bad_files_raise_input_errors(tmp_path, datasets, message):
    with pytest.raises(InputError, match=message):
        read_sinogram_h5(_write(tmp_path / "bad.h5", **datasets))


def test_non_square_pixels_and_bad_spacing_are_refused(tmp_path):
    sino = np.zeros((1, 4, 6), np.float32)
    with pytest.raises(InputError, match="square pixels"):
        sinogram_geometry({"pixel_spacing": [1.0, 2.0]})
    with pytest.raises(InputError, match="slice_spacing"):
        sinogram_geometry({"slice_spacing": -1.0})
    with pytest.raises(InputError, match="outside 0.001-1000 mm"):  # a denormal spacing overflowed the FBP
        sinogram_geometry({"pixel_spacing": [3e-319, 3e-319]})
    with pytest.raises(InputError, match="each side must be 2-8192"):  # would allocate terabytes
        sinogram_geometry({"image_size": [10**6, 10**6]})


def test_other_files_are_not_sinograms(tmp_path):
    _write(tmp_path / "k.h5", kspace=np.zeros((1, 4, 4), np.complex64))
    (tmp_path / "t.h5").write_text("not hdf5")
    assert not is_sinogram_h5(tmp_path / "k.h5") and not is_sinogram_h5(tmp_path / "t.h5")
    with pytest.raises(InputError, match="not an HDF5"):
        read_sinogram_h5(tmp_path / "t.h5")

"""fastMRI HDF5 (single- and multi-coil): k-space reading, zero-filled volume, reconstruction writing, bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medldm.errors import InputError
from medldm.io import fastmri_h5_to_volume, read_fastmri_h5, read_volume, write_fastmri_recon_h5

HEADER = """<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>
<matrixSize><x>16</x><y>12</y><z>1</z></matrixSize><fieldOfView_mm><x>8.0</x><y>9.0</y><z>3.0</z></fieldOfView_mm>
</encodedSpace></encoding></ismrmrdHeader>"""


def _fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _image(shape=(3, 16, 12)):
    return np.random.default_rng(0).uniform(0.1, 1.0, size=shape).astype(np.float32)


def _write(path, kspace, mask=None, header=HEADER, **attrs):
    with h5py.File(path, "w") as f:
        if kspace is not None:
            f.create_dataset("kspace", data=kspace)
        if mask is not None:
            f.create_dataset("mask", data=mask)
        if header is not None:
            f.create_dataset("ismrmrd_header", data=header.encode())
        f.attrs.update({"acquisition": "CORPD_FBK", "max": 1.5, **attrs})
    return path


def test_read_and_zero_filled_volume(tmp_path):
    image = _image()
    kspace = _fft2c(image).astype(np.complex64)
    mask = np.zeros(12, bool)
    mask[4:8] = True
    path = _write(tmp_path / "f.h5", kspace, mask)
    k, m, attrs = read_fastmri_h5(path)
    assert k.dtype == np.complex64 and k.shape == (3, 16, 12)
    np.testing.assert_array_equal(k, kspace)
    np.testing.assert_array_equal(m, mask)
    assert attrs["acquisition"] == "CORPD_FBK" and attrs["max"] == 1.5 and "encodedSpace" in attrs["ismrmrd_header"]

    vol = fastmri_h5_to_volume(path)
    assert vol.array.shape == (1, 16, 12, 3) and vol.array.dtype == np.float32 and vol.modality == "MR"
    np.testing.assert_allclose(vol.array[0], np.transpose(image, (1, 2, 0)), atol=1e-5)  # full k-space: exact
    assert vol.spacing == pytest.approx((0.5, 0.75, 3.0))  # from the ISMRMRD encoded space
    assert read_volume(path).array.shape == (1, 16, 12, 3)


def test_array_source_defaults_to_1mm(tmp_path):
    image = _image((2, 8, 8))
    vol = fastmri_h5_to_volume(_fft2c(image))
    np.testing.assert_allclose(vol.affine, np.eye(4))
    np.testing.assert_allclose(vol.array[0, :, :, 1], image[1], atol=1e-5)
    assert fastmri_h5_to_volume(_fft2c(image), {"spacing": [0.5, 0.5, 2.0]}).spacing == (0.5, 0.5, 2.0)


def test_file_without_mask_or_header(tmp_path):
    k, m, attrs = read_fastmri_h5(_write(tmp_path / "f.h5", _fft2c(_image()).astype(np.complex64), header=None))
    assert m is None and "ismrmrd_header" not in attrs
    assert fastmri_h5_to_volume(tmp_path / "f.h5").spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "kspace, mask, message",
    [
        (None, None, "no 'kspace' dataset"),
        (np.zeros((3, 16, 12), np.float32), None, "must be complex"),
        (np.zeros((2, 2, 3, 16, 12), np.complex64), None, r"\[slices, coils, H, W\] \(multi-coil\)"),
        (np.zeros((2, 0, 16, 12), np.complex64), None, "is empty"),  # no coils
        (np.zeros((3, 16, 12), np.complex64), np.ones(10, bool), "mask length 10 does not match"),
        (np.zeros((0, 16, 12), np.complex64), None, "is empty"),  # reached MKL's FFT (found by fuzz_formats.py)
    ],
)
def test_bad_files(tmp_path, kspace, mask, message):
    path = _write(tmp_path / "bad.h5", kspace, mask)
    with pytest.raises(InputError, match=message):
        read_fastmri_h5(path)


def test_an_xml_bomb_header_is_refused_by_name(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE h [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            "<ismrmrdHeader>&b;</ismrmrdHeader>")
    path = _write(tmp_path / "bomb.h5", _fft2c(_image()).astype(np.complex64), header=bomb)
    with pytest.raises(InputError, match=r"bomb\.h5: ismrmrd_header refused: unsafe XML"):
        fastmri_h5_to_volume(path)


def test_not_hdf5(tmp_path):
    (tmp_path / "x.h5").write_text("plain text")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_fastmri_h5(tmp_path / "x.h5")


def test_write_reconstruction(tmp_path):
    recon = _image((3, 8, 8)).astype(np.float64)
    path = write_fastmri_recon_h5(tmp_path / "out" / "file1000.h5", recon)
    with h5py.File(path, "r") as f:
        assert f["reconstruction"].dtype == np.float32
        np.testing.assert_allclose(f["reconstruction"][()], recon, rtol=1e-6)
    with pytest.raises(InputError, match=r"\[slices, H, W\]"):
        write_fastmri_recon_h5(tmp_path / "bad.h5", recon[0])


def test_multicoil_file_reads_and_its_volume_is_the_rss(tmp_path):
    coils = np.random.default_rng(1).uniform(0.2, 1.0, size=(4, 1, 16, 12))
    image = _image() * coils  # [coils, slices, H, W] -> the file's [slices, coils, H, W]
    path = _write(tmp_path / "mc.h5", _fft2c(np.moveaxis(image, 0, 1)).astype(np.complex64))
    k, mask, attrs = read_fastmri_h5(path)
    assert k.shape == (3, 4, 16, 12) and mask is None
    vol = fastmri_h5_to_volume(path)
    rss = np.sqrt((image ** 2).sum(0))  # fastMRI's reconstruction_rss of fully sampled data
    np.testing.assert_allclose(vol.array[0], np.transpose(rss, (1, 2, 0)), atol=1e-5)

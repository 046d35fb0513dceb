"""NIfTI read/write: channel layout, best affine, qform/sform codes, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medldm.errors import InputError
from medldm.io import Volume, read_nifti, read_volume, write_nifti

AFFINE = np.array([[-0.9, 0.1, 0, 10], [0.1, 0.9, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])


def _data(shape=(16, 16, 8), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_roundtrip_3d(tmp_path):
    vol = Volume(_data()[None], AFFINE, "MR", {})
    path = write_nifti(vol, tmp_path / "sub" / "v.nii.gz")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    img = nib.load(str(path))
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == np.float32
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), AFFINE, atol=1e-5)  # qform is rigid+zoom: AFFINE is near it
    back = read_nifti(path, modality="mr")
    assert back.array.shape == (1, 16, 16, 8) and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    assert back.modality == "MR" and back.meta["source"] == str(path)


def test_4d_last_axis_becomes_channels(tmp_path):
    data = _data((8, 6, 4, 3))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t.nii"))
    vol = read_nifti(tmp_path / "t.nii")
    assert vol.array.shape == (3, 8, 6, 4) and vol.modality is None
    np.testing.assert_array_equal(vol.array[2], data[..., 2])
    write_nifti(vol, tmp_path / "o.nii")
    assert nib.load(str(tmp_path / "o.nii")).shape == (8, 6, 4, 3)


def test_best_affine_falls_back_to_qform(tmp_path):
    img = nib.Nifti1Image(_data((4, 4, 4)), None)
    q = np.diag([2.0, 3.0, 4.0, 1.0])
    q[:3, 3] = [1, 2, 3]
    img.set_qform(q, code=1)
    img.set_sform(np.eye(4), code=0)
    nib.save(img, str(tmp_path / "q.nii"))
    np.testing.assert_allclose(read_nifti(tmp_path / "q.nii").affine, q)


def test_integer_file_becomes_float32(tmp_path):
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4)), str(tmp_path / "i.nii"))
    vol = read_nifti(tmp_path / "i.nii")
    assert vol.array.dtype == np.float32 and vol.array[0, 3, 3, 3] == 63


def test_nan_rejected(tmp_path):
    data = _data((4, 4, 4))
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "n.nii"))
    with pytest.raises(InputError, match="NaN/Inf"):
        read_nifti(tmp_path / "n.nii")


def test_bad_inputs(tmp_path):
    (tmp_path / "bad.nii").write_bytes(b"garbage" * 10)
    with pytest.raises(InputError, match="cannot read as NIfTI"):
        read_nifti(tmp_path / "bad.nii")
    with pytest.raises(InputError, match="does not exist"):
        read_nifti(tmp_path / "missing.nii")
    with pytest.raises(InputError, match="modality"):
        nib.save(nib.Nifti1Image(_data((4, 4, 4)), np.eye(4)), str(tmp_path / "ok.nii"))
        read_nifti(tmp_path / "ok.nii", modality="PET")
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        write_nifti(Volume(_data((4, 4, 4))[None]), tmp_path / "v.img")


def test_read_volume_dispatch(tmp_path):
    write_nifti(Volume(_data((4, 4, 4))[None]), tmp_path / "v.nii.gz")
    assert read_volume(tmp_path / "v.nii.gz", modality="CT").modality == "CT"
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown format"):
        read_volume(tmp_path / "x.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nope.nii")


def test_bytes_in_memory_match_the_files(tmp_path):
    """Serving and the client convert NIfTI in memory: the same volume and geometry as writing and reading a file,
    for NIfTI-1 and NIfTI-2 headers."""
    import gzip

    from medldm.io.nifti import nifti_bytes, nifti_from_bytes

    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-30.0, 4.0, 12.5]
    vol = Volume(np.random.default_rng(0).normal(size=(1, 6, 5, 4)).astype(np.float32), affine, "MR")
    from_file = read_nifti(write_nifti(vol, tmp_path / "v.nii.gz"))
    from_bytes = nifti_from_bytes(gzip.decompress(nifti_bytes(vol)), "request", modality="MR")
    np.testing.assert_array_equal(from_bytes.array, from_file.array)
    np.testing.assert_allclose(from_bytes.affine, from_file.affine)
    assert from_bytes.meta["source"] == "request"
    two = nib.Nifti2Image(vol.array[0], affine)
    np.testing.assert_array_equal(nifti_from_bytes(two.to_bytes(), "v2").array, vol.array)
    with pytest.raises(InputError):
        nifti_from_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 400, "broken")

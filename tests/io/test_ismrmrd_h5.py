import shutil
import subprocess

import numpy as np
import pytest

from medldm.errors import InputError
from medldm.io.fastmri_h5 import read_kspace_h5, recon_matrix
from medldm.io.ismrmrd_h5 import is_ismrmrd_h5, read_ismrmrd_h5


def write_ismrmrd(path, kspace: np.ndarray, mask: np.ndarray, recon=None, noise_scan=True, encoded_z=1):
    """An ISMRMRD file written by the ``ismrmrd`` package: kspace [slices, coils, H (readout), W], the lines of
    ``mask`` as acquisitions (plus a noise scan, which the reader must skip), centre line W // 2."""
    import ismrmrd
    import ismrmrd.xsd as x

    s, c, h, w = kspace.shape
    recon = recon or (h, w)

    def space(mx, my):
        return x.encodingSpaceType(matrixSize=x.matrixSizeType(x=mx, y=my, z=encoded_z),
                                   fieldOfView_mm=x.fieldOfViewMm(x=float(mx), y=float(my), z=5.0))

    limits = x.encodingLimitsType(kspace_encoding_step_1=x.limitType(minimum=0, maximum=w - 1, center=w // 2),
                                  slice=x.limitType(minimum=0, maximum=s - 1, center=0))
    enc = x.encodingType(encodedSpace=space(h, w), reconSpace=space(*recon), encodingLimits=limits,
                         trajectory=x.trajectoryType("cartesian"))
    header = x.ismrmrdHeader(experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=63500000),
                             encoding=[enc])
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(x.ToXML(header))
    if noise_scan:
        noise = ismrmrd.Acquisition.from_array(np.full((c, h), 1e3, np.complex64))
        noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        dset.append_acquisition(noise)
    for z in range(s):
        for line in np.flatnonzero(mask):
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[z, :, :, line]))
            acq.idx.kspace_encode_step_1 = int(line)
            acq.idx.slice = z
            dset.append_acquisition(acq)
    dset.close()
    return path


def _data(seed=0, shape=(2, 3, 16, 12)):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    mask = np.zeros(shape[-1], bool)
    mask[::3] = True
    mask[4:8] = True
    return k * mask, mask


def test_round_trip(tmp_path):
    k, mask = _data()
    path = write_ismrmrd(tmp_path / "raw.h5", k, mask, recon=(8, 12))
    assert is_ismrmrd_h5(path)
    got, got_mask, attrs = read_ismrmrd_h5(path)
    assert got.shape == k.shape and np.array_equal(got_mask, mask)
    np.testing.assert_allclose(got, k)  # the noise scan is not in the image
    assert recon_matrix(attrs) == (8, 12)
    again, _, _ = read_kspace_h5(path)  # the one entry point tells the formats apart
    np.testing.assert_array_equal(again, got)


def test_bad_files(tmp_path):
    k, mask = _data()
    with pytest.raises(InputError, match="not an ISMRMRD"):
        import h5py

        with h5py.File(tmp_path / "other.h5", "w") as f:
            f["x"] = np.zeros(3)
        read_ismrmrd_h5(tmp_path / "other.h5")
    with pytest.raises(InputError, match="3D encoding"):
        read_ismrmrd_h5(write_ismrmrd(tmp_path / "3d.h5", k, mask, encoded_z=4))
    with pytest.raises(InputError, match="no imaging acquisitions"):
        read_ismrmrd_h5(write_ismrmrd(tmp_path / "empty.h5", k, np.zeros_like(mask)))


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian's ismrmrd-tools is not installed (bash .ci/setup installs it as root)")
def test_reads_the_reference_phantom_generator(tmp_path):
    out = tmp_path / "phantom.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(out), "-c", "4", "-m", "32"], check=True,
                   capture_output=True)
    k, mask, attrs = read_ismrmrd_h5(out)
    assert k.shape == (1, 4, 64, 32) and mask.all()  # readout oversampled twice
    assert recon_matrix(attrs) == (32, 32)

"""ISMRMRD raw data (HDF5, the vendor-neutral MR raw format) -> fastMRI-layout k-space.

Reads Cartesian 2D acquisitions of one slice set with the ``ismrmrd`` package: the first encoding space,
repetition, contrast, phase and set (the others are skipped with a warning); averages are averaged;
noise, navigator, phase-correction and dummy scans are left out. Lines are placed by
``kspace_encode_step_1`` so that the encoding limits' centre lands on W // 2, where medldm's centred FFT puts DC.
Returned like ``read_fastmri_h5`` with coils: ``kspace`` complex64 [slices, coils, H (readout), W (phase
encode)], ``mask`` bool [W] (the lines measured), ``attrs`` with ``ismrmrd_header`` (geometry and the
reconstruction matrix).
"""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np

from medldm.errors import InputError
from medldm.io._hdf5 import checked_hdf5_path

log = logging.getLogger(__name__)

SKIPPED_FLAGS = ("ACQ_IS_NOISE_MEASUREMENT", "ACQ_IS_NAVIGATION_DATA", "ACQ_IS_PHASECORR_DATA",
                 "ACQ_IS_DUMMYSCAN_DATA", "ACQ_IS_RTFEEDBACK_DATA", "ACQ_IS_HPFEEDBACK_DATA",
                 "ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA", "ACQ_IS_PHASE_STABILIZATION_REFERENCE",
                 "ACQ_IS_PHASE_STABILIZATION")
OTHER_INDICES = ("repetition", "contrast", "phase", "set")


def is_ismrmrd_h5(path: str | os.PathLike) -> bool:
    """An HDF5 file with ISMRMRD's layout: a group holding ``xml`` and ``data`` (acquisitions)."""
    try:
        with h5py.File(path, "r") as f:
            return any(isinstance(g, h5py.Group) and "xml" in g and "data" in g for g in f.values())
    except (OSError, ValueError, KeyError, RuntimeError):  # RuntimeError: corrupt HDF5 links (found by the fuzzer)
        return False


def _dataset_name(path) -> str:
    with h5py.File(path, "r") as f:
        return next(k for k, g in f.items() if isinstance(g, h5py.Group) and "xml" in g and "data" in g)


def _encoding(path, xml: str):
    import ismrmrd.xsd

    try:
        header = ismrmrd.xsd.CreateFromDocument(xml)
        enc = header.encoding[0]
        ny = int(enc.encodedSpace.matrixSize.y)
        lim = enc.encodingLimits
        centre = int(lim.kspace_encoding_step_1.center) if lim and lim.kspace_encoding_step_1 else ny // 2
        slices = int(lim.slice.maximum) + 1 if lim and lim.slice else 1
    except Exception as exc:  # the xsd binding raises its own exception types for every malformed header
        raise InputError(path, f"ISMRMRD header unreadable or without an encoding ({type(exc).__name__}: {exc})") from None
    if enc.trajectory is not None and str(getattr(enc.trajectory, "value", enc.trajectory)).lower() != "cartesian":
        raise InputError(path, f"trajectory {enc.trajectory!r}: only Cartesian k-space is supported")
    if int(enc.encodedSpace.matrixSize.z or 1) > 1:
        raise InputError(path, "3D encoding (kspace_encode_step_2): only 2D multi-slice acquisitions are supported")
    return ny, centre, slices


def read_ismrmrd_h5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(kspace complex64 [slices, coils, H, W], mask bool [W], attrs)`` of an ISMRMRD file (see the module)."""
    import ismrmrd

    path = checked_hdf5_path(path)
    if not is_ismrmrd_h5(path):
        raise InputError(path, "not an ISMRMRD file (no group with 'xml' and 'data')")
    try:
        dset = ismrmrd.Dataset(str(path), _dataset_name(path), create_if_needed=False, mode="r")
        try:
            xml = dset.read_xml_header()
            xml = xml.decode("utf-8", "replace") if isinstance(xml, bytes) else str(xml)
            ny, centre, n_slices = _encoding(path, xml)
            acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
        finally:
            dset.close()
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(path, f"cannot read ISMRMRD HDF5 ({type(exc).__name__}: {exc})") from None
    skip = [getattr(ismrmrd, f) for f in SKIPPED_FLAGS]
    imaging = [a for a in acqs if not any(a.is_flag_set(f) for f in skip)]
    extra = [a for a in imaging if any(int(getattr(a.idx, k)) for k in OTHER_INDICES)]
    if extra:
        log.warning("%s: %d acquisitions of other repetitions/contrasts/phases/sets skipped (one slice set is read)",
                    path, len(extra))
        imaging = [a for a in imaging if not any(int(getattr(a.idx, k)) for k in OTHER_INDICES)]
    if not imaging:
        raise InputError(path, "no imaging acquisitions (only noise, navigator or calibration scans)")
    coils, samples = imaging[0].data.shape
    if coils < 1 or samples < 1 or any(a.data.shape != (coils, samples) for a in imaging):
        raise InputError(path, "acquisitions differ in coil count or readout length (or have none)")
    kspace = np.zeros((n_slices, coils, samples, ny), dtype=np.complex64)
    counts = np.zeros((n_slices, ny), dtype=np.int32)
    shift = ny // 2 - centre
    for a in imaging:
        s, line = int(a.idx.slice), int(a.idx.kspace_encode_step_1) + shift
        if not (0 <= s < n_slices and 0 <= line < ny):
            raise InputError(path, f"acquisition at slice {s}, line {line - shift} lies outside the encoding limits")
        kspace[s, :, :, line] += a.data
        counts[s, line] += 1
    if (counts.min(0) != counts.max(0)).any():
        raise InputError(path, "slices measured different phase-encode lines (one mask per file is supported)")
    mask = counts[0] > 0
    kspace[..., mask] /= counts[0, mask]
    if not np.all(np.isfinite(kspace.view(np.float32))):
        raise InputError(path, "k-space contains NaN/Inf values")
    return kspace, mask, {"ismrmrd_header": xml, "format": "ismrmrd"}

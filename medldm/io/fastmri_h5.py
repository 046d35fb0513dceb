"""fastMRI HDF5 files, single- and multi-coil: k-space in, reconstructions out.

Layout (fastMRI 2018 release): dataset ``kspace`` complex64 ``[slices, H, W]`` (single-coil) or
``[slices, coils, H, W]`` (multi-coil; H is the readout, W the phase encode), optional ``mask`` ``[W]``
(test/challenge files), optional ``ismrmrd_header`` XML, and file attributes (``acquisition``, ``max``,
``norm``, ``patient_id``...). Images follow fastMRI's centred orthonormal 2D FFT over the last two axes
(``medldm.physics.fft.ifft2c``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import defusedxml.ElementTree as ET
import h5py
import numpy as np
from defusedxml import DefusedXmlException

from medldm.errors import InputError
from medldm.io._hdf5 import checked_hdf5_path, python_value
from medldm.io.volume import Volume

log = logging.getLogger(__name__)


def _zero_filled_magnitude(kspace: np.ndarray) -> np.ndarray:
    """|ifft2c(kspace)| over the last two axes, using the project's one FFT convention; multi-coil
    [slices, coils, H, W]: the root sum of squares over the coils (fastMRI's ``reconstruction_rss``)."""
    # Imported here: torch costs ~1.5 s to import and plain k-space reading does not need it.
    import torch

    from medldm.physics.fft import ifft2c

    with torch.no_grad():
        image = ifft2c(torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64)))
    if image.ndim == 4:
        return torch.sqrt((image.abs() ** 2).sum(1)).numpy().astype(np.float32)
    return image.abs().numpy().astype(np.float32)


def read_fastmri_h5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Return ``(kspace complex64 [slices, H, W] or [slices, coils, H, W], mask bool [W] or None, attrs)``.

    ``attrs`` holds the file attributes as plain Python values, plus ``ismrmrd_header`` (XML text) when the
    file has that dataset.
    """
    path = checked_hdf5_path(path)
    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f:
                raise InputError(path, f"no 'kspace' dataset (has: {sorted(f.keys())})")
            ds = f["kspace"]
            if not isinstance(ds, h5py.Dataset) or not np.issubdtype(ds.dtype, np.complexfloating):
                dtype = getattr(ds, "dtype", "a group")
                raise InputError(path, f"'kspace' must be complex, got {dtype}")
            if ds.ndim not in (3, 4):
                raise InputError(path, f"'kspace' must be [slices, H, W] (single-coil) or [slices, coils, H, W] "
                                       f"(multi-coil), got shape {ds.shape}")
            if min(ds.shape) < 1:  # an empty array would reach the FFT (MKL refuses it with a RuntimeError)
                raise InputError(path, f"'kspace' is empty: shape {ds.shape}")
            kspace = np.asarray(ds[()], dtype=np.complex64)
            mask = None
            if "mask" in f:
                mask = np.asarray(f["mask"][()]).reshape(-1).astype(bool)
                if mask.shape[0] != kspace.shape[-1]:
                    raise InputError(path, f"mask length {mask.shape[0]} does not match k-space width W={kspace.shape[-1]}")
            attrs = {k: python_value(v) for k, v in f.attrs.items()}
            if "ismrmrd_header" in f:
                attrs["ismrmrd_header"] = python_value(f["ismrmrd_header"][()])
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: corrupt HDF5 internals
        raise InputError(path, f"cannot read fastMRI HDF5 ({type(exc).__name__}: {exc})") from None
    return kspace, mask, attrs


def read_kspace_h5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Either k-space file, told apart by its layout: ISMRMRD raw data (``medldm.io.ismrmrd_h5``) or fastMRI."""
    from medldm.io.ismrmrd_h5 import is_ismrmrd_h5, read_ismrmrd_h5

    path = checked_hdf5_path(path)
    return read_ismrmrd_h5(path) if is_ismrmrd_h5(path) else read_fastmri_h5(path)


def kspace_spacing(attrs: dict, where: str | None = None) -> tuple[float, float, float]:
    """(H, W, slice) spacing in mm: explicit attrs first, then the ISMRMRD encoded space, else 1 mm."""
    for key in ("spacing", "voxel_size", "pixel_spacing"):
        if key in attrs:
            values = [float(v) for v in np.ravel(attrs[key])]
            if len(values) == 2:
                return values[0], values[1], 1.0
            if len(values) == 3:
                return values[0], values[1], values[2]
    xml = attrs.get("ismrmrd_header")
    if isinstance(xml, str) and xml.strip():
        try:
            root = ET.fromstring(xml)
            # Namespaced XML: match on local names only.
            enc = next(e for e in root.iter() if e.tag.endswith("encodedSpace"))
            size = {c.tag.split("}")[-1]: float(c.text) for c in next(e for e in enc if e.tag.endswith("matrixSize"))}
            fov = {c.tag.split("}")[-1]: float(c.text) for c in next(e for e in enc if e.tag.endswith("fieldOfView_mm"))}
            return fov["x"] / size["x"], fov["y"] / size["y"], fov["z"] / max(size.get("z", 1.0), 1.0)
        except DefusedXmlException as exc:
            # entity declarations (billion laughs) and external references have no place in an ISMRMRD header
            raise InputError(where, f"ismrmrd_header refused: unsafe XML ({type(exc).__name__})") from None
        except (ET.ParseError, StopIteration, KeyError, ValueError, TypeError, ZeroDivisionError):
            log.debug("ismrmrd_header without usable encodedSpace; using 1 mm spacing")
    return 1.0, 1.0, 1.0


def fastmri_h5_to_volume(source: str | os.PathLike | np.ndarray, attrs: dict | None = None) -> Volume:
    """Zero-filled magnitude image (multi-coil: root sum of squares) as a Volume ``(1, H, W, slices)``.

    ``source`` is a fastMRI file or a k-space array ``[slices, (coils,) H, W]`` (then ``attrs`` may give spacing).
    The affine is diagonal with 1 mm spacing unless the attributes or ISMRMRD header provide it.
    """
    meta = {"format": "fastmri_h5"}
    if isinstance(source, (str, os.PathLike)):
        kspace, mask, file_attrs = read_kspace_h5(source)
        attrs = {**file_attrs, **(attrs or {})}
        meta["source"] = str(source)
        meta["mask"] = mask
    else:
        kspace = np.asarray(source)
        attrs = dict(attrs or {})
        if kspace.ndim not in (3, 4) or not np.iscomplexobj(kspace):
            raise InputError(None, f"k-space must be complex [slices, (coils,) H, W], got {kspace.dtype} {kspace.shape}")
    image = _zero_filled_magnitude(kspace)  # [slices, H, W]
    array = np.ascontiguousarray(np.transpose(image, (1, 2, 0))[None])  # (1, H, W, slices)
    affine = np.diag([*kspace_spacing(attrs, meta.get("source")), 1.0])
    meta["fastmri_attrs"] = {k: v for k, v in attrs.items() if k != "ismrmrd_header"}
    volume = Volume(array=array, affine=affine, modality="MR", meta=meta)
    volume.check_finite()
    return volume


def recon_matrix(attrs: dict) -> tuple[int, int] | None:
    """(H, W) of the ISMRMRD header's reconstruction space (fastMRI brain: 320 x 320 from a 640 x 320 encoding,
    the readout oversampled twice), or None when the header does not give one."""
    xml = attrs.get("ismrmrd_header")
    if not isinstance(xml, str) or not xml.strip():
        return None
    try:
        root = ET.fromstring(xml)
        rec = next(e for e in root.iter() if e.tag.endswith("reconSpace"))
        size = {c.tag.split("}")[-1]: int(float(c.text)) for c in next(e for e in rec if e.tag.endswith("matrixSize"))}
        return size["x"], size["y"]
    except (ET.ParseError, DefusedXmlException, StopIteration, KeyError, ValueError, TypeError):
        return None


def write_fastmri_recon_h5(path: str | os.PathLike, recon: np.ndarray, attrs: dict | None = None) -> Path:
    """Write ``recon`` ``[slices, H, W]`` as float32 dataset ``reconstruction`` (fastMRI submission format)."""
    path = Path(path)
    recon = np.asarray(recon)
    if recon.ndim != 3 or np.iscomplexobj(recon):
        raise InputError(path, f"reconstruction must be real [slices, H, W], got {recon.dtype} {recon.shape}")
    if not np.all(np.isfinite(recon)):
        raise InputError(path, "reconstruction contains NaN/Inf")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("reconstruction", data=recon.astype(np.float32))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""Loaders for the real images that work offline on this machine (see data_cards/ for each source).

Every loader returns a :class:`~medldm.io.volume.Volume` whose array is ``(1, X, Y, Z)`` float32 in
canonical RAS+ index order (i -> Right, j -> Anterior, k -> Superior). Holding everything canonical means
an axial hold-out slab is simply a range of k, in every source, which the datalist relies on.

Nothing here downloads: the MNI152 files ship inside the nilearn wheel, the head CT and the ITK T1 come
from Debian packages (GPL/Apache data that must be installed, not vendored into this repository).
"""

from __future__ import annotations

import os
import plistlib
import tarfile
from pathlib import Path

import numpy as np

from medldm.errors import InputError
from medldm.io.volume import Volume

HEAD_CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
HEAD_CT_INSTALL_HINT = "install it with `sudo apt-get install invesalius-examples` (Debian/Ubuntu; GPL-2 data)"

# Searched in order; the ITK example data moved between Debian package names across releases.
ITK_DATA_DIRS = (
    Path("/usr/share/doc/insighttoolkit5-examples/examples/Data"),
    Path("/usr/share/doc/insighttoolkit4-examples/examples/Data"),
)
ITK_T1_NAME = "KmeansTest_T1UCharRaw.nii.gz"
# Labels 4..6 of this companion file cover exactly the intracranial tissue of the same subject; its non-zero
# voxels are used as the brain mask so the validation subject matches the skull-stripped MNI training domain.
ITK_T1_MASK_NAME = "KmeansTest_T1RawSkullStrip.nii.gz"
ITK_INSTALL_HINT = "install it with `sudo apt-get install insighttoolkit5-examples`"

# Real MR heads beyond the one template anatomy (training only; see data_cards/extra_real_mr.md). The pyradiomics
# source archive comes from PyPI (`.ci/setup` fetches it); its wheel holds no data.
PYRADIOMICS_SDIST = Path(os.environ.get("MEDLDM_PYRADIOMICS_SDIST", "~/.cache/medldm/pyradiomics-3.0.1.tar.gz")).expanduser()
PYRADIOMICS_BRAINS = ("brain1", "brain2")
PYRADIOMICS_HINT = ("fetch it with `pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d "
                    "~/.cache/medldm` (needs versioneer and wheel installed; `.ci/setup` does it)")
BRAINSMALL_PATH = Path("/usr/share/doc/libvolpack1-dev/examples/brainsmall.den")
BRAINSMALL_HINT = "install it with `sudo apt-get install libvolpack1-dev`"
BRAINSMALL_SPACING_MM = 2.0  # not stored in the file: ~2 mm makes its head 256 x 168 mm (AP x LR), a plausible size


def _nilearn_datasets():
    # nilearn is slow to import (~1.5 s); only pay for it when an MNI loader is called.
    from nilearn import datasets

    return datasets


def _from_nifti(img, modality: str, **meta) -> Volume:
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    array = np.asarray(img.dataobj, dtype=np.float32)
    if array.ndim != 3:
        raise InputError(meta.get("source"), f"expected a 3D image, got shape {array.shape}")
    return Volume(array[None], img.affine.copy(), modality, dict(meta))


def load_mni152_t1(resolution: int = 1) -> Volume:
    """MNI152 ICBM 2009a nonlinear symmetric T1 template (skull-stripped, intensities 0..1) from nilearn.

    ``resolution`` 1 gives 197x233x189 @ 1 mm, 2 gives 99x117x95 @ 2 mm (nilearn resamples it).
    """
    img = _nilearn_datasets().load_mni152_template(resolution=resolution)
    return _from_nifti(img, "MR", source="nilearn MNI152 2009a T1 template", resolution_mm=resolution)


def load_mni152_tissue_maps(resolution: int = 1) -> dict[str, Volume]:
    """Tissue probability maps on the MNI152 grid: ``gm``, ``wm``, ``csf`` (each 0..1) and ``mask``.

    nilearn ships GM and WM probabilities only. CSF is approximated as brain mask minus GM minus WM,
    clipped at 0: inside the mask that residual is ventricles and sulcal CSF (checked visually), so it is
    "CSF-ish", with a hard outer edge inherited from the thresholded mask (template > 0.2).
    GM/WM are rescaled where they sum above 1 so the three maps are a valid partition of unity with
    background = 1 - (gm + wm + csf).
    """
    ds = _nilearn_datasets()
    gm_img = ds.load_mni152_gm_template(resolution=resolution)
    gm = _from_nifti(gm_img, "MR", source="nilearn MNI152 2009a GM probability")
    wm = _from_nifti(ds.load_mni152_wm_template(resolution=resolution), "MR", source="nilearn MNI152 2009a WM probability")
    mask = _from_nifti(ds.load_mni152_brain_mask(resolution=resolution), "MR", source="nilearn MNI152 brain mask (T1 > 0.2)")
    for v in (wm, mask):
        if v.array.shape != gm.array.shape or not np.allclose(v.affine, gm.affine):
            raise InputError(v.meta["source"], "tissue map grid differs from the GM map grid")
    g = np.clip(gm.array, 0.0, 1.0)
    w = np.clip(wm.array, 0.0, 1.0)
    total = g + w
    over = total > 1.0
    if over.any():
        g = np.where(over, g / total, g)
        w = np.where(over, w / total, w)
    csf = np.clip(mask.array - g - w, 0.0, 1.0).astype(np.float32)
    return {
        "gm": gm.with_array(g.astype(np.float32)),
        "wm": wm.with_array(w.astype(np.float32)),
        "csf": gm.with_array(csf, source="brain mask - GM - WM, clipped (CSF-ish)"),
        "mask": mask.with_array((mask.array > 0).astype(np.float32)),
    }


def load_head_ct(path: str | Path | None = None) -> Volume:
    """The InVesalius "Cranium" head CT (one real patient, 'ProMED CT 0051') in Hounsfield units.

    Orientation: InVesalius stores ``matrix.dat`` as (z, y, x). Read anatomically (see the data card):
    z runs inferior -> superior (slice 0 is at the teeth, slice 107 at the vertex) and y runs
    posterior -> anterior (the head-rest arc lies at low y, the face at high y): InVesalius flips the DICOM
    rows on import. x is the DICOM column axis, which points to the patient's Left in DICOM (LPS) and which
    InVesalius does not flip; left/right cannot be verified from a symmetric head, so that is the one
    assumption here. The array is flipped along x so that every index axis points to R, A, S, with
    the volume centred on the world origin.
    """
    path = Path(path) if path is not None else HEAD_CT_PATH
    if not path.is_file():
        raise InputError(path, f"head CT example not found; {HEAD_CT_INSTALL_HINT}")
    try:
        with tarfile.open(path, "r:gz") as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            if "main.plist" not in members or "matrix.dat" not in members:
                raise InputError(path, "not an InVesalius project: main.plist or matrix.dat missing")
            info = plistlib.loads(tf.extractfile(members["main.plist"]).read())
            raw = tf.extractfile(members["matrix.dat"]).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(path, f"cannot read the InVesalius archive: {e}") from e

    matrix = info.get("matrix", {})
    shape = tuple(int(s) for s in matrix.get("shape", (108, 256, 256)))
    dtype = np.dtype(matrix.get("dtype", "int16")).newbyteorder("<")
    spacing_xyz = [float(s) for s in info.get("spacing", (0.9570312, 0.9570312, 1.5))]
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise InputError(path, f"matrix.dat holds {len(raw)} bytes, expected {shape} {dtype}")
    zyx = np.frombuffer(raw, dtype=dtype).reshape(shape)
    # (z, y, x) -> (x, y, z); flip x so index i points to patient Right (x was DICOM Left).
    xyz = np.ascontiguousarray(zyx.transpose(2, 1, 0)[::-1], dtype=np.float32)
    affine = np.diag([spacing_xyz[0], spacing_xyz[1], spacing_xyz[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(xyz.shape) - 1) / 2.0)
    return Volume(
        xyz[None],
        affine,
        "CT",
        {
            "source": str(path),
            "name": str(info.get("name", "")),
            "units": "HU",
            "orientation_note": "z inf->sup and y post->ant verified anatomically; L/R assumed from DICOM convention",
        },
    )


def _find_itk_file(name: str) -> Path | None:
    for d in ITK_DATA_DIRS:
        if (d / name).is_file():
            return d / name
    return None


def find_real_t1_validation(*, brain_only: bool = True) -> Volume | None:
    """A real single-subject T1 that ships offline, or ``None`` when no candidate is installed.

    Chosen: ITK's ``KmeansTest_T1UCharRaw.nii.gz`` (Debian ``insighttoolkit5-examples``), a real head T1,
    128x62x128 after reorientation to RAS @ 2 x 3 x 2 mm, intensities 0..255. Rejected: nibabel's test
    ``anatomical.nii`` (33x41x25, too small to validate anything) and dipy (not installed, its data needs a
    download). With ``brain_only`` the skull is removed with the subject's own shipped brain mask so the
    volume matches the skull-stripped MNI152 training domain; ``brain_only=False`` keeps the whole head
    (an out-of-domain check).
    """
    import nibabel as nib

    t1_path = _find_itk_file(ITK_T1_NAME)
    if t1_path is None:
        return None
    vol = _from_nifti(nib.load(t1_path), "MR", source=str(t1_path), subject="ITK KmeansTest T1", skull_stripped=False)
    if brain_only:
        mask_path = _find_itk_file(ITK_T1_MASK_NAME)
        if mask_path is None:
            return None
        mask = _from_nifti(nib.load(mask_path), "MR", source=str(mask_path))
        if mask.array.shape != vol.array.shape or not np.allclose(mask.affine, vol.affine):
            raise InputError(mask_path, "brain mask grid differs from the T1 grid")
        vol = vol.with_array((vol.array * (mask.array > 0)).astype(np.float32), skull_stripped=True, mask=str(mask_path))
    return vol


def load_pyradiomics_brain(name: str, archive: str | Path | None = None) -> Volume:
    """A contrast-enhanced T1 head with a lesion from the pyradiomics 3.0.1 source archive (``brain1``: 256x256x25,
    ``brain2``: 256x256x23 at 0.78 x 0.78 x 6.5 mm; skull kept). Thick axial slices: axial planes only.

    NRRD is read with pynrrd from the archive member itself (nothing is unpacked); its LPS geometry is turned
    into a RAS affine and the array reoriented like every other source.
    """
    import nibabel as nib
    import nrrd

    path = Path(archive) if archive is not None else PYRADIOMICS_SDIST
    if name not in PYRADIOMICS_BRAINS:
        raise InputError(path, f"unknown pyradiomics brain {name!r} (have {PYRADIOMICS_BRAINS})")
    if not path.is_file():
        raise InputError(path, f"pyradiomics source archive not found; {PYRADIOMICS_HINT}")
    member = f"pyradiomics-3.0.1/data/{name}_image.nrrd"
    try:
        with tarfile.open(path, "r:gz") as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise InputError(path, f"{member} is not a file in the archive")
            header = nrrd.read_header(fh)
            data = nrrd.read_data(header, fh, filename=member)
    except KeyError as e:
        raise InputError(path, f"{member} missing from the archive") from e
    except (tarfile.TarError, OSError, EOFError, nrrd.NRRDError) as e:
        raise InputError(path, f"cannot read {member}: {e}") from e
    if header.get("space") != "left-posterior-superior" or data.ndim != 3:
        raise InputError(path, f"{member}: expected a 3D LPS image, got space {header.get('space')!r}, shape {data.shape}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # column j: world step of index j
    affine[:3, 3] = header["space origin"]
    affine[:2] *= -1  # LPS -> RAS
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    return _from_nifti(img, "MR", source=f"{path.name}:{member}", subject=f"pyradiomics {name}", thick_axis=2)


def load_brainsmall(path: str | Path | None = None) -> Volume:
    """VolPack's example MR head (``brainsmall.den``, 128x128x84 uint8, Gaussian-downscaled from a UNC scan;
    skull kept), at an assumed isotropic ``BRAINSMALL_SPACING_MM``.

    A .den file is a 62-byte header (31 little-endian shorts; ``map_len`` at shorts 25-27) and x-fastest bytes. Read
    anatomically (checked on rendered slices): the slowest file axis runs left-right (which way cannot be told
    from a symmetric head), the middle one superior -> inferior, the fastest anterior -> posterior.
    """
    import nibabel as nib

    path = Path(path) if path is not None else BRAINSMALL_PATH
    if not path.is_file():
        raise InputError(path, f"VolPack example head not found; {BRAINSMALL_HINT}")
    raw = path.read_bytes()
    if len(raw) < 62:
        raise InputError(path, "shorter than a .den header")
    lens = [int(v) for v in np.frombuffer(raw[50:56], dtype="<i2")]
    if len(raw) - 62 != int(np.prod(lens)) or min(lens) <= 0:
        raise InputError(path, f".den header says {lens} voxels but the file holds {len(raw) - 62} bytes")
    file_order = np.frombuffer(raw[62:], dtype=np.uint8).reshape(lens[::-1]).astype(np.float32)  # (LR, SI, AP)
    s = BRAINSMALL_SPACING_MM
    affine = np.zeros((4, 4))
    affine[0, 0], affine[2, 1], affine[1, 2], affine[3, 3] = s, -s, -s, 1.0  # LR -> +x, SI -> -z, AP -> -y
    img = nib.Nifti1Image(file_order, affine)
    return _from_nifti(img, "MR", source=str(path), subject="VolPack brainsmall", spacing_assumed_mm=s)

"""A realistic, read-only input tree for `medldm reconstruct`, tiny model bundles, and one shared denoise run.

Tree (sizes kept tiny so a unit reconstructs in about a second on a CPU):

    study/a1, study/a2   one MR series (5 slices, oblique) split over two folders   -> ok
    study/gap            an MR series with its middle slice missing                 -> failed
    study/report.dcm     a Basic Text SR object (no pixel data)                     -> skipped
    nifti/sub-01_T1w.nii.gz   MR by its BIDS suffix, non-trivial affine             -> ok
    nifti/broken.nii.gz  a volume with NaN voxels                                   -> failed
    kspace/knee.h5       fastMRI single-coil k-space, 2x undersampled               -> recon task only
    README.txt           ignored
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medldm.io import Volume, write_dicom_series
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle

PATIENT = "Doe^Jane"
H5_HEADER = """<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>
<matrixSize><x>24</x><y>20</y><z>1</z></matrixSize><fieldOfView_mm><x>24.0</x><y>30.0</y><z>3.0</z></fieldOfView_mm>
</encodedSpace></encoding></ismrmrdHeader>"""


def oblique_affine(spacing=(0.9, 0.8, 2.5), origin=(-10.0, 12.0, 30.0), angle=0.2) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def noisy_mr(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(phantom(shape, seed) * 800 + np.abs(rng.normal(0, 20, size=shape))).astype(np.float32)


def write_mr_series(folder: Path, shape=(24, 20, 5), seed=0, series_number=3) -> list[Path]:
    meta = {"PatientName": PATIENT, "PatientID": "P001", "SeriesDescription": "T1 synthetic",
            "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    vol = Volume(noisy_mr(shape, seed)[None], oblique_affine(), "MR", {})
    return write_dicom_series(vol, folder, source_meta=meta, series_description_suffix="", series_number=series_number)


def write_sr(path: Path) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID, sr.SeriesInstanceUID = BasicTextSRStorage, generate_uid(), generate_uid()
    sr.Modality, sr.PatientName = "SR", PATIENT
    sr.save_as(path, enforce_file_format=True)


def fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def write_kspace_h5(path: Path, slices=4, h=24, w=20) -> None:
    image = np.transpose(phantom((h, w, slices), seed=5), (2, 0, 1))  # [slices, H, W]
    mask = np.zeros(w, bool)
    mask[::2] = True
    mask[w // 2 - 2: w // 2 + 2] = True
    kspace = (fft2c(image) * mask).astype(np.complex64)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("mask", data=mask)
        f.create_dataset("ismrmrd_header", data=H5_HEADER.encode())
        f.attrs["acquisition"] = "CORPD_FBK"


def build_tree(root: Path) -> dict:
    files = write_mr_series(root / "study" / "tmp")
    for k, f in enumerate(files):  # one series spanning two folders
        dest = root / "study" / ("a1" if k < 3 else "a2")
        dest.mkdir(parents=True, exist_ok=True)
        f.rename(dest / f.name)
    (root / "study" / "tmp").rmdir()
    gap = write_mr_series(root / "study" / "gap", seed=1, series_number=4)
    gap[2].unlink()
    write_sr(root / "study" / "report.dcm")
    (root / "nifti").mkdir()
    t1_affine = oblique_affine((1.0, 1.1, 2.0), (5.0, -3.0, 7.0), -0.3)
    nib.save(nib.Nifti1Image(noisy_mr((20, 16, 5), 2), t1_affine), root / "nifti" / "sub-01_T1w.nii.gz")
    bad = noisy_mr((12, 12, 3), 3)
    bad[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), root / "nifti" / "broken.nii.gz")
    (root / "kspace").mkdir()
    write_kspace_h5(root / "kspace" / "knee.h5")
    (root / "README.txt").write_text("synthetic test input\n")
    return {"t1_affine": t1_affine}


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def set_read_only(root: Path, read_only: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            p.chmod(stat.S_IRUSR | stat.S_IXUSR if read_only else stat.S_IRWXU)
        else:
            p.chmod(stat.S_IRUSR if read_only else stat.S_IRUSR | stat.S_IWUSR)


@pytest.fixture(scope="session")
def batch_input(tmp_path_factory):
    """(input root, digest before any run, info); the tree is read-only while tests run."""
    root = tmp_path_factory.mktemp("batch_in") / "input"
    root.mkdir()
    info = build_tree(root)
    digest = tree_digest(root)
    set_read_only(root, True)
    yield root, digest, info
    set_read_only(root, False)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundles")
    return {task: make_tiny_bundle(base / task, task, "MR") for task in ("denoise", "recon", "sr")}


def run(input_dir, out, **kwargs) -> tuple[int, str]:
    """run_batch with its table captured; returns (exit code, stdout)."""
    from medldm.batch import run_batch

    kwargs.setdefault("steps", 2)
    kwargs.setdefault("device", "cpu")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run_batch(input_dir, out, **kwargs)
    return code, buf.getvalue()


@pytest.fixture(scope="session")
def denoise_run(batch_input, bundles, tmp_path_factory):
    """One denoise run over the whole tree (K=2 samples, so uncertainty maps are written); shared read-only."""
    out = tmp_path_factory.mktemp("batch_out") / "denoise"
    code, stdout = run(batch_input[0], out, task="denoise", model=str(bundles["denoise"]), samples=2)
    return out, code, stdout


@pytest.fixture()
def shipped_dir(tmp_path, monkeypatch):
    """An empty shipped-models folder: tests decide which default models exist, whatever is installed."""
    import medldm.sampling.reconstructor as reconstructor

    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(reconstructor, "SHIPPED_DIR", folder)
    return folder


def copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith("."))

"""The app's work, without the page: turn an upload or a bundled example into what ``Reconstructor`` takes, run
it, and collect what the page shows and offers to download. Everything is written under one work folder.

The page (``medldm.app.page``) only lays this out; the tests drive these functions directly as well.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medldm import __version__
from medldm.errors import InputError
from medldm.io.volume import Volume

EXAMPLES = {"MNI152 T1 slab (MR, held out of training)": "MR", "Head CT, top slices (CT, held out of training)": "CT"}
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".zip")
KSPACE_SUFFIXES = (".h5", ".hdf5")
MAX_ZIP_FILES = 5000
ZIP_EXPANSION = 8  # a zipped series may unpack to this many times the upload limit, no more


@dataclass
class Prepared:
    """What to reconstruct (a Volume, a Measurement or an .h5 path), the truth when it is known (simulations),
    and a sentence that says what it is."""

    data: Any
    truth: Volume | None
    description: str


@dataclass
class Outcome:
    arrays: dict[str, np.ndarray]  # display name -> (X, Y, Z) on the output's grid and orientation
    affine: np.ndarray
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rows: what, PSNR, SSIM (when the truth is known)
    residual: float | None = None
    seconds: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # download label -> file


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def unzip_series(path: Path, into: Path, max_bytes: int) -> Path:
    """A zipped DICOM series -> a folder of its files. Member names are not used as paths (no file lands outside
    ``into``), and the unpacked size is bounded before anything is written."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(path.name, "not a readable ZIP archive") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
        if not members:
            raise InputError(path.name, "the ZIP archive is empty")
        if len(members) > MAX_ZIP_FILES:
            raise InputError(path.name, f"the ZIP archive holds {len(members)} files; at most {MAX_ZIP_FILES}")
        total = sum(m.file_size for m in members)
        if total > max_bytes * ZIP_EXPANSION:
            raise InputError(path.name, f"the ZIP archive unpacks to {total / 2**20:.0f} MiB; at most "
                                        f"{max_bytes * ZIP_EXPANSION / 2**20:.0f} MiB")
        folder = into / "dicom"
        folder.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(members):
            with zf.open(m) as src, open(folder / f"{i:05d}_{Path(m.filename).name}", "wb") as dst:
                shutil.copyfileobj(src, dst)
    return folder


def example_truth(modality: str, model_name: str) -> Volume:
    from medldm.demo import CROPS, truth_volume

    return truth_volume(modality, CROPS.get(model_name))


def simulation_settings(modality: str, task: str) -> tuple[dict, str]:
    """The degradation the demo and the README use for this task: (operator kwargs, description)."""
    from medldm.demo import SETTINGS

    return SETTINGS[f"{modality.lower()}-{task}"]


def prepare(*, task: str, modality: str, model_name: str, upload: str | Path | None, example: str | None,
            simulate: bool, seed: int, workdir: Path, max_bytes: int) -> Prepared:
    """Read the upload (or the example) and, when asked, degrade it as the task's simulation does."""
    from medldm.io import read_volume
    from medldm.sampling.measurement import simulate as simulate_measurement

    if example:
        if EXAMPLES.get(example) is None:
            raise InputError(None, f"unknown example {example!r}")
        if EXAMPLES[example] != modality:
            raise InputError(None, f"the example is {EXAMPLES[example]}; the {model_name} model needs {modality}")
        truth, source = example_truth(modality, model_name), example
        simulate = True  # an example is a clean volume: there is nothing to restore unless it is degraded
    elif upload:
        path = Path(upload)
        suffix = _suffix(path)
        if suffix in KSPACE_SUFFIXES:
            if simulate:
                raise InputError(path.name, "is a k-space or sinogram file: it is already a measurement; "
                                            "simulate needs a clean image (NIfTI or a zipped DICOM series)")
            return Prepared(path, None, f"{path.name}: measured data, reconstructed as they are")
        if suffix not in IMAGE_SUFFIXES:
            raise InputError(path.name, "unsupported file: upload a NIfTI (.nii, .nii.gz), a zipped DICOM series "
                                        "(.zip), or fastMRI / ISMRMRD k-space or a CT sinogram (.h5)")
        source_path = unzip_series(path, workdir, max_bytes) if suffix == ".zip" else path
        truth, source = read_volume(source_path, modality=modality), path.name
        if truth.modality not in (None, modality):
            raise InputError(path.name, f"is {truth.modality}; the {model_name} model needs {modality}")
        if not simulate:
            return Prepared(truth, None, f"{source}: the degraded scan, reconstructed as it is")
    else:
        raise InputError(None, "choose an example or upload a file first")
    kwargs, what = simulation_settings(modality, task)
    m = simulate_measurement(truth, task, seed, **kwargs)
    return Prepared(m, truth, f"{source}, degraded by simulation: {what} (seed {seed}); its truth is known")


def reconstruct(rec, prepared: Prepared, *, steps: int, samples: int, seed: int, workdir: Path,
                progress: bool = False) -> Outcome:
    """Run the model and gather the page's images, metrics and downloads (NIfTI, uncertainty, DICOM zip,
    provenance) under ``workdir``."""
    from medldm.evaluation import metrics as M

    result = rec(prepared.data, steps=steps, samples=samples, seed=seed, progress=progress)
    out = result.volume.array[0]
    naive = np.asarray(result.extras["naive_inverse"], np.float32).reshape(out.shape)
    arrays = {"input": naive, "output": out, "|output - input|": np.abs(out - naive)}
    if result.uncertainty is not None:
        arrays["uncertainty (std)"] = result.uncertainty.array[0]
    outcome = Outcome(arrays, result.volume.affine, residual=result.residual, seconds=result.timings["total"],
                      provenance=result.provenance)
    truth = prepared.truth
    if truth is not None and truth.array[0].shape == out.shape:
        t = truth.array[0].astype(np.float32)
        arrays["|error|"] = np.abs(out - t)
        mask = M.foreground_mask(t)
        for what, pred in (("input (naive inverse)", naive), (f"medldm {rec.config.name}", out)):
            m = M.all_metrics(t, pred, mask)
            outcome.metrics.append({"": what, "PSNR dB": round(m["psnr"], 2), "SSIM": round(m["ssim"], 3)})
    outcome.files = write_downloads(result, rec.config.name, workdir)
    return outcome


def write_downloads(result, model_name: str, workdir: Path) -> dict[str, Path]:
    from medldm.io import write_dicom_series, write_nifti

    folder = workdir / "outputs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = {"reconstruction (NIfTI)": write_nifti(result.volume, folder / "reconstruction.nii.gz")}
    if result.uncertainty is not None:
        files["uncertainty (NIfTI)"] = write_nifti(result.uncertainty, folder / "uncertainty.nii.gz")
    params = result.provenance["parameters"]
    description = (f"medldm {__version__} {result.provenance['task']} by {model_name}; {params['steps']} steps, "
                   f"{params['samples']} samples, seed {params['seed']}")
    series = folder / "dicom"
    write_dicom_series(result.volume, series, derivation_description=description, modality=result.volume.modality)
    files["derived DICOM series (zip)"] = Path(shutil.make_archive(str(folder / "reconstruction_dicom"), "zip", series))
    shutil.rmtree(series)
    prov = folder / "provenance.json"
    prov.write_text(json.dumps({**result.provenance, "timings": result.timings, "residual": result.residual}, indent=2))
    files["provenance (JSON)"] = prov
    return files

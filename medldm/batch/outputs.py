"""One batch unit's input and outputs: read it into what the Reconstructor takes, check that it fits in
memory, and write the reconstruction (NIfTI always; DICOM for DICOM and sinogram input; fastMRI h5 for
fastMRI input) with its provenance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medldm import __version__
from medldm.batch.manifest import write_json_atomic
from medldm.batch.units import Unit
from medldm.errors import InputError
from medldm.io.volume import Volume


def load_input(unit: Unit, views: int | None = None, dose: float | None = None, seed: int = 0,
               skip_bad_slices: bool = False):
    """(what the Reconstructor takes, the input volume when it is an image, modality).

    ``views``: a CT image unit becomes the research simulation of its sparse-view sinogram (``dose``
    photons per ray, None noiseless) instead of an image input."""
    from medldm.io import read_dicom_series, read_nifti

    path = unit.inputs[0]
    if unit.kind in ("dicom", "nifti"):
        if unit.kind == "dicom":
            volume = read_dicom_series(unit.series if unit.series is not None else path, skip_bad_slices=skip_bad_slices)
            if volume.modality is None:
                volume = Volume(volume.array, volume.affine, unit.modality, volume.meta)
        else:
            if unit.modality is None:
                raise InputError(path, "modality unknown (no BIDS sidecar or suffix); pass --modality mr|ct or --model")
            volume = read_nifti(path, modality=unit.modality)
        if views is not None:
            from medldm.sampling.measurement import from_ct_volume

            return from_ct_volume(volume, views, I0=dose, seed=seed), volume, volume.modality
        return volume, volume, volume.modality
    from medldm.sampling.measurement import from_kspace_file, from_sinogram_file

    m = from_sinogram_file(path) if unit.kind == "sinogram" else from_kspace_file(path)
    return m, None, m.modality


def check_geometry(volume: Volume) -> None:
    # The readers accept Inf positions and zero spacings; the NIfTI writer (qform) and SR then fail obscurely.
    aff = volume.affine
    if not np.all(np.isfinite(aff)) or abs(float(np.linalg.det(aff[:3, :3]))) < 1e-12:
        raise InputError(volume.meta.get("source"), "voxel geometry is not finite or degenerate (check "
                                                    "ImagePositionPatient/ImageOrientationPatient/PixelSpacing or "
                                                    "the NIfTI affine)")


def available_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(n_voxels: int, samples: int, factor: int = 1) -> None:
    """Refuse, with the numbers, a unit whose float32 working set would not fit in free memory.

    Slices are sampled in fixed-size batches, so the network's memory does not grow with the volume; what
    grows is the volume itself: the input, naive inverse, K samples (x2 during assembly), mean and std, on
    the output grid (SR: ``factor`` times more voxels).
    """
    need = 4 * n_voxels * factor * (2 * samples + 6)
    free = available_memory_bytes()
    if need > 0.8 * free:
        raise InputError(None, f"volume of {n_voxels:,} voxels needs about {need / 2**30:.1f} GiB with {samples} "
                               f"sample(s) but {free / 2**30:.1f} GiB is free: use fewer --samples, crop the volume, "
                               "or run on a larger machine")


def write_outputs(unit: Unit, ctx, tmp: Path, result, volume, modality, name, model_name) -> tuple[dict, dict]:
    from medldm.io import write_dicom_series, write_fastmri_recon_h5, write_nifti

    tmp.mkdir(parents=True)
    outputs = {"reconstruction": write_nifti(result.volume, tmp / "reconstruction.nii.gz")}
    if result.uncertainty is not None:
        outputs["uncertainty"] = write_nifti(result.uncertainty, tmp / "uncertainty.nii.gz")
    if unit.kind in ("dicom", "sinogram"):
        description = (f"medldm {__version__} {ctx.task} by model {model_name} ({name}); "
                       f"{result.provenance['parameters']['steps']} steps, {ctx.samples} samples, seed {ctx.seed}")
        # A corrupt source header can put numbers where UIDs belong; the writer would raise on them.
        source_meta = (volume.meta.get("dicom") or {}) if volume is not None else {}
        template = {k: v for k, v in source_meta.items() if not k.endswith("UID") or isinstance(v, str)}
        write_dicom_series(result.volume, tmp / "dicom", source_meta=template,
                           derivation_description=description, modality=modality, deidentify=ctx.deidentify)
        outputs["dicom"] = tmp / "dicom"
    if unit.kind == "fastmri":
        recon = np.transpose(result.volume.array[0], (2, 0, 1))  # (H, W, slices) -> fastMRI's [slices, H, W]
        outputs["reconstruction_h5"] = write_fastmri_recon_h5(
            tmp / "reconstruction.h5", recon, {"medldm_version": __version__, "model": name, "task": ctx.task})
    outputs["provenance"] = tmp / "provenance.json"
    rel = {k: f"{unit.id}/{Path(p).name}" for k, p in outputs.items()}
    provenance = {**result.provenance, "unit": {"id": unit.id, "kind": unit.kind,
                                                "inputs": [str(p) if ctx.deidentify is None else
                                                           ctx.deidentify.hash_text(str(p)) for p in unit.inputs],
                                                "modality": modality, "modality_source": unit.modality_source},
                  "model_requested": name, "timings": result.timings, "residual": result.residual, "outputs": rel}
    skipped = (volume.meta.get("skipped_slices") if volume is not None else None) or []
    if skipped:  # --skip-bad-slices left these out: the result covers the rest of the series
        provenance["skipped_slices"] = skipped
    write_json_atomic(outputs["provenance"], provenance)
    return rel, {"model": name, "modality": modality, **({"skipped_slices": skipped} if skipped else {})}
